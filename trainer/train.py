"""The ``tagger train`` pipeline that ends in an artifact folder: splits by session,
validation plans, ``model.arch: auto``'s mixture, calibration and abstention. Fitting one
model (chunking, the epoch loop, early stopping) is ``trainer.fit``.

Pipeline (``train``): load -> split sessions into train / validation / test -> fit encoders on
train only -> (optional) k-fold HPO grouped by session on train+val -> fit with early stopping
on validation -> temperature scaling and an abstention threshold chosen on validation (or on
out-of-fold predictions when HPO refits on train+val) -> the held-out test split is scored
once -> artifact with manifest, metrics and plots.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from trainer.artifacts import agreement_margin, covered_by, save_artifact, softmax_t
from trainer.baseline import BaselineLabeller
from trainer.config import CLOCK_CANDIDATE, Config, ModelConfig, arrival_only
from trainer.crf import without_lex
from trainer.errors import ConfigError
from trainer.evaluate import score
from trainer.features import EncodedSession, FeatureEncoder, LabelMap
from trainer.fit import FitResult, fit_any, fit_model, label_counts, model_args, pick_device
from trainer.hpo import search
from trainer.loading import fingerprint, read_events, split_sessions
from trainer.metrics import (ABSTAIN_ALL, THRESHOLD_MARGIN, choose_threshold, classification_metrics,
                             precision_lower)
from trainer.model import (IGNORE, Mixture, MixtureConfig, Tagger, arrival_logits, collate, longest_lookahead,
                           session_logits)

log = logging.getLogger(__name__)


@dataclass
class Validated:
    """One architecture's validation: held-out logits (full lookahead) per held-out session,
    per-depth held-out logits for prefix calibration (or None), and what the final fit needs."""

    args: ModelConfig
    cfg: Config
    logits: list[np.ndarray]
    labels: list[np.ndarray]
    depth_logits: tuple[list[np.ndarray], list[np.ndarray]] | None
    epochs: int
    best_epochs: list[int]
    fit: FitResult | None = None          # the split plan's model; folds fit at the end
    seconds: float = 0.0
    depth_order: list[int] | None = None  # session (index into logits) of each depth-logit block
    # a CRF's held-out logits with stickier transitions (``train.auto_crf_sticky``): delta ->
    # this validation with those logits (the same fits, rows and epochs)
    sticky: dict[float, "Validated"] = dataclasses.field(default_factory=dict)

    def at_depth(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The held-out logits and labels at depth k (``prefix_logits``' rows: every event
        with at least k later events, session by session). Past this model's own lookahead L
        its labels are final: the depth-L rows, less each session's last k - L (a member of a
        mixture whose lookahead is longer, ``model.network_lookahead``)."""
        z, y = self.depth_logits
        L = len(z) - 1
        if k <= L:
            return z[k], y[k]
        sizes = [max(0, len(self.labels[i]) - L) for i in self.depth_order]
        keep = np.concatenate([np.arange(n) < n - (k - L) for n in sizes]) if sizes else np.zeros(0, bool)
        return z[L][keep], y[L][keep]

    def sessions_at(self, k: int | None) -> np.ndarray:
        """The held-out session (index into ``labels``) of each row of ``at_depth(k)``, or of
        the full-lookahead rows (``np.concatenate(labels)``) when k is None."""
        if k is None:
            return np.repeat(np.arange(len(self.labels)), [len(y) for y in self.labels])
        order = np.asarray(self.depth_order, dtype=np.int64)
        return np.repeat(order, [max(0, len(self.labels[i]) - k) for i in order])

    def scores(self, names: Sequence[str]) -> dict[str, Any]:
        """Held-out top-1 macro-F1 and accuracy at full lookahead and on arrival (k = 0)."""
        y = np.concatenate(self.labels)
        keep = y != IGNORE
        z = np.concatenate(self.logits)
        full = classification_metrics(y[keep], z[keep].argmax(-1), list(names))
        out = {"macro_f1": full["macro_f1"], "accuracy": full["token_accuracy"],
               "first_macro_f1": None, "first_accuracy": None, "events": int(keep.sum()),
               "seconds": round(self.seconds, 1)}
        if self.depth_logits is not None:
            z0, y0 = self.depth_logits[0][0], self.depth_logits[1][0]
            k0 = y0 != IGNORE
            first = classification_metrics(y0[k0], z0[k0].argmax(-1), list(names))
            out["first_macro_f1"], out["first_accuracy"] = first["macro_f1"], first["token_accuracy"]
        return out


def stickier(model: Tagger, delta: float) -> None:
    """Add ``delta`` to the score of staying in the same step in a CRF's transitions
    (``train.auto_crf_sticky``): its filtering and its smoothing alike read them."""
    with torch.no_grad():
        model.crf.trans.add_(delta * torch.eye(model.crf.trans.shape[0], dtype=model.crf.trans.dtype,
                                               device=model.crf.trans.device))


def _held_out(model: Tagger, held: Sequence[EncodedSession], device: str, streamable: bool, deltas: Sequence[float]
              ) -> dict[float, tuple[list[np.ndarray], Any]]:
    """A fit's held-out logits (and per-depth logits), with its own transitions (delta 0) and,
    for a CRF, with each of ``deltas`` added to their diagonal; the fit is left as it was."""
    out = {}
    for d in [0.0, *deltas]:
        if d:
            saved = model.crf.trans.detach().clone()
            stickier(model, d)
        out[d] = session_logits(model, held, device), prefix_logits(model, held, device) if streamable else None
        if d:
            with torch.no_grad():
                model.crf.trans.copy_(saved)
    return out


def validate(args: ModelConfig, train: Sequence[EncodedSession], val: Sequence[EncodedSession], cfg: Config,
             *, progress: bool = False, fold_seed: int | None = None, sticky: Sequence[float] = ()) -> Validated:
    """Fit and score on held-out sessions: on ``val`` when given (the split plan), else on
    ``cfg.train.val_folds`` session folds of ``train``, one model per fold with early stopping
    on its held-out part (the folds plan; ``final_fit`` then trains on every session). The
    folds are drawn with ``fold_seed`` (default ``cfg.train.seed``): candidates validated with
    the same one hold out the same sessions, in the same order. A CRF (``arch: crf``) is also
    scored with each of ``sticky``'s stickier transitions (``Validated.sticky``; ``auto`` passes
    ``train.auto_crf_sticky``)."""
    started = time.perf_counter()
    device = pick_device(cfg.train.device)
    streamable = args.lookahead is not None and cfg.train.prefix_calibration
    deltas = [float(d) for d in sticky if d] if args.arch == "crf" else []
    if val or len(train) < 2:
        fit = fit_any(args, train, val, cfg, progress=progress)
        held = list(val) or list(train)
        got = _held_out(fit.model, held, device, streamable, deltas)
        v = Validated(args, cfg, got[0.0][0], [s.labels for s in held], got[0.0][1],
                      fit.best_epoch, [fit.best_epoch], fit, time.perf_counter() - started,
                      list(range(len(held))))
        v.sticky = {d: dataclasses.replace(v, logits=got[d][0], depth_logits=got[d][1], sticky={}) for d in deltas}
        return v
    k = max(2, min(cfg.train.val_folds, len(train)))
    order = np.random.default_rng(cfg.train.seed if fold_seed is None else fold_seed).permutation(len(train))
    variants = [0.0, *deltas]
    oof: dict[float, list[np.ndarray | None]] = {d: [None] * len(train) for d in variants}
    best: list[int] = []
    depth_z: dict[float, list[list[np.ndarray]]] = {d: [] for d in variants}
    depth_y: list[list[np.ndarray]] = []
    for f in range(k):
        held_idx = order[f::k]
        held_set = set(held_idx.tolist())
        train_part = [s for i, s in enumerate(train) if i not in held_set]
        held = [train[i] for i in held_idx]
        fit = fit_any(args, train_part, held, cfg, progress=progress, desc=f"fold {f + 1}/{k}")
        best.append(fit.best_epoch)
        for d, (logits, zy) in _held_out(fit.model, held, device, streamable, deltas).items():
            for i, z in zip(held_idx, logits):
                oof[d][i] = z
            if streamable:
                depth_z[d].append(zy[0])
                if d == 0.0:
                    depth_y.append(zy[1])

    def depth(d: float):
        if not streamable:
            return None
        return ([np.concatenate([z[j] for z in depth_z[d]]) for j in range(len(depth_z[d][0]))],
                [np.concatenate([y[j] for y in depth_y]) for j in range(len(depth_y[0]))])
    epochs = max(1, int(math.ceil(float(np.median(best)))))
    v = Validated(args, cfg, oof[0.0], [s.labels for s in train], depth(0.0), epochs, best, None,
                  time.perf_counter() - started, [int(i) for f in range(k) for i in order[f::k]])
    v.sticky = {d: dataclasses.replace(v, logits=oof[d], depth_logits=depth(d), sticky={}) for d in deltas}
    return v


def _sticky_fit(fit: FitResult, auto_info: dict[str, Any] | None) -> None:
    """A final CRF fit given the stickier transitions ``auto`` chose (``choose_sticky``)."""
    delta = ((auto_info or {}).get("crf_sticky") or {}).get("delta", 0.0)
    if delta and fit.model.args.arch == "crf":
        stickier(fit.model, delta)


def final_fit(v: Validated, train: Sequence[EncodedSession], *, progress: bool = False,
              echo: Callable[[str], None] = print) -> FitResult:
    """The model to ship: the split plan's own fit, or (folds plan) one fit on every training
    session, stopped at the median epoch early stopping chose on the folds."""
    if v.fit is not None:
        return v.fit
    if v.args.arch == "crf":
        echo(f"validated on {len(v.best_epochs)} session folds; final fit on all {len(train)} training sessions")
    else:
        echo(f"validated on {len(v.best_epochs)} session folds (best epochs {v.best_epochs}); final fit on "
             f"all {len(train)} training sessions for {v.epochs} epochs")
    fit = fit_any(v.args, train, [], v.cfg, progress=progress, desc="final fit", stop_after=v.epochs)
    fit.best_epoch = v.epochs
    return fit


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _simplex(m: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Weights for m members on a grid, summing to 1."""
    n = int(round(1 / step))
    return [tuple(c / n for c in combo) for combo in itertools.product(range(n + 1), repeat=m)
            if sum(combo) == n]


def seed_group(name: str) -> str:
    """The candidate a member belongs to: ``bilstm.2`` (the second seed) is ``bilstm``."""
    return name.split(".", 1)[0]


def prior_bias(prior: np.ndarray | None, tau: float) -> np.ndarray | None:
    """The label bias -tau * log(prior) that ``model.arch: auto`` may add to the mixed
    log-probabilities at a depth (logit adjustment, Menon et al. 2021): tau > 0 moves the
    argmax towards rare steps, which macro-F1 weighs as much as common ones; None for 0."""
    if prior is None or tau == 0:
        return None
    return (-tau * np.log(prior)).astype(np.float32)


def training_prior(p: "Prepared", n_labels: int) -> np.ndarray:
    """Each step's share of the labelled training events (add-one smoothed)."""
    counts = 1.0 + label_counts(p.encoded["train"] + p.encoded["val"], n_labels)
    return counts / counts.sum()


def bagged_best(preds: np.ndarray, y: np.ndarray, sessions: np.ndarray, n_labels: int, rank: np.ndarray,
                bags: int, seed: int) -> np.ndarray:
    """Bagged selection (Caruana et al. 2006): for each of ``bags`` bootstrap resamples of
    the held-out sessions, the grid point whose labels ``preds`` (grid, rows) score the best
    top-1 macro-F1 (then accuracy, then ``rank``: the full data's order) on the resample.
    Returns how often each grid point won, as a share. A resample draws whole sessions, so
    the weights are not chosen by a few sessions' events; sums of per-session counts make each
    resample a matrix product instead of a re-count."""
    S, C = int(sessions.max()) + 1, n_labels
    flat = sessions * C
    support = np.bincount(flat + y, minlength=S * C).reshape(S, C).astype(float)
    hit = preds == y
    tp = np.stack([np.bincount(flat[h] + y[h], minlength=S * C) for h in hit]).reshape(len(preds), S, C)
    shown = np.stack([np.bincount(flat + p, minlength=S * C) for p in preds]).reshape(len(preds), S, C)
    rng = np.random.default_rng(seed)
    draws = np.stack([np.bincount(rng.integers(0, S, S), minlength=S) for _ in range(bags)]).astype(float)
    sup = draws @ support                                        # (bags, C)
    tp_b = np.einsum("bs,gsc->bgc", draws, tp)
    den = sup[:, None, :] + np.einsum("bs,gsc->bgc", draws, shown)
    present = sup > 0
    f1 = np.where(present[:, None, :], 2 * tp_b / np.maximum(den, 1e-12), 0.0).sum(-1) / present.sum(-1)[:, None]
    acc = tp_b.sum(-1) / sup.sum(-1)[:, None]
    wins = np.zeros(len(preds))
    for b in range(bags):
        best = np.lexsort((rank, np.round(acc[b], 12), np.round(f1[b], 12)))[-1]
        wins[best] += 1
    return wins / bags


def choose_mixture(results: dict[str, Validated], names: Sequence[str], prior: np.ndarray | None = None,
                   taus: Sequence[float] = (0.0,), bags: int = 0, seed: int = 0) -> dict[str, Any]:
    """``model.arch: auto``: how to combine the validated candidates, per visible depth
    k = 0..L: the weights (a 0.1 grid, summing to 1; one-hot means one model alone) whose
    weighted sum of held-out log-probabilities scores the best top-1 macro-F1 (then accuracy;
    then the mean log-likelihood of the true labels, so that ties of two candidates that are
    both perfect go to the surer one; then the weights nearest the first candidate). A
    candidate trained with several seeds (``bilstm``, ``bilstm.2``, ...: ``train.ensemble_seeds``)
    is their mean log-probability; its weight is shared equally among them. Held-out rows line
    up across candidates: they were validated on the same folds.

    With ``prior`` (each step's training share) the depth's weights are followed by a label
    bias ``prior_bias(prior, tau)``, tau from ``taus`` by the same score (the smallest tau on
    ties, so 0 unless a bias scores better); any tau > 0 makes the result a ``Mixture``.

    A candidate for the label on arrival (``bilstm_causal``: ``config.arrival_only``) is
    weighed at k = 0 only (unless L is 0, where arrival is final).

    With ``bags`` > 0 (``train.auto_bags``) a depth's weights are instead the mean of the best
    grid weights on that many bootstrap resamples of the held-out sessions (``bagged_best``)."""
    members = list(results)
    groups: dict[str, list[str]] = {}
    for m in members:
        groups.setdefault(seed_group(m), []).append(m)
    archs = list(groups)
    first = results[members[0]]
    # members may read different spans (``model.network_lookahead``): the mixture's is the longest
    L = longest_lookahead(v.args.lookahead for v in results.values())
    depths = list(range(L + 1)) if (L is not None and all(v.depth_logits for v in results.values())) else []
    # a candidate named for the label on arrival (``bilstm_causal``) is weighed at k = 0 only,
    # so it never pulls a label that has seen later events back towards the arrival view
    arrival = [bool(L) and arrival_only(a) for a in archs]
    full_grid = _simplex(len(archs))
    later_grid = [w for w in full_grid if not any(wi > 0 and ar for wi, ar in zip(w, arrival))] or full_grid

    def score(zs, y, w, tau=0.0):
        keep = y != IGNORE
        z = sum(wi * zi[keep] for wi, zi in zip(w, zs) if wi > 0)
        bias = prior_bias(prior, tau)
        if bias is not None:
            z = z + bias
        cls = classification_metrics(y[keep], z.argmax(-1), list(names))
        # ties (two candidates both perfect on held-out events, say) go to the likelier one
        loglik = float(_log_softmax(z)[np.arange(len(z)), y[keep]].mean()) if len(z) else 0.0
        return cls["macro_f1"] or 0.0, cls["token_accuracy"] or 0.0, loglik

    rows = []
    for k in depths or [None]:
        final = k is None or k == L               # final labels: every held-out event
        grid = full_grid if k == 0 else later_grid
        y = np.concatenate(first.labels) if final else first.at_depth(k)[1]
        for m in members:
            got = np.concatenate(results[m].labels) if final else results[m].at_depth(k)[1]
            if not np.array_equal(got, y):
                raise AssertionError(f"held-out rows of {m} do not line up with {members[0]}'s")

        def member_z(m: str) -> np.ndarray:
            return _log_softmax(np.concatenate(results[m].logits) if final else results[m].at_depth(k)[0])
        zs = [sum(member_z(m) for m in groups[a]) / len(groups[a]) for a in archs]
        singles = {a: score(zs, y, tuple(float(i == j) for j in range(len(archs))))
                   for i, a in enumerate(archs)}
        scored = {w: score(zs, y, w) for w in grid}
        ranked = sorted(grid, key=lambda w: (*scored[w], w))      # worst to best
        best = ranked[-1]
        if bags and (y != IGNORE).any():
            keep = y != IGNORE
            place = {w: i for i, w in enumerate(ranked)}
            rank = np.array([place[w] for w in grid], dtype=float)
            preds = np.stack([sum(wi * zi[keep] for wi, zi in zip(w, zs) if wi > 0).argmax(-1) for w in grid])
            share = bagged_best(preds, y[keep], first.sessions_at(None if final else k)[keep], len(names),
                                rank, bags, seed + (0 if k is None else k))
            best = tuple(float(x) for x in np.round(share @ np.asarray(grid), 6))
            scored[best] = score(zs, y, best)
        # then the label bias for these weights: a larger tau only when it scores better
        tau_scores = {t: (scored[best] if t == 0 else score(zs, y, best, t)) for t in taus}
        tau = max(tau_scores, key=lambda t: (*tau_scores[t][:2], -abs(t)))
        rows.append({"k": k if k is not None else L,
                     "weights": {m: best[archs.index(seed_group(m))] / len(groups[seed_group(m)]) for m in members},
                     "tau": tau, "macro_f1": tau_scores[tau][0], "accuracy": tau_scores[tau][1],
                     "loglik": tau_scores[tau][2], "macro_f1_unbiased": scored[best][0],
                     "alone": {a: {"macro_f1": f, "accuracy": acc} for a, (f, acc, _) in singles.items()}})
    weights = [[r["weights"][m] for m in members] for r in rows]
    used = [m for i, m in enumerate(members) if any(w[i] > 0 for w in weights)]
    biased = any(r["tau"] for r in rows)
    return {"candidates": {a: _group_scores([results[m] for m in groups[a]], names) for a in archs},
            "depths": rows, "members": used, "chosen": used[0] if len(used) == 1 and not biased else "mixture",
            "prior": [float(x) for x in prior] if biased else None,
            "criterion": "held-out top-1 macro-F1 per visible depth, weights on a 0.1 grid"
                         + (f" (the mean of the best on {bags} bootstrap resamples of sessions)" if bags else "")
                         + ", then a prior bias"}


def clock_verdict(info: dict[str, Any]) -> dict[str, Any] | None:
    """``data.time_of_day: auto``: whether the time of day earns a place in ``auto``'s mixture.
    ``crf_clock`` is the causal ``crf`` with it; it is kept when its held-out top-1 macro-F1
    alone, averaged over the depths, is above ``crf``'s: the clock told steps apart on
    sessions it was not fit on. Otherwise the mixture is chosen without it, so that a log
    whose steps keep no hours gives it no weight at all, not the small weights that a grid
    search over one more candidate finds by chance on a few held-out sessions (on the
    window-focus profile 0.1 at every depth, with crf_clock alone under crf at each).
    None when ``crf`` or ``crf_clock`` was not validated."""
    rows = info["depths"]
    if not rows or any(a not in rows[0]["alone"] for a in (CLOCK_CANDIDATE, "crf")):
        return None
    clock, plain = (float(np.mean([r["alone"][a]["macro_f1"] for r in rows])) for a in (CLOCK_CANDIDATE, "crf"))
    return {"kept": clock > plain, CLOCK_CANDIDATE: clock, "crf": plain}


def _group_scores(vs: Sequence[Validated], names: Sequence[str]) -> dict[str, Any]:
    """``Validated.scores`` of a candidate trained with one or more seeds (mean log-probabilities)."""
    if len(vs) == 1:
        return vs[0].scores(names)
    first = vs[0]

    def mean(zs: Sequence[np.ndarray]) -> np.ndarray:
        return sum(_log_softmax(z) for z in zs) / len(zs)
    depth = None
    if all(v.depth_logits for v in vs):
        depth = ([mean([v.depth_logits[0][d] for v in vs]) for d in range(len(first.depth_logits[0]))],
                 first.depth_logits[1])
    joint = dataclasses.replace(first, logits=[mean([v.logits[j] for v in vs]) for j in range(len(first.logits))],
                                depth_logits=depth, seconds=sum(v.seconds for v in vs))
    return {**joint.scores(names), "seeds": len(vs)}


def auto_table(info: dict[str, Any]) -> list[str]:
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    lines = ["model.arch auto: validated " + ", ".join(
        f"{a}" + (f" x{r['seeds']} seeds" if r.get("seeds") else "") + f" ({r['seconds']:.0f} s)"
        for a, r in info["candidates"].items())
        + "; held-out top-1 macro-F1 by visible later events k, each alone and combined:"]
    archs = list(info["candidates"])
    for r in info["depths"]:
        alone = ", ".join(f"{a} {f(r['alone'][a]['macro_f1'])}" for a in archs)
        group = {a: sum(w for m, w in r["weights"].items() if seed_group(m) == a) for a in archs}
        w = " + ".join(f"{group[a]:.1f} {a}" for a in archs if group[a] > 0)
        tau = f"; prior bias tau {r['tau']:g} (without it {f(r['macro_f1_unbiased'])})" if r.get("tau") else ""
        lines.append(f"  k={r['k']}: {alone}; combined {f(r['macro_f1'])} ({w}{tau})")
    if clock := info.get("clock"):
        lines.append(f"  time of day (data.time_of_day auto): {CLOCK_CANDIDATE} alone {f(clock[CLOCK_CANDIDATE])} "
                     f"against crf {f(clock['crf'])}, mean over k: "
                     + ("weighed above" if clock["kept"] else f"left out (the weights above are without {CLOCK_CANDIDATE})"))
    if sticky := info.get("crf_sticky"):
        lines.append("  CRF transitions + delta on staying in a step (train.auto_crf_sticky), final labels' "
                     "macro-F1: " + ", ".join(f"{d} {f(r['macro_f1'])}" for d, r in sticky["final"].items())
                     + f" -> {sticky['delta']:g}")
    lines.append(f"  -> {info['chosen']}" + (f" of {', '.join(info['members'])}" if info["chosen"] == "mixture" else ""))
    return lines


def choose_sticky(results: dict[str, Validated], info: dict[str, Any],
                  choose: Callable[[dict[str, Validated]], dict[str, Any]], deltas: Sequence[float]
                  ) -> tuple[dict[str, Validated], dict[str, Any]]:
    """``train.auto_crf_sticky``: the mixture chosen again (``choose``) with the CRF
    candidates' held-out logits at each delta (``Validated.sticky``), and the delta whose
    mixture scores the best held-out top-1 macro-F1 on final labels (then accuracy; the
    smallest delta on ties). Returns those validations and that mixture's info, with
    ``crf_sticky``: the delta and each one's final-label scores. ``info`` is delta 0's."""
    tried = {0.0: (results, info)}
    for d in deltas:
        if d:
            rs = {m: v.sticky.get(float(d), v) for m, v in results.items()}
            tried[float(d)] = (rs, choose(rs))

    def final(d: float) -> tuple[float, float]:
        row = tried[d][1]["depths"][-1]
        return row["macro_f1"], row["accuracy"]
    best = max(tried, key=lambda d: (*final(d), -d))
    rs, chosen = tried[best]
    chosen = {**chosen, "crf_sticky": {"delta": best, "final": {
        f"{d:g}": {"macro_f1": final(d)[0], "accuracy": final(d)[1]} for d in tried}}}
    return rs, chosen


def build_mixture(info: dict[str, Any], results: dict[str, Validated], fits: dict[str, FitResult]):
    """The ``Mixture`` of the final fits with the chosen weights, and its held-out logits
    (full lookahead per session, and per depth) for calibration."""
    members = info["members"]
    W = np.asarray([[r["weights"][a] for a in members] for r in info["depths"]])
    prior = None if info.get("prior") is None else np.asarray(info["prior"])
    n_labels = fits[members[0]].model.args.n_labels
    # (depths, labels): each depth's label bias, zeros where its tau is 0
    B = np.zeros((len(W), n_labels), np.float32)
    for k, r in enumerate(info["depths"]):
        b = prior_bias(prior, r.get("tau", 0.0))
        if b is not None:
            B[k] = b
    L = longest_lookahead(fits[a].model.args.lookahead for a in members)
    if len(W) == 1 and L:                       # no per-depth held-out logits (prefix calibration
        W, B = np.repeat(W, L + 1, 0), np.repeat(B, L + 1, 0)   # off): the final ones at every depth
    elif L is not None and len(W) > L + 1:      # the members kept read less far than the longest
        W, B = np.concatenate([W[:L], W[-1:]]), np.concatenate([B[:L], B[-1:]])   # candidate: final at L
    model = Mixture(MixtureConfig([fits[a].model.args.to_args() for a in members], W.tolist(),
                                  B.tolist() if B.any() else None))
    for m, a in zip(model.members, members):
        m.load_state_dict(fits[a].model.state_dict())
    model.eval()
    L = len(W) - 1
    logits = []
    for j in range(len(results[members[0]].logits)):
        d = np.minimum(L, np.arange(len(results[members[0]].logits[j]) - 1, -1, -1))  # a session's
        logits.append(sum(W[d, i:i + 1] * _log_softmax(results[a].logits[j])           # tail has fewer
                          for i, a in enumerate(members)) + B[d])                       # later events
    depth = None
    if all(results[a].depth_logits for a in members):
        depth = ([sum(W[k, i] * _log_softmax(results[a].at_depth(k)[0]) for i, a in enumerate(members))
                  + B[k] for k in range(L + 1)], [results[members[0]].at_depth(k)[1] for k in range(L + 1)])
    return model, logits, depth


NLL_CAP = 12.0  # nats: an event whose label the model all but rules out stops pulling T


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): one scalar in [0.05, 20] minimising validation
    NLL, each event's NLL capped at ``NLL_CAP``. The cap matters with few sessions: a step
    that only appears on held-out days gets ~0 probability from every model, and plain NLL
    would then flatten all confidences to make room for it."""
    from scipy.optimize import minimize_scalar
    keep = labels != IGNORE
    if keep.sum() < 2:
        return 1.0
    z = torch.tensor(logits[keep], dtype=torch.float64)
    y = torch.tensor(labels[keep], dtype=torch.long)

    def loss(log_t: float) -> float:
        nll = torch.nn.functional.cross_entropy(z / math.exp(log_t), y, reduction="none")
        return float(nll.clamp(max=NLL_CAP).mean())

    res = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded",
                          options={"xatol": 1e-3})
    t = math.exp(res.x)
    return t if np.isfinite(t) else 1.0


def prefix_logits(model: Tagger, sessions: Sequence[EncodedSession], device: str, parallel: int = 64
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Replay sessions through ``Tagger.step`` as the live worker does and collect, per
    visible-future depth k = 0..L, the logits each event had when k later events were
    visible, with its labels: ``(logits[k] (m_k, C), labels[k] (m_k,))``, rows in session
    order, then position order (whichever way they are computed, so that the rows of two
    models line up). Depth L is the final (offline) output."""
    L = model.args.lookahead
    if L is None:
        raise ValueError("prefix logits need a bounded lookahead")
    model.eval()
    if model.depth_exact:
        return _depth_logits(model, sessions, device)
    z: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    y: list[list[int]] = [[] for _ in range(L + 1)]
    keys: list[list[tuple[int, int]]] = [[] for _ in range(L + 1)]
    for g in range(0, len(sessions), parallel):
        group = sessions[g:g + parallel]
        states = [model.init_state(device) for _ in group]
        for t in range(max(len(s) for s in group)):
            idx = [i for i, s in enumerate(group) if t < len(s)]
            batch = collate([group[i].rows(t, t + 1) for i in idx], device)
            batch.pop("lengths")
            new, outs = model.step([states[i] for i in idx], batch)
            for i, st, o in zip(idx, new, outs):
                states[i] = st
                v = len(o)
                for j in range(v):
                    k = v - 1 - j                                      # later events visible
                    z[k].append(o[j])
                    y[k].append(int(group[i].labels[t - k]))
                    keys[k].append((g + i, t - k))
    C = model.args.n_labels
    order = [sorted(range(len(kk)), key=kk.__getitem__) for kk in keys]
    return ([torch.stack([zk[i] for i in o]).float().cpu().numpy() if zk else np.zeros((0, C), np.float32)
             for zk, o in zip(z, order)],
            [np.asarray([yk[i] for i in o], dtype=np.int64) for yk, o in zip(y, order)])


def _depth_logits(model: Tagger, sessions: Sequence[EncodedSession], device: str, batch_size: int = 16
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``prefix_logits`` by whole-session forward passes, one per depth k with every position
    seeing k events ahead (exactly what ``step`` shows then, for a ``depth_exact`` model):
    L + 1 batched passes instead of one step per event."""
    L = model.args.lookahead
    z: list[list[np.ndarray]] = [[] for _ in range(L + 1)]
    y: list[list[np.ndarray]] = [[] for _ in range(L + 1)]
    with torch.no_grad():
        for g in range(0, len(sessions), batch_size):
            group = sessions[g:g + batch_size]
            batch = collate(group, device)
            for k in range(L + 1):
                batch["horizon"] = torch.full(batch["event"].shape[:2], k, dtype=torch.long, device=device)
                logits, _ = model(batch)
                for i, s in enumerate(group):
                    n = len(s) - k                                     # depth k exists before the end
                    if n > 0:
                        z[k].append(logits[i, :n].float().cpu().numpy())
                        y[k].append(s.labels[:n])
    C = model.args.n_labels
    return ([np.concatenate(zk) if zk else np.zeros((0, C), np.float32) for zk in z],
            [np.concatenate(yk) if yk else np.zeros(0, np.int64) for yk in y])


def prefix_calibration(model: Tagger, held: Sequence[EncodedSession], cfg: Config, temperature: float,
                       threshold: float, device: str, labels: Sequence[str] | None = None) -> dict[str, Any]:
    """A temperature and a threshold per visible-future depth k (0..L), fit on the held-out
    sessions' prefix-time logits: what the live worker emits before an event is final is
    less certain than the offline output, and should be calibrated on that. Depth L keeps the
    full-lookahead temperature and threshold, so final labels stay equal to offline ones."""
    z, y = prefix_logits(model, held, device)
    return calibrate_depths(z, y, cfg, temperature, threshold, labels)


def guarantee_sessions(cfg: Config, sessions: np.ndarray | None, keep: np.ndarray) -> np.ndarray | None:
    """Each kept held-out row's session for the precision bound (``train.guarantee_over:
    sessions``), or None: the bound treats events as independent."""
    if sessions is None or cfg.train.guarantee_over != "sessions":
        return None
    sessions = np.asarray(sessions)
    if sessions.shape != keep.shape:
        raise ValueError(f"{sessions.size} session ids for {keep.size} held-out rows")
    return sessions[keep]


def calibrate_depths(z: Sequence[np.ndarray], y: Sequence[np.ndarray], cfg: Config, temperature: float,
                     threshold: float, labels: Sequence[str] | None = None,
                     sessions: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
    """``prefix_calibration`` on collected per-depth logits (``prefix_logits``); also scores
    each depth: top-1 accuracy and macro-F1 (abstention ignored) and coverage at the
    precision target, the figures a live consumer cares about. ``sessions``: per depth, each
    row's held-out session (``guarantee_sessions``)."""
    temps, thrs, cover, depths = [], [], [], []
    for k, (zk, yk) in enumerate(zip(z, y)):
        keep = yk != IGNORE
        groups = guarantee_sessions(cfg, None if sessions is None else sessions[k], keep)
        if k == len(z) - 1:
            t_k, thr_k = temperature, threshold
            probs = softmax_t(zk[keep], t_k)
            cov = float((probs.max(-1) >= thr_k).mean()) if keep.any() else None
        else:
            t_k = fit_temperature(zk, yk)
            probs = softmax_t(zk[keep], t_k)
            chosen = choose_threshold(probs.argmax(-1) == yk[keep], probs.max(-1), cfg.train.precision_target,
                                      cfg.train.guarantee_confidence, method="binomial", sessions=groups)
            thr_k, cov = chosen["threshold"], chosen["coverage"]
        temps.append(float(t_k))
        thrs.append(float(thr_k))
        cover.append(cov)
        names = list(labels) if labels is not None else [str(i) for i in range(zk.shape[1])]
        cls = classification_metrics(yk[keep], probs.argmax(-1), names) if keep.any() else {}
        depths.append({"k": k, "events": int(keep.sum()), "top1_accuracy": cls.get("token_accuracy"),
                       "top1_macro_f1": cls.get("macro_f1"), "coverage": cov,
                       "feasible": bool(thr_k <= 1.0)})
    return {"prefix_temperatures": temps, "prefix_thresholds": thrs, "prefix_coverage": cover,
            "depths": depths}


def first_and_final(logits: Sequence[np.ndarray], depth0: np.ndarray, order: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Held-out depth-0 logits (concatenated in ``order`` of sessions, every position) lined
    up with the full-lookahead logits (``logits[i]`` per session): (first (n, C), final (n, C)),
    rows in session order. A session's last positions have their session-end output as final."""
    sizes = [len(logits[i]) for i in order]
    parts = np.split(depth0, np.cumsum(sizes)[:-1])
    by_session = dict(zip(order, parts))
    first = np.concatenate([by_session[i] for i in range(len(logits)) if i in by_session])
    final = np.concatenate([logits[i] for i in range(len(logits)) if i in by_session])
    return first, final


# stable policy: the bounds tried on the confidence of a final label kept because it agrees
# with the one shown on arrival (threshold - m; inf: any). On the window-focus profile the
# unbounded agreement missed the precision target on held-out events, so the final label
# alone decided: 98% of the labels shown on arrival agreed with the final one, yet 8% of
# all events had theirs withdrawn at the end, 81% of those agreeing (docs/ablation.md)
AGREE_MARGINS = (math.inf, 0.3, 0.2, 0.1, 0.05)


def stable_policy(first_logits: np.ndarray, final_logits: np.ndarray, labels: np.ndarray, cfg: Config,
                  t_first: float, t_final: float, plain_threshold: float,
                  sessions: np.ndarray | None = None) -> dict[str, Any]:
    """The abstention policy the worker serves (``calibration.policy: stable``): a label (or
    an abstention) is shown on arrival and revised at most once, when it becomes final.

    - On arrival an event is labelled when its depth-0 confidence reaches ``first_threshold``,
      set so that labels are shown on arrival about as often as they will be in the end (the
      held-out share of events whose final confidence reaches the plain threshold): a first
      label then rarely has to be withdrawn, and few are added late.
    - Finally an event keeps a label when its full-lookahead confidence reaches ``threshold``,
      or when it was labelled on arrival and the final label agrees with that first label:
      two views that agree. ``threshold`` is chosen on held-out events for the precision
      target (one-sided Clopper-Pearson bound, as everywhere) over the union of both.
    - Every event whose first record differs from its final one (a label withdrawn or changed,
      or an abstention later filled in) is one revision. When the held-out share of revised
      events could exceed what ``train.max_edit_overhead`` allows (its one-sided upper bound at
      ``guarantee_confidence``, over held-out sessions as the precision's, since a day's
      revisions come together; edit overhead = r / (1 + r) for a revised share r), the first
      threshold moves to the one that shows the most labels on arrival within that budget
      (with ``train.edit_overhead_final`` the final threshold may rise too, above the
      precision target's, so that fewer labels are filled in late: the pair that keeps the most
      final labels within the budget, then shows the most on arrival); if none is within it,
      the first threshold moves to the one with the fewest revisions.

    The agreement may be bounded (``agreement_margin`` m, one of ``AGREE_MARGINS``): an
    agreeing final label is then kept only when its confidence reaches ``threshold - m``, so
    that the low-confidence agreements, the least precise, are not what makes the union miss
    the target. The margin with the fewest held-out revisions is taken (None: unbounded).
    When no threshold reaches the target over that union at any margin (the two views agree
    on too many wrong labels), ``agreement`` is False: the final label is kept only at the
    plain threshold, and the event is still revised at most once. ``policy: plain`` (each depth's
    own threshold, the label may change at every depth) is returned only when the plain
    threshold covers nothing."""
    keep = labels != IGNORE
    groups = guarantee_sessions(cfg, sessions, keep)
    p0 = softmax_t(first_logits[keep], t_first)
    pL = softmax_t(final_logits[keep], t_final)
    y = labels[keep]
    c0, a0, cL, aL = p0.max(-1), p0.argmax(-1), pL.max(-1), pL.argmax(-1)
    plain = {"policy": "plain", "threshold": plain_threshold}
    coverage = float((cL >= plain_threshold).mean()) if len(cL) else 0.0
    if not len(cL) or coverage == 0.0:
        return {**plain, "first_threshold": ABSTAIN_ALL, "first_coverage": 0.0}

    def at(first_thr: float, margin: float | None, final_thr: float | None = None) -> dict[str, Any] | None:
        # margin None: no agreement; math.inf: every agreeing final label is kept; m: those
        # whose confidence reaches threshold - m (an agreeing event scores cL + m)
        shown = c0 >= first_thr
        if margin is not None:
            agree = shown & (a0 == aL)
            score = np.where(agree, 2.0 if math.isinf(margin) else cL + margin, cL)
            chosen = choose_threshold(aL == y, score, cfg.train.precision_target,
                                      cfg.train.guarantee_confidence, method="binomial", sessions=groups)
            if not chosen["feasible"] or (not math.isinf(margin) and chosen["threshold"] > ABSTAIN_ALL):
                return None
            threshold = min(chosen["threshold"], ABSTAIN_ALL)
        else:
            agree = np.zeros_like(shown)
            threshold = plain_threshold
        if final_thr is not None:          # a higher final threshold: fewer labels filled in late
            if final_thr <= threshold:
                return None
            threshold = final_thr
        if margin is not None and not math.isinf(margin):
            agree &= cL >= threshold - margin
        covered = agree | (cL >= threshold)
        right, m = int((aL == y)[covered].sum()), int(covered.sum())
        lower = float(precision_lower(aL == y, covered, groups, cfg.train.guarantee_confidence)) if m else None
        if final_thr is not None and (lower is None or lower < cfg.train.precision_target):
            return None
        revised = (shown != covered) | (shown & covered & (a0 != aL))
        n, r = len(revised), int(revised.sum())
        return {"policy": "stable", "agreement": margin is not None,
                "agreement_margin": None if margin is None or math.isinf(margin) else float(margin),
                "first_threshold": float(first_thr),
                "threshold": threshold, "first_coverage": float(shown.mean()),
                "first_precision": float((a0 == y)[shown].mean()) if shown.any() else None,
                "coverage": float(covered.mean()), "precision": right / m if m else None,
                "lower_bound": lower, "revised_share": r / n,
                # revisions come by the day as wrong labels do: bounded over the same sessions
                "revised_upper": 1.0 - precision_lower(~revised, np.ones(n, dtype=bool), groups,
                                                       cfg.train.guarantee_confidence)}

    def cut(conf: np.ndarray, share: float) -> float:
        """The threshold that shows ``share`` of the held-out events: a hair below the held-out
        confidence it is read at, as ``choose_threshold``'s. An event that looks like a held-out
        one can come out equal to that confidence, and float rounding (a live round sums in
        another order than an offline pass) would then decide whether it is shown, and so
        whether its final label is kept: 3 of gen's 5,233 events were."""
        return float(np.quantile(conf, 1.0 - share, method="higher")) - THRESHOLD_MARGIN

    budget = cfg.train.max_edit_overhead
    budget = budget / (1.0 - budget) if budget < 1.0 else float("inf")   # as a revised share
    start = cut(c0, coverage)
    # agreement needs the events whose two views agree (down to threshold - margin) to be
    # precise enough; the margin with the fewest revisions is taken, and when none is, the
    # final label alone decides (at its plain threshold), still revised at most once
    agreeing = [o for m in AGREE_MARGINS if (o := at(start, m)) is not None]
    best = (min(agreeing, key=lambda o: (o["revised_share"], -o["coverage"])) if agreeing
            else at(start, None))
    best["first_rule"] = "coverage"
    if best["revised_upper"] > budget:
        # a grid of first thresholds by the share of events they show, 0 (ABSTAIN_ALL) to 1,
        # and of final thresholds at or above the precision target's, by the share they keep
        grid = [ABSTAIN_ALL] + [cut(c0, q) for q in np.linspace(0.02, 1.0, 50)]
        finals = [None] + (sorted({cut(cL, q * coverage) for q in np.linspace(0.05, 0.95, 19)})
                           if cfg.train.edit_overhead_final else [])
        options = {ft: [o for t in grid for m in AGREE_MARGINS + (None,)
                        if (o := at(t, m, ft)) is not None] for ft in finals}
        within = [o for opts in options.values() for o in opts if o["revised_upper"] <= budget]
        # within the budget the most labels shown: on arrival (then in the end) when only the
        # first threshold moves; in the end (then on arrival) when the final one may too, so
        # final labels are withheld only as far as the budget needs (wf: coverage 0.235
        # against 0.211 for the most labels on arrival and in the end together; 5-fold CV).
        # None within it: the fewest revisions at the precision target's own final threshold
        # (a higher one would only trade labels away without reaching the budget)
        most = ((lambda o: (o["coverage"], o["first_coverage"])) if cfg.train.edit_overhead_final
                else (lambda o: (o["first_coverage"], o["coverage"])))
        pick = (max(within, key=most) if within else min(options[None], key=lambda o: o["revised_share"]))
        if pick["revised_share"] < best["revised_share"]:
            best = {**pick, "first_rule": "edit_overhead" if within else "fewest_revisions"}
    return best


def depth_summary(depths: Sequence[dict[str, Any]], target: float) -> list[str]:
    """Lines for the training log: per depth k the top-1 scores and coverage, and one line
    naming the depths at which nothing reaches the precision target (they will abstain)."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    lines = ["labels by visible later events k (validation): " + "; ".join(
        f"k={d['k']}: top-1 acc {f(d['top1_accuracy'])}, macro-F1 {f(d['top1_macro_f1'])}, "
        f"coverage {f(d['coverage'])}" for d in depths)]
    bad = [d["k"] for d in depths if not d["feasible"]]
    if bad:
        lines.append(f"warning: at k = {', '.join(map(str, bad))} no confidence reaches precision {target} "
                     f"on validation: labels shown at {'that depth' if len(bad) == 1 else 'those depths'} "
                     f"will abstain (lower train.precision_target, or add labelled sessions)")
    return lines


# ------------------------------------------------------------------------------------------
# The `tagger train` pipeline
# ------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A loaded log split by session and encoded with encoders fit on the training part."""

    frame: Any
    encoder: FeatureEncoder
    label_map: LabelMap
    splits: dict[str, list[str]]                     # split -> session ids
    encoded: dict[str, list[EncodedSession]]         # split -> encoded sessions
    base_dir: Path
    fingerprint: str
    load_summary: str


def prepare(data_path: str | Path, cfg: Config, *, skip_bad_rows: bool = False,
            text_embedder=None) -> Prepared:
    data_path = Path(data_path)
    frame, report = read_events(data_path, require_label=True, skip_bad_rows=skip_bad_rows,
                                numeric_columns=cfg.data.num_features)
    return prepare_frame(frame, cfg, base_dir=data_path.parent, fingerprint=fingerprint(data_path),
                         load_summary=report.summary(), text_embedder=text_embedder)


FOLDS_BELOW = 60  # train.validation "auto": session folds below this many training sessions


def validation_plan(n_sessions: int, cfg: Config) -> str:
    """How a network is validated: ``split`` (early stopping and calibration on the
    data.val_size validation sessions) or ``folds`` (on each of train.val_folds folds of the
    training sessions in turn; the final model is fit on all of them for the median chosen
    epoch and calibrated on the folds' held-out predictions). Few sessions make one
    validation split too small to stop or calibrate on, so ``auto`` takes folds then."""
    v = cfg.train.validation
    if v == "auto":
        v = "folds" if n_sessions < FOLDS_BELOW else "split"
    if v == "folds" and n_sessions < 2:
        v = "split"
    return v


def prepare_frame(frame, cfg: Config, *, base_dir: Path, fingerprint: str, load_summary: str = "",
                  test_size: float | None = None, text_embedder=None) -> Prepared:
    """Split a loaded (canonical) frame by session and encode it with encoders fit on the
    training part. ``test_size`` overrides ``data.test_size`` (``tagger cv`` passes 0: the
    fold's held-out sessions are its test set)."""
    test_size = cfg.data.test_size if test_size is None else test_size
    tr, va, te = split_sessions(frame, test_size, cfg.data.val_size, cfg.train.seed)
    if validation_plan(len(tr) + len(va), cfg) == "folds":
        tr, va = tr + va, []                     # held-out folds of the training sessions instead
    splits = {"train": tr, "val": va, "test": te}
    encoder = FeatureEncoder.fit(frame[frame["session_id"].isin(set(tr))], cfg.data,
                                 text_embedder=text_embedder)
    label_map = LabelMap(sorted(frame["step_name"].unique()))
    sids, enc = encoder.transform_frame(frame, label_map, base_dir=base_dir)
    by_id = dict(zip(sids, enc))
    encoded = {name: [by_id[s] for s in ids] for name, ids in splits.items()}
    return Prepared(frame, encoder, label_map, splits, encoded, base_dir, fingerprint, load_summary)


def calibrate(logits: Sequence[np.ndarray], labels: Sequence[np.ndarray], cfg: Config
              ) -> tuple[float, dict[str, Any]]:
    """Temperature on held-out logits, then the abstention threshold for the precision target."""
    z = np.concatenate(logits) if logits else np.zeros((0, 1))
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    keep = y != IGNORE
    temperature = fit_temperature(z, y)
    probs = softmax_t(z[keep], temperature)
    correct = probs.argmax(-1) == y[keep]
    sessions = guarantee_sessions(cfg, np.repeat(np.arange(len(labels)), [len(x) for x in labels]), keep)
    chosen = choose_threshold(correct, probs.max(-1), cfg.train.precision_target,
                              cfg.train.guarantee_confidence, method="binomial", sessions=sessions)
    return temperature, chosen


def train(data_path: str | Path, out_dir: str | Path, cfg: Config, *, progress: bool = True,
          skip_bad_rows: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, calibrate and score a model; write the artifact folder. Returns the metrics."""
    started = time.perf_counter()
    p = prepare(data_path, cfg, skip_bad_rows=skip_bad_rows)
    echo(p.load_summary)
    return train_prepared(p, out_dir, cfg, progress=progress, echo=echo, started=started)


def train_prepared(p: Prepared, out_dir: str | Path, cfg: Config, *, progress: bool = True,
                   echo: Callable[[str], None] = print, started: float | None = None) -> dict[str, Any]:
    """The part of ``train`` after loading: fit, calibrate, score the test split (if any),
    write the artifact. ``tagger cv`` calls it once per fold and architecture."""
    started = time.perf_counter() if started is None else started
    echo(f"sessions: {len(p.splits['train'])} train, {len(p.splits['val'])} validation, "
         f"{len(p.splits['test'])} test; {len(p.label_map)} steps")
    arch = cfg.model.arch
    hpo_info: dict[str, Any] | None = None
    auto_info: dict[str, Any] | None = None
    depth_logits = None
    depth_order = None
    layout: Validated | None = None           # whose held-out rows the per-depth logits follow
    if arch == "logreg":
        return _train_baseline(p, out_dir, cfg, started, echo)
    if cfg.train.hpo.enabled:
        if arch == "auto":
            raise ConfigError("train.hpo needs one architecture; set model.arch (not auto)")
        hpo_info = search(p, cfg, progress=progress, echo=echo)
        cfg = hpo_info.pop("config")
        args = model_args(p.encoder.spec(), len(p.label_map), cfg)
        fit = fit_model(args, p.encoded["train"] + p.encoded["val"], [], cfg,
                        epochs=hpo_info["epochs"], progress=progress, desc="final fit (train+val)")
        cal_logits, cal_labels = hpo_info.pop("oof_logits"), hpo_info.pop("oof_labels")
    else:
        archs = auto_candidates(cfg, p.encoder) if arch == "auto" else [arch]
        sessions = _sessions_by_arch(p, cfg, archs)
        results: dict[str, Validated] = {}
        for a in archs:
            model = cfg.model.candidate(a)
            for i in range(1 if model["arch"] == "crf" else cfg.train.ensemble_seeds):   # CRFsuite is deterministic
                acfg = cfg.replace(model=model, train={"seed": cfg.train.seed + i})
                results[a if i == 0 else f"{a}.{i + 1}"] = validate(
                    model_args(p.encoder.spec(), len(p.label_map), acfg, read_clock=a == CLOCK_CANDIDATE),
                    *sessions[a], acfg, progress=progress, fold_seed=cfg.train.seed,
                    sticky=cfg.train.auto_crf_sticky if arch == "auto" else ())
        if arch == "auto" or len(results) > 1:
            def choose(rs: dict[str, Validated]) -> dict[str, Any]:
                return choose_mixture(rs, p.label_map.labels, training_prior(p, len(p.label_map)),
                                      cfg.train.auto_prior_taus, cfg.train.auto_bags, cfg.train.seed)
            auto_info = choose(results)
            clock = clock_verdict(auto_info)
            if clock is not None and not clock["kept"]:
                results = {m: v for m, v in results.items() if seed_group(m) != CLOCK_CANDIDATE}
                auto_info = choose(results)
            if any(v.sticky for v in results.values()):
                results, auto_info = choose_sticky(results, auto_info, choose, cfg.train.auto_crf_sticky)
            if clock is not None:
                auto_info["clock"] = clock
            for line in auto_table(auto_info):
                echo(line)
            arch = auto_info["chosen"]
        if arch == "mixture":
            fits = {a: final_fit(results[a], sessions[seed_group(a)][0], progress=progress, echo=echo)
                    for a in auto_info["members"]}
            for f_ in fits.values():
                _sticky_fit(f_, auto_info)
            model, cal_logits, depth_logits = build_mixture(auto_info, results, fits)
            layout = results[auto_info["members"][0]]     # whose held-out rows the mixture's follow
            cal_labels, depth_order = layout.labels, layout.depth_order
            fit = FitResult(model, max(f.best_epoch for f in fits.values()), [],
                            sum(f.seconds for f in fits.values()))
        else:
            v = results[arch]
            cfg = v.cfg
            fit = final_fit(v, sessions[seed_group(arch)][0], progress=progress, echo=echo)
            _sticky_fit(fit, auto_info)
            cal_logits, cal_labels, depth_logits = v.logits, v.labels, v.depth_logits
            depth_order, layout = v.depth_order, v
    temperature, chosen = calibrate(cal_logits, cal_labels, cfg)
    prefix: dict[str, Any] = {}
    if cfg.train.prefix_calibration and fit.model.streamable and not hpo_info and depth_logits:
        # with HPO the final model is fit on train+validation: no held-out sessions are left
        # for it, so the live worker falls back to the full-lookahead calibration
        prefix = calibrate_depths(*depth_logits, cfg, temperature, chosen["threshold"], p.label_map.labels,
                                  sessions=None if layout is None else
                                  [layout.sessions_at(k) for k in range(len(depth_logits[0]))])
        echo("prefix-time calibration (k = visible later events): " + ", ".join(
            f"k={k}: T={t:.2f} thr={h:.3f}" for k, (t, h) in
            enumerate(zip(prefix["prefix_temperatures"], prefix["prefix_thresholds"]))))
        for line in depth_summary(prefix["depths"], cfg.train.precision_target):
            echo(line)
    policy: dict[str, Any] = {"policy": "plain"}
    if prefix and depth_order is not None and cfg.train.abstention == "stable" and fit.model.args.lookahead:
        first, final = first_and_final(cal_logits, depth_logits[0][0], depth_order)
        present = sorted(set(depth_order))
        policy = stable_policy(first, final, np.concatenate([cal_labels[i] for i in present]), cfg,
                               prefix["prefix_temperatures"][0], temperature, chosen["threshold"],
                               sessions=np.repeat(present, [len(cal_labels[i]) for i in present]))
        if policy["policy"] == "stable":
            prefix["prefix_thresholds"][0] = policy["first_threshold"]
            prefix["prefix_thresholds"][-1] = policy["threshold"]
            chosen = {**chosen, "threshold": policy["threshold"], "coverage": policy["coverage"],
                      "precision": policy["precision"], "lower_bound": policy["lower_bound"]}
            echo(f"abstention (stable): labelled on arrival at confidence >= {policy['first_threshold']:.3f} "
                 f"({policy['first_coverage']:.3f} of held-out events, precision {policy['first_precision'] or 0:.3f}); "
                 f"final label kept when "
                 + ("" if not policy["agreement"] else "it agrees or " if policy.get("agreement_margin") is None
                    else f"it agrees at confidence >= {policy['threshold'] - policy['agreement_margin']:.3f} or ")
                 + f"its confidence >= {policy['threshold']:.3f} "
                 f"(coverage {policy['coverage']:.3f}, precision {policy['precision'] or 0:.3f}); "
                 f"revised once: {policy['revised_share']:.3f} of events"
                 + (f" (thresholds moved to keep edit overhead <= {cfg.train.max_edit_overhead})"
                    if policy.get("first_rule") == "edit_overhead" else
                    " (no first threshold keeps edit overhead within train.max_edit_overhead: fewest revisions)"
                    if policy.get("first_rule") == "fewest_revisions" else ""))
    echo(f"trained {arch} in {fit.seconds:.1f}s (best epoch {fit.best_epoch}); temperature "
         f"{temperature:.3f}; threshold {chosen['threshold']:.4f} for precision >= "
         f"{cfg.train.precision_target} on new {cfg.train.guarantee_over} (coverage {chosen['coverage'] or 0:.3f} "
         f"on validation)")
    metrics: dict[str, Any] = {"validation": {"temperature": temperature, **chosen, **prefix,
                                              "abstention": policy},
                               "history": fit.history, "train_seconds": fit.seconds}
    if hpo_info:
        metrics["hpo"] = hpo_info
    if auto_info:
        metrics["auto"] = auto_info
    test_report = None
    if p.encoded["test"]:
        logits = session_logits(fit.model, p.encoded["test"], pick_device(cfg.train.device))
        probs = np.concatenate([softmax_t(l, temperature) for l in logits])
        covered = covered_by(probs, chosen["threshold"])
        if policy["policy"] == "stable" and policy["agreement"]:   # arrival labels matter only then
            first = np.concatenate([softmax_t(z, prefix["prefix_temperatures"][0]) for z in
                                    arrival_logits(fit.model, p.encoded["test"], pick_device(cfg.train.device))])
            covered = covered_by(probs, chosen["threshold"], first, policy["first_threshold"],
                                 agreement_margin(policy.get("agreement_margin")))
        gold = p.frame.set_index("session_id").loc[p.splits["test"], "step_name"].tolist()
        test_report = score(gold, probs, p.label_map.labels, chosen["threshold"], covered)
        metrics["test"] = {**test_report["offline"], "classification": test_report["classification"],
                           "selective": test_report["selective"]}
    out = save_artifact(Path(out_dir), model=fit.model, encoder=p.encoder, labels=p.label_map.labels,
                        temperature=temperature, threshold=chosen["threshold"],
                        calibration={k: chosen[k] for k in ("coverage", "precision", "lower_bound",
                                                             "feasible", "method", "confidence",
                                                             "target_precision")} | prefix
                        | {k: v for k, v in policy.items()
                           if k in ("policy", "first_threshold", "agreement", "agreement_margin")},
                        metrics=metrics, training=_training_info(p, cfg, time.perf_counter() - started),
                        config=cfg.to_dict())
    if test_report is not None:
        from trainer.report import format_summary, write_report
        write_report(test_report, out)
        echo(format_summary(test_report))
    echo(f"artifact written to {out}")
    return metrics


def auto_candidates(cfg: Config, encoder: FeatureEncoder) -> list[str]:
    """What ``model.arch: auto`` validates: ``model.auto_archs``, and with
    ``data.time_of_day: auto`` the causal CRF that reads the time of day (``crf_clock``) when
    the training sessions have it in two parts of the day at least (a log of one hour or
    without lexical features has nothing for it to tell steps apart with)."""
    kinds = [f.split("=", 1)[0] for f in encoder.clock_features()]     # "dp", and "h" with the hour
    clock = cfg.data.time_of_day == "auto" and max((kinds.count(k) for k in set(kinds)), default=0) >= 2
    return list(cfg.model.auto_archs) + ([CLOCK_CANDIDATE] if clock else [])


def _sessions_by_arch(p: Prepared, cfg: Config, archs: Sequence[str]
                      ) -> dict[str, tuple[list[EncodedSession], list[EncodedSession]]]:
    """The training and validation sessions each architecture is fit on: the encoded ones,
    but with the character 4-grams blanked for the CRF candidates (``crf``, ``crf_ahead``)
    when ``model.crf_char_ngrams`` is off (their weights for them stay zero, so serving them
    the full features gives the same labels)."""
    full = (list(p.encoded["train"]), list(p.encoded["val"]))
    blanked = None                                  # shared by the CRF candidates
    out = {}
    for a in archs:
        if cfg.model.candidate(a)["arch"] == "crf" and not cfg.model.crf_char_ngrams:
            if blanked is None:
                grams = p.encoder.char_gram_ids()
                blanked = (without_lex(full[0], grams), without_lex(full[1], grams))
            out[a] = blanked
        else:
            out[a] = full
    return out


def _training_info(p: Prepared, cfg: Config, seconds: float) -> dict[str, Any]:
    return {"data_fingerprint": p.fingerprint, "events": int(len(p.frame)),
            "sessions": {k: len(v) for k, v in p.splits.items()}, "seconds": round(seconds, 2),
            "seed": cfg.train.seed, "device": pick_device(cfg.train.device)}


def _train_baseline(p: Prepared, out_dir, cfg: Config, started: float, echo) -> dict[str, Any]:
    """The classic per-event baselines, calibrated and scored exactly like the network."""
    frame = p.frame
    part = {k: frame[frame["session_id"].isin(set(v))] for k, v in p.splits.items()}
    t0 = time.perf_counter()
    model = BaselineLabeller.fit(part["train"], cfg.data, kind=cfg.model.arch, seed=cfg.train.seed)
    seconds = time.perf_counter() - t0
    index = {s: i for i, s in enumerate(p.label_map.labels)}

    def aligned(df):
        # baseline columns follow its own label list; reorder to the artifact's label map
        probs = model.predict_proba(df)
        cols = [index[s] for s in model.labels]
        out = []
        for pr in probs:
            full = np.full((len(pr), len(index)), 1e-12)
            full[:, cols] = pr
            out.append(full / full.sum(-1, keepdims=True))
        return out

    held = part["val"] if len(part["val"]) else part["train"]
    cal = aligned(held)
    gold = [p.label_map.encode(g["step_name"]) for _, g in held.groupby("session_id", sort=False)]
    temperature, chosen = calibrate([np.log(c) for c in cal], gold, cfg)
    metrics: dict[str, Any] = {"validation": {"temperature": temperature, **chosen}, "train_seconds": seconds}
    test_report = None
    if len(part["test"]):
        probs = np.concatenate([softmax_t(np.log(c), temperature) for c in aligned(part["test"])])
        test_report = score(part["test"]["step_name"].tolist(), probs, p.label_map.labels, chosen["threshold"])
        metrics["test"] = {**test_report["offline"], "classification": test_report["classification"]}
    out = save_artifact(Path(out_dir), model=None, encoder=p.encoder, labels=model.labels,
                        temperature=temperature, threshold=chosen["threshold"],
                        calibration={k: chosen[k] for k in ("coverage", "precision", "feasible", "method")},
                        metrics=metrics, training=_training_info(p, cfg, time.perf_counter() - started),
                        config=cfg.to_dict(), kind=cfg.model.arch, baseline=model)
    if test_report is not None:
        from trainer.report import format_summary, write_report
        write_report(test_report, out)
        echo(format_summary(test_report))
    echo(f"artifact written to {out}")
    return metrics
