"""Evaluation metrics: classification, selective prediction, threshold choice, incremental.

Pure functions on numpy arrays and Python lists; nothing here touches torch, files or the
network. Every function returns plain Python values (``float``, ``int``, ``list``, ``dict``)
ready for ``json.dumps(..., allow_nan=False)``: where a value is undefined (an accuracy over
zero events, a precision of a class that was never predicted) it is ``None``, never NaN.

Conventions shared by every function:

* Labels are integer ids ``0..C-1`` with ``labels: list[str]`` mapping id -> name.
* A prediction of ``ABSTAIN`` (-1) means "no label": it is never correct and is nobody's
  prediction, so it lowers accuracy and recall but no class's precision.
* An event is *covered* at threshold ``tau`` when ``conf >= tau``. A threshold above every
  confidence (``ABSTAIN_ALL``) covers nothing.

Incremental metrics follow Madureira & Schlangen (2020), exactly as DESIGN.md states them;
see ``incremental_metrics``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from scipy.stats import beta as _beta
from scipy.stats import norm as _norm
from scipy.stats import t as _student

ABSTAIN = -1
"""Prediction id meaning "no label" (the model abstained)."""

ABSTAIN_ALL = float(np.nextafter(1.0, 2.0))
"""Threshold that covers nothing (every confidence is <= 1): returned when none qualifies."""

TOP_CONFUSIONS = 10


# ----------------------------------------------------------------------------- helpers

def _num(x: float | None) -> float | None:
    """A JSON-safe float: numpy scalars become Python floats, NaN and inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else _num(num / den)


def _as_ids(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        as_int = arr.astype(np.int64)
        if not np.array_equal(as_int, arr):
            raise ValueError(f"{name} must hold integer label ids")
        arr = as_int
    return arr.astype(np.int64)


def _check_pair(y_true: Any, y_pred: Any, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_ids(y_true, "y_true"), _as_ids(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    c = len(labels)
    if t.size and (t.min() < 0 or t.max() >= c):
        raise ValueError(f"y_true holds ids outside 0..{c - 1}")
    if p.size and (p.min() < ABSTAIN or p.max() >= c):
        raise ValueError(f"y_pred holds ids outside 0..{c - 1} (or {ABSTAIN} = abstain)")
    return t, p


def _as_conf(conf: Any, n: int) -> np.ndarray:
    c = np.asarray(conf, dtype=np.float64)
    if c.ndim != 1 or c.size != n:
        raise ValueError(f"conf must be one-dimensional with {n} values, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("conf holds NaN or inf")
    return c


def _as_correct(correct: Any, conf: Any) -> tuple[np.ndarray, np.ndarray]:
    ok = np.asarray(correct).astype(bool)
    if ok.ndim != 1:
        raise ValueError(f"correct must be one-dimensional, got shape {ok.shape}")
    return ok, _as_conf(conf, ok.size)


def _f1_by_class(cm: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tp, fp, fn) per class; ``cm`` leaves abstentions out, so fn comes from ``support``."""
    tp = np.diag(cm).astype(np.int64)
    return tp, cm.sum(axis=0) - tp, support - tp


def _confusion(t: np.ndarray, p: np.ndarray, c: int) -> np.ndarray:
    """C x C counts, rows true, columns predicted; abstentions are left out."""
    keep = p != ABSTAIN
    flat = t[keep] * c + p[keep]
    return np.bincount(flat, minlength=c * c).reshape(c, c)


def _macro_f1(cm: np.ndarray, support: np.ndarray,
              present: np.ndarray | None = None) -> float | None:
    """Mean F1 over ``present`` ids (default: those with support).

    F1 = 2TP / (2TP + FP + FN), and 0 where that is 0/0.

    0 for 0/0 matches scikit-learn's ``f1_score(..., labels=present, average="macro",
    zero_division=0)``, so an outside script can reproduce the number.
    """
    present = np.flatnonzero(support) if present is None else present
    if present.size == 0:
        return None
    tp, fp, fn = _f1_by_class(cm, support)
    den = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, den, out=np.zeros(len(tp)), where=den > 0)
    return _num(f1[present].mean())


# ----------------------------------------------------------------------- classification

def classification_metrics(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict:
    """Token accuracy, macro-F1, per-class scores, top confusions and a confusion matrix.

    ``y_pred`` may hold ``ABSTAIN``; those events count as wrong. Returns::

        {"n": int,                     # events
         "n_abstained": int,
         "token_accuracy": float | None,
         "macro_f1": float | None,     # mean F1 over labels present in y_true (contract)
         "labels_present": [name, ...],
         "per_class": {name: {"precision": float | None,   # None: never predicted
                              "recall": float | None,      # None: not in y_true
                              "f1": float,                 # 2TP / (2TP + FP + FN)
                              "support": int}},            # labels in y_true or y_pred
         "top_confusions": [{"true": name, "pred": name, "count": int,
                             "share_of_true": float}, ...],  # at most 10, largest first
         "confusion": {"labels": [name, ...],   # labels in y_true or y_pred, in id order
                       "matrix": [[int]]}}      # rows true, columns predicted
    """
    labels = list(labels)
    t, p = _check_pair(y_true, y_pred, labels)
    c = len(labels)
    cm = _confusion(t, p, c)
    support = np.bincount(t, minlength=c)
    predicted = cm.sum(axis=0)
    present = np.flatnonzero(support)
    shown = np.flatnonzero((support > 0) | (predicted > 0))
    tp, fp, fn = _f1_by_class(cm, support)

    per_class = {}
    for i in shown:
        den = 2 * tp[i] + fp[i] + fn[i]
        per_class[labels[i]] = {
            "precision": _ratio(tp[i], tp[i] + fp[i]),
            "recall": _ratio(tp[i], support[i]),
            "f1": _num(2 * tp[i] / den) if den else 0.0,
            "support": int(support[i]),
        }

    off = cm.copy()
    np.fill_diagonal(off, 0)
    ti, pi = np.nonzero(off)
    counts = off[ti, pi]
    # Largest first; ties broken by label id so the list is deterministic.
    order = np.lexsort((pi, ti, -counts))[:TOP_CONFUSIONS]
    top = [{"true": labels[ti[k]], "pred": labels[pi[k]], "count": int(counts[k]),
            "share_of_true": _num(counts[k] / support[ti[k]])} for k in order]

    return {
        "n": int(t.size),
        "n_abstained": int(np.sum(p == ABSTAIN)),
        "token_accuracy": _ratio(np.sum(t == p), t.size),
        "macro_f1": _macro_f1(cm, support),
        "labels_present": [labels[i] for i in present],
        "per_class": per_class,
        "top_confusions": top,
        "confusion": {"labels": [labels[i] for i in shown],
                      "matrix": cm[np.ix_(shown, shown)].tolist()},
    }


# ------------------------------------------------------------------ selective prediction

def selective_metrics(y_true: Any, y_pred: Any, conf: Any, threshold: float,
                      labels: Sequence[str], covered: Any = None) -> dict:
    """Scores of the selective classifier that labels an event only when ``conf >= threshold``.

    ``selective_macro_f1`` is computed on the covered events but averaged over the labels
    present in the *whole* ``y_true`` (the contract's "labels present in the test data"): a
    class whose events were all abstained on, and which was never predicted, scores F1 = 0,
    so abstaining on a whole class is not free. An event predicted ``ABSTAIN`` is never
    covered. Returns::

        {"threshold": float, "n": int, "n_covered": int, "n_abstained": int,
         "n_correct_covered": int,
         "coverage": float | None,            # n_covered / n
         "selective_accuracy": float | None,  # accuracy on covered events
         "selective_macro_f1": float | None,
         "selective_risk": float | None}      # 1 - selective_accuracy
    """
    labels = list(labels)
    t, p = _check_pair(y_true, y_pred, labels)
    c = _as_conf(conf, t.size)
    # ``covered``: which events keep a label when a policy decides more than the threshold
    # does (``LoadedModel.covered``); default: confidence at or above the threshold
    covered = ((c >= threshold) if covered is None else np.asarray(covered, dtype=bool)) & (p != ABSTAIN)
    n_cov = int(covered.sum())
    n_ok = int(np.sum(t[covered] == p[covered]))
    present = np.flatnonzero(np.bincount(t, minlength=len(labels)))
    cm = _confusion(t[covered], p[covered], len(labels))
    covered_support = np.bincount(t[covered], minlength=len(labels))
    acc = _ratio(n_ok, n_cov)
    return {
        "threshold": float(threshold),
        "n": int(t.size),
        "n_covered": n_cov,
        "n_abstained": int(t.size - n_cov),
        "n_correct_covered": n_ok,
        "coverage": _ratio(n_cov, t.size),
        "selective_accuracy": acc,
        "selective_macro_f1": _macro_f1(cm, covered_support, present),
        "selective_risk": None if acc is None else _num(1.0 - acc),
    }


def _groups(ok: np.ndarray, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct confidences descending, with the covered count and error count at each.

    Events with equal confidence are covered together, so each distinct value is one
    operating point: that is how ties are handled everywhere in this module.
    """
    order = np.argsort(-conf, kind="stable")
    c, err = conf[order], ~ok[order]
    # Index of the last event of each run of equal confidence.
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True]) if c.size else np.zeros(0, np.int64)
    return c[ends], ends + 1, np.cumsum(err, dtype=np.int64)[ends]


def risk_coverage_curve(correct: Any, conf: Any, *, return_thresholds: bool = False):
    """Risk-coverage curve: one point per distinct confidence, from the highest down.

    Point ``i`` is the selective classifier with threshold ``thresholds[i]``:
    ``coverage[i]`` = share of events with ``conf >= thresholds[i]`` and ``risk[i]`` = error
    rate among them. Coverage rises to 1 and the last risk is the overall error rate.
    Returns ``(coverage, risk)`` float arrays, or ``(coverage, risk, thresholds)``.
    """
    ok, c = _as_correct(correct, conf)
    thr, covered, errors = _groups(ok, c)
    n = max(ok.size, 1)
    cov = covered / n
    risk = errors / np.maximum(covered, 1)
    out = (cov.astype(np.float64), risk.astype(np.float64))
    return out + (thr.astype(np.float64),) if return_thresholds else out


def aurc(correct: Any, conf: Any) -> float | None:
    """Area under the risk-coverage curve (Geifman & El-Yaniv; Geifman et al. 2019).

    ``AURC = (1/n) * sum_{i=1..n} risk(top i events by confidence)``: the mean selective risk
    over the n coverage levels i/n. Within a run of tied confidences the order of events is
    arbitrary, so the risk at a level inside a tie is its expectation over all orders of the
    tied events (errors before the tie + their share of the tie's errors, divided by i). The
    result therefore does not depend on input order, equals the usual definition when no
    confidences tie, and equals the overall error rate when all tie (no ranking at all).
    Lower is better; None for no events.
    """
    ok, c = _as_correct(correct, conf)
    n = ok.size
    if n == 0:
        return None
    _, ends, cum_err = _groups(ok, c)
    starts = np.r_[0, ends[:-1]]
    err_before = np.r_[0, cum_err[:-1]]
    size = ends - starts
    rate = (cum_err - err_before) / size
    i = np.arange(1, n + 1)                      # coverage level, in events
    g = np.repeat(np.arange(len(ends)), size)    # group of each level
    expected_errors = err_before[g] + (i - starts[g]) * rate[g]
    return _num(np.mean(expected_errors / i))


# ------------------------------------------------------------------- threshold choice

def clopper_pearson_lower(k: Any, m: Any, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on a binomial rate (k successes of m).

    P(rate >= bound) >= confidence. 0 where k = 0; NaN where m = 0.
    """
    k, m = np.asarray(k, dtype=np.float64), np.asarray(m, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lb = _beta.ppf(1.0 - confidence, np.maximum(k, 1e-300), m - k + 1)
    lb = np.where(k > 0, lb, 0.0)
    return np.where(m > 0, lb, np.nan)


def clustered_lower(k: Any, m: Any, confidence: float) -> np.ndarray:
    """One-sided lower bound on a precision pooled over sessions whose events are not
    independent: ``k`` correct of ``m`` covered events per session (last axis: sessions).

    Events of one session (a working day, one user's habits) succeed or fail together, so a
    binomial bound over all events is too tight: it certifies on held-out days a threshold
    that new days then miss. This is Korn and Graubard's (1998) Clopper-Pearson interval for
    clustered samples: the pooled rate p = sum k / sum m keeps its Clopper-Pearson form, at
    an effective number of events n* = p (1 - p) / var(p), var from the between-session
    spread (the ratio estimator's linearised variance, G / (G - 1) sum (k - p m)^2 / M^2 over
    the G sessions with a covered event), shrunk by (z / t_{G-1})^2 for the few sessions that
    variance is read from. n* is capped at the events themselves, so the bound is never above
    the binomial one. Where it cannot be estimated (one session, or p = 0 or 1) the binomial
    bound is kept. NaN where no event is covered, as ``clopper_pearson_lower``."""
    k, m = np.asarray(k, dtype=np.float64), np.asarray(m, dtype=np.float64)
    return _clustered(k.sum(-1), m.sum(-1), (k ** 2).sum(-1), (k * m).sum(-1), (m ** 2).sum(-1),
                      (m > 0).sum(-1), confidence)


def _clustered(K: Any, M: Any, kk: Any, km: Any, mm: Any, G: Any, confidence: float) -> np.ndarray:
    """``clustered_lower`` from the sums over sessions of k, m, k^2, k m, m^2 and the number
    of sessions G with a covered event."""
    K, M, G = np.asarray(K, np.float64), np.asarray(M, np.float64), np.asarray(G, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = K / M
        spread = np.maximum(kk - 2 * p * km + p ** 2 * mm, 0.0)    # sum (k - p m)^2
        var = G / np.maximum(G - 1, 1) * spread / M ** 2
        shrink = (_norm.ppf(confidence) / _student.ppf(confidence, np.maximum(G - 1, 1))) ** 2
        n_eff = np.where((G > 1) & (var > 1e-15), p * (1 - p) / var * shrink, M)
    n_eff = np.minimum(np.nan_to_num(n_eff, nan=0.0, posinf=0.0), M)
    n_eff = np.where(n_eff > 0, n_eff, M)
    return clopper_pearson_lower(p * n_eff, n_eff, confidence)


def precision_lower(correct: Any, covered: Any, sessions: Any, confidence: float) -> float:
    """Lower bound on the precision of the ``covered`` events: ``clustered_lower`` over
    ``sessions`` (each event's session), or the binomial bound when ``sessions`` is None."""
    ok, cov = np.asarray(correct, dtype=bool), np.asarray(covered, dtype=bool)
    if sessions is None:
        return float(clopper_pearson_lower(int(ok[cov].sum()), int(cov.sum()), confidence))
    _, idx = np.unique(np.asarray(sessions)[cov], return_inverse=True)
    k = np.bincount(idx, weights=ok[cov].astype(np.float64))
    m = np.bincount(idx).astype(np.float64)
    return float(clustered_lower(k, m, confidence))


def _clustered_by_threshold(ok: np.ndarray, conf: np.ndarray, sessions: Any, thr: np.ndarray,
                            confidence: float) -> np.ndarray:
    """``clustered_lower`` of the events covered at each threshold of ``thr``, in
    O(n log n): the events are added from the most confident down, and the sums the bound
    needs (of k, m, k^2, k m, m^2 over sessions) grow by what each event adds to its
    session's counts, so no per-session table is built."""
    _, sid = np.unique(np.asarray(sessions), return_inverse=True)
    order = np.argsort(-conf, kind="stable")
    g, o = sid[order], ok[order].astype(np.float64)
    # each event's session counts before it (m0: events, k0: correct ones), in this order
    by = np.argsort(g, kind="stable")
    gs, os_ = g[by], o[by]
    start = np.r_[0, np.flatnonzero(gs[1:] != gs[:-1]) + 1] if gs.size else np.zeros(0, np.int64)
    first = np.zeros(gs.size, bool)
    first[start] = True
    seg = np.cumsum(first) - 1
    m0s = np.arange(gs.size) - start[seg]
    ck = np.cumsum(os_)
    k0s = ck - os_ - (ck[start] - os_[start])[seg]
    m0, k0, new = np.empty_like(m0s), np.empty_like(k0s), np.empty_like(first)
    m0[by], k0[by], new[by] = m0s, k0s, first
    prefix = lambda x: np.r_[0.0, np.cumsum(x, dtype=np.float64)]   # noqa: E731
    K, M = prefix(o), prefix(np.ones_like(o))
    kk, mm = prefix(o * (2 * k0 + 1)), prefix(2 * m0 + 1)
    km = prefix(k0 + o * m0 + o)
    G = prefix(new)
    n = np.searchsorted(-conf[order], -np.asarray(thr, np.float64), side="right")   # covered at each
    return _clustered(K[n], M[n], kk[n], km[n], mm[n], G[n], confidence)


THRESHOLD_MARGIN = 1e-6


def choose_threshold(correct: Any, conf: Any, target_precision: float = 0.95,
                     confidence: float = 0.9, method: Literal["binomial", "empirical"] = "binomial",
                     grid: Any = None, sessions: Any = None) -> dict:
    """The lowest confidence threshold whose covered events are precise enough, on validation data.

    Candidates are the distinct validation confidences (or ``grid``), scanned from the
    highest down; candidate ``tau`` covers the events with ``conf >= tau``.

    ``method="binomial"`` (the default) wants the guarantee "precision of the covered set is
    >= target with probability >= confidence". Each candidate's precision gets a one-sided
    Clopper-Pearson lower bound at level ``confidence``. Testing many thresholds on the same
    data would inflate the error rate, so the scan is **fixed-sequence testing**: from the
    highest threshold down, accept while the bound is >= target and stop at the first
    failure; the family-wise error stays <= 1 - confidence with no Bonferroni penalty,
    because the order is fixed before looking at correctness. Candidates that cover so few
    events that even a perfect record could not pass (alpha**(1/m) < target) are skipped, not
    failed: whether a candidate is hopeless depends on the confidences only, never on
    correctness, so skipping is part of fixing the order. (Strictly the guarantee is
    conditional on the validation confidences; pass a fixed ``grid`` to make the candidate
    set data-independent too.)

    With ``sessions`` (each event's session, any hashable ids) the bound is
    ``clustered_lower``: the guarantee is then over new sessions like the held-out ones, not
    over new events of those sessions, and the threshold is never lower than without.

    ``method="empirical"``: the lowest threshold whose empirical precision is >= target, no
    guarantee. The binomial threshold is never lower than the empirical one.

    When nothing qualifies the threshold is ``ABSTAIN_ALL`` (abstain on everything) and
    ``feasible`` is False. Returns::

        {"threshold": float, "coverage": float | None, "precision": float | None,
         "lower_bound": float | None,   # Clopper-Pearson bound at the chosen threshold
         "n": int, "n_covered": int, "feasible": bool, "method": str,
         "target_precision": float, "confidence": float}
    """
    if method not in ("binomial", "empirical"):
        raise ValueError(f"method must be 'binomial' or 'empirical', got {method!r}")
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ok, c = _as_correct(correct, conf)
    n = ok.size

    if grid is None:
        thr, m, errors = _groups(ok, c)
        k = m - errors
    else:
        thr = np.unique(np.asarray(grid, dtype=np.float64))[::-1]
        covered = c[None, :] >= thr[:, None]             # (thresholds, events)
        m = covered.sum(axis=1)
        k = (covered & ok[None, :]).sum(axis=1)
    if sessions is not None and method == "binomial":
        sessions = np.asarray(sessions)
        if sessions.shape != c.shape:
            raise ValueError(f"sessions holds {sessions.size} ids for {c.size} events")
        lb = _clustered_by_threshold(ok, c, sessions, thr, confidence)
    else:
        lb = clopper_pearson_lower(k, m, confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(m > 0, k / np.maximum(m, 1), np.nan)

    chosen = None
    if method == "empirical":
        passing = np.flatnonzero(prec >= target_precision)
        chosen = int(passing[-1]) if passing.size else None
    else:
        hopeless = (1.0 - confidence) ** (1.0 / np.maximum(m, 1)) < target_precision
        hopeless |= m == 0
        for i in range(len(thr)):
            if hopeless[i]:
                continue
            if lb[i] >= target_precision:
                chosen = i
            else:
                break

    out = {"n": int(n), "method": method, "target_precision": float(target_precision),
           "confidence": float(confidence)}
    if chosen is None:
        return {**out, "threshold": ABSTAIN_ALL, "coverage": 0.0 if n else None,
                "precision": None, "lower_bound": None, "n_covered": 0, "feasible": False}
    # Not the chosen confidence itself but a hair below it (at most halfway to the next lower
    # candidate, so the covered validation events stay the same): an event that looks like
    # one seen in validation can come out equal to the threshold, and then float rounding
    # (a live step sums in another order than an offline pass) would decide whether it is
    # labelled, and the final live label could differ from the offline one.
    # (A fixed grid is kept as given.)
    below = thr[chosen + 1] if chosen + 1 < len(thr) else 0.0
    threshold = float(thr[chosen] - (min(THRESHOLD_MARGIN, (thr[chosen] - below) / 2) if grid is None else 0.0))
    return {**out, "threshold": threshold, "coverage": _ratio(m[chosen], n),
            "precision": _num(prec[chosen]), "lower_bound": _num(lb[chosen]),
            "n_covered": int(m[chosen]), "feasible": True}


def offline_metrics(y_true: Any, y_pred: Any, conf: Any, threshold: float,
                    labels: Sequence[str], covered: Any = None) -> dict:
    """Everything ``tagger evaluate`` reports offline, in the shape ``trainer.report`` reads.

    ``y_pred`` is the model's best label for every event (no abstention); ``conf`` its
    confidence. Returns::

        {"offline": {"token_accuracy", "macro_f1", "threshold", "coverage",
                     "selective_accuracy", "selective_macro_f1", "aurc"},  # contract keys
         "classification": classification_metrics(...),
         "selective": selective_metrics(...),
         "risk_coverage": {"model": {"coverage": [...], "risk": [...]}},
         "aurc": {"model": float | None}}
    """
    labels = list(labels)
    t, p = _check_pair(y_true, y_pred, labels)
    c = _as_conf(conf, t.size)
    cls = classification_metrics(t, p, labels)
    sel = selective_metrics(t, p, c, threshold, labels, covered)
    correct = t == p
    cov, risk = risk_coverage_curve(correct, c)
    area = aurc(correct, c)
    return {
        "offline": {"token_accuracy": cls["token_accuracy"], "macro_f1": cls["macro_f1"],
                    "threshold": float(threshold), "coverage": sel["coverage"],
                    "selective_accuracy": sel["selective_accuracy"],
                    "selective_macro_f1": sel["selective_macro_f1"], "aurc": area},
        "classification": cls,
        "selective": sel,
        "risk_coverage": {"model": {"coverage": cov.tolist(), "risk": risk.tolist()}},
        "aurc": {"model": area},
    }


# ---------------------------------------------------------------- incremental metrics

Label = Hashable | None
Emission = tuple[int, int, Label]


def outputs_to_emissions(outputs: Sequence[Sequence[Label]]) -> list[Emission]:
    """The emissions that produce ``outputs``: each event's first label, then every change.

    ``outputs[t]`` (0-based) is O_{t+1}, the labels after event t, so it has length t + 1.
    """
    emissions: list[Emission] = []
    prev: Sequence[Label] = ()
    for t, o in enumerate(outputs):
        if len(o) != t + 1:
            raise ValueError(f"outputs[{t}] must hold {t + 1} labels (one per event so far), "
                             f"got {len(o)}")
        emissions.extend((j, t, o[j]) for j in range(t) if o[j] != prev[j])
        emissions.append((t, t, o[t]))
        prev = o
    return emissions


def _timelines(n: int, emissions: Sequence[Emission]) -> list[list[tuple[int, Label]]]:
    """Per position, ``[(step, label), ...]``: the first emission, then each real change."""
    by_pos: dict[int, dict[int, Label]] = defaultdict(dict)
    for e in emissions:
        j, t, label = e
        if not (0 <= j < n and j <= t < n):
            raise ValueError(f"emission {e!r} is outside 0 <= position <= step < n = {n}")
        by_pos[j][t] = label                      # several at one step: the last one wins
    lines = []
    for j in range(n):
        steps = by_pos.get(j)
        if not steps or j not in steps:
            raise ValueError(f"position {j} has no emission at its own step {j}: every event "
                             "is labelled (or abstained on) when it arrives")
        line = [(j, steps[j])]
        for t in sorted(steps):
            if t > j and steps[t] != line[-1][1]:  # a re-emission of the same label is no edit
                line.append((t, steps[t]))
        lines.append(line)
    return lines


def outputs_from_emissions(n: int, emissions: Sequence[Emission]) -> list[list[Label]]:
    """Rebuild O_1..O_n (0-based list, ``outputs[t]`` has t + 1 labels) from emissions."""
    lines = _timelines(n, emissions)
    outputs: list[list[Label]] = []
    current: list[Label] = []
    changes: dict[int, list[tuple[int, Label]]] = defaultdict(list)
    for j, line in enumerate(lines):
        for t, label in line[1:]:
            changes[t].append((j, label))
    for t in range(n):
        current.append(lines[t][0][1])
        for j, label in changes.get(t, ()):
            current[j] = label
        outputs.append(list(current))
    return outputs


def incremental_metrics(outputs: Sequence[Sequence[Label]], gold: Sequence[Label] | None = None,
                        offline: Sequence[Label] | None = None) -> dict:
    """Incremental metrics of one session (Madureira & Schlangen 2020) from O_1..O_n.

    ``outputs[t]`` is the label list after event t (0-based; length t + 1); a label is any
    hashable value, None meaning abstained. A change of abstention counts as an edit, as it
    does in the live service. See ``incremental_from_emissions`` for the returned dict; the
    two functions give identical results for the same session.
    """
    for t, o in enumerate(outputs):
        if len(o) != t + 1:
            raise ValueError(f"outputs[{t}] must hold {t + 1} labels, got {len(o)}")
    return incremental_from_emissions(len(outputs), outputs_to_emissions(outputs), gold, offline)


def incremental_from_emissions(n: int, emissions: Sequence[Emission],
                               gold: Sequence[Label] | None = None,
                               offline: Sequence[Label] | None = None) -> dict:
    """Incremental metrics of one session from its emitted label records.

    ``emissions`` are ``(position j, step t, label)``, 0-based, ``t >= j``: at step t (after
    event t arrived) position j was labelled ``label``. Each position needs one at its own
    step. Several at the same (j, t): the last wins. An emission that repeats the current
    label is not an edit. Runs in O(n + emissions), where the O_t form is O(n^2).

    With n events, ``edits`` = n additions + every change of an earlier label:

    * ``edit_overhead`` = (edits - n) / edits: share of edits that were revisions (0 = none).
    * ``correction_time`` = sum_j (step of j's last change - step of its first emission)
      / (n(n-1)/2), in [0, 1]; 0 when n < 2.
    * ``relative_correctness`` = share of steps t at which O_t equals F[1..t], F = O_n.

    With ``gold`` (the true labels): ``first_accuracy`` / ``final_accuracy`` score each
    event's first / final label over all n events, abstained counting as wrong;
    ``first_accuracy_answered`` / ``final_accuracy_answered`` score only the events that had
    a label (None when none had). With ``offline`` (the offline model's labels):
    ``final_equals_offline`` = share of events whose final label equals it. Returns::

        {"n_events", "edits", "revisions", "edit_overhead", "correction_time",
         "relative_correctness",
         # with gold:
         "first_accuracy", "final_accuracy", "first_accuracy_answered",
         "final_accuracy_answered", "n_first_answered", "n_final_answered",
         "n_first_correct", "n_final_correct",
         # with offline:
         "final_equals_offline", "n_final_equals_offline"}

    Undefined values (n = 0) are None.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lines = _timelines(n, emissions)
    revisions = sum(len(line) - 1 for line in lines)
    edits = n + revisions
    first = [line[0][1] for line in lines]
    final = [line[-1][1] for line in lines]

    # Position j is wrong (differs from its final label) on whole segments of its timeline;
    # a difference array over steps counts wrong positions per step in O(n + emissions).
    wrong = np.zeros(n + 1, dtype=np.int64)
    for j, line in enumerate(lines):
        for (start, label), nxt in zip(line, line[1:] + [(n, None)]):
            if label != final[j]:
                wrong[start] += 1
                wrong[nxt[0]] -= 1
    correct_steps = int(np.sum(np.cumsum(wrong)[:n] == 0))
    delay = sum(line[-1][0] - j for j, line in enumerate(lines))

    out: dict[str, Any] = {
        "n_events": n,
        "edits": edits,
        "revisions": revisions,
        "edit_overhead": _ratio(revisions, edits),
        "correction_time": _num(delay / (n * (n - 1) / 2)) if n >= 2 else 0.0,
        "relative_correctness": _ratio(correct_steps, n),
    }
    if gold is not None:
        if len(gold) != n:
            raise ValueError(f"gold holds {len(gold)} labels for a session of {n} events")
        for name, seq in (("first", first), ("final", final)):
            answered = sum(x is not None for x in seq)
            ok = sum(x is not None and x == g for x, g in zip(seq, gold))
            out[f"{name}_accuracy"] = _ratio(ok, n)
            out[f"{name}_accuracy_answered"] = _ratio(ok, answered)
            out[f"n_{name}_answered"] = answered
            out[f"n_{name}_correct"] = ok
    if offline is not None:
        if len(offline) != n:
            raise ValueError(f"offline holds {len(offline)} labels for a session of {n} events")
        same = sum(a == b for a, b in zip(final, offline))
        out["final_equals_offline"] = _ratio(same, n)
        out["n_final_equals_offline"] = same
    return out


_POOLED = {  # metric -> (numerator count, denominator count): pooled over events
    "first_accuracy": ("n_first_correct", "n_events"),
    "final_accuracy": ("n_final_correct", "n_events"),
    "first_accuracy_answered": ("n_first_correct", "n_first_answered"),
    "final_accuracy_answered": ("n_final_correct", "n_final_answered"),
    "final_equals_offline": ("n_final_equals_offline", "n_events"),
}
_WEIGHTED = ("edit_overhead", "correction_time", "relative_correctness")


def aggregate_incremental(per_session: Sequence[dict],
                          weights: Literal["n_events", "sessions"] = "n_events") -> dict:
    """Combine ``incremental_metrics`` results of many sessions into one dict.

    ``weights="n_events"`` (default): each session counts in proportion to its events, so a
    long session weighs more than a two-event one. For edit overhead, correction time and
    relative correctness that is the event-weighted mean of the per-session values (sessions
    where the value is None are left out). The accuracies and ``final_equals_offline`` are
    pooled over events (total correct / total events, or / total answered for ``_answered``),
    which is the same as weighting by the denominator's count.

    ``weights="sessions"``: plain mean of the per-session values, every session alike (the
    paper's averaging over sentences).

    Returns the same metric keys, plus ``sessions`` and ``events`` (and the summed counts).
    """
    if weights not in ("n_events", "sessions"):
        raise ValueError(f"weights must be 'n_events' or 'sessions', got {weights!r}")
    out: dict[str, Any] = {"sessions": len(per_session),
                           "events": int(sum(s["n_events"] for s in per_session))}
    for key in ("edits", "revisions"):
        out[key] = int(sum(s.get(key, 0) for s in per_session))

    def mean(key: str, weight_of) -> float | None:
        pairs = [(s[key], weight_of(s)) for s in per_session if s.get(key) is not None]
        total = sum(w for _, w in pairs)
        return _ratio(sum(v * w for v, w in pairs), total) if pairs else None

    for key in _WEIGHTED:
        out[key] = mean(key, (lambda s: s["n_events"]) if weights == "n_events" else (lambda s: 1))
    for key, (num, den) in _POOLED.items():
        having = [s for s in per_session if key in s]
        if not having:
            continue
        if weights == "sessions":
            out[key] = mean(key, lambda s: 1)
        else:
            out[key] = _ratio(sum(s[num] for s in having), sum(s[den] for s in having))
        for count in (num, den):
            if count != "n_events":
                out[count] = int(sum(s[count] for s in having))
    return out
