"""Classic, non-neural labellers: the yardstick the neural tagger has to beat.

Owns two baselines behind one small protocol (``fit`` / ``predict_proba`` / ``save`` /
``load``) that the evaluation code drives exactly as it drives the neural model:

- ``kind="logreg"``: a per-event multinomial logistic regression over the event's own derived
  features and those of its neighbours (``window`` events each side, default 1), vectorised
  with sklearn's ``DictVectorizer``. Saved as JSON (feature names, coefficients, intercepts);
  loading needs numpy only, no sklearn object.
- ``kind="crf"``: a linear-chain CRF (CRFsuite via sklearn-crfsuite) over each event and its
  two neighbours on each side, with per-event probabilities from the forward-backward
  marginals. Saved as CRFsuite's own model file plus a JSON manifest.

Both see *future* events (the next ``window`` events, and the CRF's marginals depend on the
whole session), so they are **offline** baselines: their labels correspond to the streaming
tagger's final labels, never to its first emissions.

Features come from the same ``trainer.features.derive`` the neural model uses (run through
``derive_sessions``), so a baseline and the network see the same information. Each event becomes a
dict ``{name: value}``: ``tpl=<template>``, ``tok=<token>``, ``cat:<name>=<value>``,
``num:<name>`` (standardised with training statistics, clipped to +-5; NaN gives
``num:<name>:nan``), ``txt:<col>=<token>`` for configured text columns (bag of words, not the
sentence embedding), prefixed by position: ``-1:tpl=...``, ``0:tok=...``,
``+1:cat:app=...``. Positions past a session edge get ``-1:BOS`` / ``+1:EOS``.

No pickle anywhere: both artifacts are JSON (plus the CRFsuite binary for the CRF).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from trainer.config import DataConfig, build_section, to_plain
from trainer.errors import ArtifactError, ConfigError, DataError
from trainer.features import DERIVED_NUMS, derive_sessions, tokens_of

FORMAT = "tagger-baseline/1"
MANIFEST = "baseline.json"
CRF_MODEL = "crf.crfsuite"
KINDS = ("logreg", "crf")
CLIP = 5.0  # standardised numbers beyond this are outliers; clipping keeps one from dominating

# Hyperparameters are the keyword arguments of ``fit``; an unknown one is an error.
DEFAULT_HYPER: dict[str, dict[str, Any]] = {
    "logreg": {"window": 1, "C": 1.0, "max_iter": 2000, "tol": 1e-4, "solver": "lbfgs",
               "class_weight": "balanced"},
    # ``future``: neighbours after the event (None = ``window``); 0 makes the CRF causal, so
    # forward filtering labels an event on arrival (``predict_proba(decode="filter")``)
    "crf": {"window": 2, "future": None, "c1": 0.05, "c2": 0.05, "max_iterations": 200,
            "all_possible_transitions": True},
}


# ---- features ------------------------------------------------------------------------------

def auto_columns(frame: pd.DataFrame, data: DataConfig) -> list[str]:
    """The well-known optional columns this frame actually fills (as ``FeatureEncoder.fit``)."""
    return [c for c in data.auto_columns if c in frame.columns
            and c not in data.cat_features and frame[c].astype(str).str.strip().ne("").any()]


def _check_columns(frame: pd.DataFrame, data: DataConfig) -> None:
    for col in list(data.cat_features) + list(data.num_features) + list(data.text_features):
        if col not in frame.columns:
            raise DataError(f"configured column {col!r} is not in the data "
                            f"(columns: {[c for c in frame.columns if not c.startswith('_')]})")


def _sessions(frame: pd.DataFrame, data: DataConfig, auto_cols: Sequence[str]
              ) -> list[list[dict[str, Any]]]:
    """Derived features per session, sessions in order of first appearance."""
    if frame.empty:
        return []
    # A canonical frame keeps each session contiguous; if a caller hands us one that does not,
    # regroup (stably) rather than let ``derive_sessions`` restart a session's context half-way.
    sid = frame["session_id"].astype(str)
    if (sid != sid.shift()).sum() != sid.nunique():
        first = {s: i for i, s in enumerate(pd.unique(sid))}
        frame = frame.iloc[np.argsort(sid.map(first).to_numpy(), kind="stable")]
    out: list[list[dict[str, Any]]] = []
    current = object()
    for s, d in derive_sessions(frame, data, auto_cols):
        if s != current:
            out.append([])
            current = s
        out[-1].append(d)
    return out


class _Featurizer:
    """Derived features -> window feature dicts. Its state (numeric statistics) is JSON-able."""

    def __init__(self, data: DataConfig, auto_cols: Sequence[str], window: int,
                 num_names: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 future: int | None = None):
        self.data, self.auto_cols, self.window = data, list(auto_cols), int(window)
        self.future = self.window if future is None else int(future)
        self.num_names = list(num_names)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)

    @classmethod
    def fit(cls, sessions: Sequence[Sequence[dict[str, Any]]], data: DataConfig,
            auto_cols: Sequence[str], window: int, future: int | None = None) -> "_Featurizer":
        names = list(DERIVED_NUMS) + list(data.num_features)
        raw = np.array([[d["nums"].get(n, math.nan) for n in names] for s in sessions for d in s],
                       dtype=np.float64).reshape(-1, len(names))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column gives mean 0, std 1
            mean = np.nan_to_num(np.nanmean(raw, axis=0)) if len(raw) else np.zeros(len(names))
            std = np.nan_to_num(np.nanstd(raw, axis=0)) if len(raw) else np.ones(len(names))
        std[std < 1e-6] = 1.0
        return cls(data, auto_cols, window, names, mean, std, future)

    def event(self, d: Mapping[str, Any]) -> dict[str, float]:
        f: dict[str, float] = {f"tpl={d['template']}": 1.0}
        for t in d["tokens"]:
            f[f"tok={t}"] = 1.0
        for name, value in d["cats"].items():
            f[f"cat:{name}={value}"] = 1.0
        for j, name in enumerate(self.num_names):
            v = d["nums"].get(name, math.nan)
            if v is None or math.isnan(v):
                f[f"num:{name}:nan"] = 1.0
                continue
            z = max(-CLIP, min(CLIP, (v - self.mean[j]) / self.std[j]))
            if z != 0.0:  # a zero-valued feature carries nothing in either model
                f[f"num:{name}"] = z
        # Configured text columns come first in ``texts`` (``event_name_text`` appends the name,
        # which the tokens already cover).
        for col, text in zip(self.data.text_features, d["texts"]):
            for t in tokens_of(text):
                f[f"txt:{col}={t}"] = 1.0
        return f

    def session(self, derived: Sequence[Mapping[str, Any]],
                keep: set[str] | None = None) -> list[dict[str, float]]:
        """One dict per event: its own features and its neighbours', prefixed by offset."""
        base = [self.event(d) for d in derived]
        if keep is not None:
            base = [{k: v for k, v in b.items() if k in keep} for b in base]
        n, out = len(base), []
        for i in range(n):
            f: dict[str, float] = {"bias": 1.0}
            for off in range(-self.window, self.future + 1):
                j = i + off
                pre = f"{off:+d}:" if off else "0:"
                if j < 0:
                    f[f"{pre}BOS"] = 1.0
                elif j >= n:
                    f[f"{pre}EOS"] = 1.0
                else:
                    for k, v in base[j].items():
                        f[pre + k] = v
            out.append(f)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"data": to_plain(self.data), "auto_cols": self.auto_cols, "window": self.window,
                "future": self.future, "num_names": self.num_names, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "_Featurizer":
        return cls(build_section(DataConfig, d["data"], "data"), d["auto_cols"], d["window"],
                   d["num_names"], d["mean"], d["std"], d.get("future"))


def _frequent(sessions: Sequence[Sequence[dict[str, Any]]], feat: _Featurizer,
              min_freq: int) -> set[str] | None:
    """Base feature names seen in at least ``min_freq`` training events (the neural model's
    vocabulary cut-off, so a name seen once does not become a memorised label)."""
    if min_freq <= 1:
        return None
    counts = Counter(k for s in sessions for d in s for k in feat.event(d))
    return {k for k, c in counts.items() if c >= min_freq}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _hyper(kind: str, given: Mapping[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise ConfigError(f"unknown baseline kind {kind!r} (known: {', '.join(KINDS)})")
    known = DEFAULT_HYPER[kind]
    for key in given:
        if key not in known:
            raise ConfigError(f"unknown {kind} hyperparameter {key!r} "
                              f"(known: {', '.join(sorted(known))})")
    hyper = {**known, **given}
    if not isinstance(hyper["window"], int) or hyper["window"] < 0:
        raise ConfigError(f"{kind} hyperparameter 'window' must be an integer >= 0")
    future = hyper.get("future")
    if future is not None and (not isinstance(future, int) or future < 0):
        raise ConfigError(f"{kind} hyperparameter 'future' must be an integer >= 0 or null")
    return hyper


# ---- the labeller --------------------------------------------------------------------------

class BaselineLabeller:
    """A fitted classic labeller. ``predict_proba`` columns follow ``labels``.

    Offline only: every event's probabilities use the next ``window`` events (the CRF's use
    the whole session), so compare them with the streaming tagger's *final* labels.
    """

    def __init__(self, kind: str, labels: Sequence[str], featurizer: _Featurizer,
                 hyper: Mapping[str, Any], seed: int = 0, info: Mapping[str, Any] | None = None, *,
                 feature_names: Sequence[str] | None = None, coef: Any = None,
                 intercept: Any = None, crf_model: bytes | None = None):
        self.kind = kind
        self.labels = list(labels)
        self.featurizer = featurizer
        self.hyper = dict(hyper)
        self.seed = seed
        self.info = dict(info or {})
        # logreg state: a (C, F) weight matrix over ``feature_names`` and (C,) intercepts
        self.feature_names = list(feature_names or [])
        self._index = {name: i for i, name in enumerate(self.feature_names)}
        self.coef = None if coef is None else np.asarray(coef, dtype=np.float64)
        self.intercept = None if intercept is None else np.asarray(intercept, dtype=np.float64)
        # crf state: the CRFsuite model file's bytes, opened in memory
        self._crf_model = crf_model
        self._tagger = None
        if crf_model is not None:
            import pycrfsuite
            self._tagger = pycrfsuite.Tagger()
            try:
                self._tagger.open_inmemory(crf_model)
            except (ValueError, OSError) as exc:
                raise ArtifactError(f"CRF model is unreadable: {exc}") from exc

    # ---- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, train: pd.DataFrame, data: DataConfig, kind: str = "logreg", seed: int = 0,
            **hyper: Any) -> "BaselineLabeller":
        """Fit on a canonical, labelled frame (``trainer.loading``)."""
        hyper = _hyper(kind, hyper)
        if "step_name" not in train.columns:
            raise DataError("training data has no 'step_name' column")
        if train.empty:
            raise DataError("training data has no events")
        _check_columns(train, data)
        started = time.perf_counter()
        auto = auto_columns(train, data)
        sessions = _sessions(train, data, auto)
        y_sessions = [g["step_name"].astype(str).tolist()
                      for _, g in train.groupby("session_id", sort=False)]
        feat = _Featurizer.fit(sessions, data, auto, hyper["window"], hyper.get("future"))
        keep = _frequent(sessions, feat, data.min_freq)
        X_sessions = [feat.session(s, keep) for s in sessions]
        info = {"n_events": len(train), "n_sessions": len(sessions)}
        if kind == "logreg":
            model = cls._fit_logreg(X_sessions, y_sessions, feat, hyper, seed, info)
        else:
            model = cls._fit_crf(X_sessions, y_sessions, feat, hyper, seed, info)
        model.info["fit_seconds"] = round(time.perf_counter() - started, 3)
        return model

    @classmethod
    def _fit_logreg(cls, X_sessions, y_sessions, feat, hyper, seed, info) -> "BaselineLabeller":
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.linear_model import LogisticRegression

        X_dicts = [f for s in X_sessions for f in s]
        y = np.array([label for s in y_sessions for label in s], dtype=object)
        vec = DictVectorizer(sparse=True, sort=True)
        X = vec.fit_transform(X_dicts)
        names = list(vec.get_feature_names_out())
        labels = sorted(set(y))
        info["n_features"] = len(names)
        if len(labels) == 1:
            # Nothing to learn; sklearn refuses one class, the protocol still has to answer.
            return cls("logreg", labels, feat, hyper, seed, info, feature_names=[],
                       coef=np.zeros((1, 0)), intercept=np.zeros(1))
        clf = LogisticRegression(C=hyper["C"], class_weight=hyper["class_weight"],
                                 solver=hyper["solver"], max_iter=hyper["max_iter"],
                                 tol=hyper["tol"], random_state=seed)
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits
        # One thread: the problem is small and sparse, and on a shared, busy box OpenMP and
        # BLAS threads contending for 2 cores made lbfgs 5-10x slower than one thread.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(X, y)
        info["converged"] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        info["n_iter"] = int(np.max(clf.n_iter_))
        coef, intercept = clf.coef_, clf.intercept_
        if coef.shape[0] == 1:
            # Binary: sklearn keeps one logit w.x+b for classes_[1]; softmax over [0, w.x+b]
            # is the same probability, and keeps one prediction path for every C.
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        assert list(clf.classes_) == labels
        return cls("logreg", labels, feat, hyper, seed, info, feature_names=names,
                   coef=coef, intercept=intercept)

    @classmethod
    def _fit_crf(cls, X_sessions, y_sessions, feat, hyper, seed, info) -> "BaselineLabeller":
        import sklearn_crfsuite

        labels = sorted({label for s in y_sessions for label in s})
        with tempfile.TemporaryDirectory(prefix="tagger-crf-") as tmp:
            path = Path(tmp) / CRF_MODEL
            crf = sklearn_crfsuite.CRF(
                algorithm="lbfgs", c1=hyper["c1"], c2=hyper["c2"],
                max_iterations=hyper["max_iterations"],
                all_possible_transitions=hyper["all_possible_transitions"],
                model_filename=str(path))
            try:
                crf.fit(X_sessions, y_sessions)
            except (ValueError, RuntimeError) as exc:
                raise DataError(f"CRF training failed: {exc}") from exc
            info["n_iter"] = len(crf.training_log_.iterations) if crf.training_log_ else None
            # Keep the model file's bytes: the fitted labeller owns no file, and ``save``
            # writes them verbatim.
            model_bytes = path.read_bytes()
        return cls("crf", labels, feat, hyper, seed, info, crf_model=model_bytes)

    # ---- prediction --------------------------------------------------------------------------
    def predict_proba(self, frame: pd.DataFrame, decode: str | int = "marginal") -> list[np.ndarray]:
        """One (n_events, len(labels)) float64 array per session, sessions in order of first
        appearance in ``frame`` (a canonical frame); every row sums to 1.

        ``decode`` (CRF only): ``"marginal"``, the forward-backward marginals over the whole
        session; ``"filter"``, forward filtering p(y_t | events up to t), what a CRF can say
        when an event arrives (causal only when ``future`` is 0); an int L, fixed-lag
        smoothing p(y_t | events up to t + L), the label once L later events are in."""
        if frame.empty:
            return []
        feat = self.featurizer
        sessions = _sessions(frame, feat.data, feat.auto_cols)
        if self.kind == "logreg":
            return [self._logreg_proba(feat.session(s)) for s in sessions]
        if decode == "marginal":
            return [self._crf_proba(feat.session(s)) for s in sessions]
        lag = 0 if decode == "filter" else decode
        if not isinstance(lag, int) or isinstance(lag, bool) or lag < 0:
            raise ValueError(f"decode must be 'marginal', 'filter' or a lag >= 0, got {decode!r}")
        return [crf_lag_marginals(self._crf_emissions(feat.session(s)), self.crf_transitions, lag)
                for s in sessions]

    # ---- the CRF's weights, for decoding other than crfsuite's own marginals -----------------
    @property
    def crf_weights(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(attribute -> (C,) state weights, (C, C) transition weights [from, to]) read from
        the CRFsuite model, columns in ``labels`` order."""
        if getattr(self, "_weights", None) is None:
            info = self._tagger.info()
            index = {label: i for i, label in enumerate(self.labels)}
            state: dict[str, np.ndarray] = {}
            for (attr, label), w in info.state_features.items():
                if label in index:
                    state.setdefault(attr, np.zeros(len(self.labels)))[index[label]] = w
            trans = np.zeros((len(self.labels), len(self.labels)))
            for (a, b), w in info.transitions.items():
                if a in index and b in index:
                    trans[index[a], index[b]] = w
            self._weights = (state, trans)
        return self._weights

    @property
    def crf_transitions(self) -> np.ndarray:
        return self.crf_weights[1]

    def _crf_emissions(self, dicts: Sequence[Mapping[str, float]]) -> np.ndarray:
        state = self.crf_weights[0]
        out = np.zeros((len(dicts), len(self.labels)))
        for t, f in enumerate(dicts):
            for name, v in f.items():
                w = state.get(name)
                if w is not None:
                    out[t] += v * w
        return out

    def _logreg_proba(self, dicts: Sequence[Mapping[str, float]]) -> np.ndarray:
        n, index = len(dicts), self._index
        z = np.tile(self.intercept, (n, 1))  # (n, C)
        if self.feature_names:
            rows, cols, vals = [], [], []
            for i, f in enumerate(dicts):
                for name, v in f.items():
                    j = index.get(name)
                    if j is not None:
                        rows.append(i)
                        cols.append(j)
                        vals.append(v)
            from scipy.sparse import csr_matrix
            X = csr_matrix((vals, (rows, cols)), shape=(n, len(self.feature_names)))
            z = z + X @ self.coef.T
        return _softmax(z)

    def _crf_proba(self, dicts: Sequence[Mapping[str, float]]) -> np.ndarray:
        n = len(dicts)
        out = np.zeros((n, len(self.labels)), dtype=np.float64)
        if n == 0:
            return out
        tagger = self._tagger
        tagger.set(dicts)
        known = set(tagger.labels())
        for c, label in enumerate(self.labels):
            if label in known:
                out[:, c] = [tagger.marginal(label, t) for t in range(n)]
        # Forward-backward marginals sum to 1 up to rounding; make it exact for consumers.
        return out / out.sum(axis=1, keepdims=True)

    # ---- persistence -------------------------------------------------------------------------
    def _manifest(self) -> dict[str, Any]:
        m = {"format": FORMAT, "kind": self.kind, "labels": self.labels, "hyper": self.hyper,
             "seed": self.seed, "info": self.info, "features": self.featurizer.to_dict()}
        if self.kind == "logreg":
            # Python's float repr round-trips float64 exactly, so a loaded model reproduces
            # the fitted one's probabilities bit for bit.
            m["logreg"] = {"feature_names": self.feature_names, "coef": self.coef.tolist(),
                           "intercept": self.intercept.tolist()}
        else:
            m["crf"] = {"model_file": CRF_MODEL}
        return m

    def save(self, folder: str | Path) -> list[str]:
        """Write the model into ``folder`` (created if needed); returns the file names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if self.kind == "crf":
            (folder / CRF_MODEL).write_bytes(self._crf_model)
            written.append(CRF_MODEL)
        with open(folder / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(self._manifest(), fh, ensure_ascii=False, allow_nan=False)
        written.append(MANIFEST)
        return written

    @classmethod
    def load(cls, folder: str | Path) -> "BaselineLabeller":
        folder = Path(folder)
        try:
            m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ArtifactError(f"{folder / MANIFEST}: cannot read: {exc.strerror}") from exc
        except ValueError as exc:
            raise ArtifactError(f"{folder / MANIFEST}: not valid JSON: {exc}") from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ArtifactError(f"{folder / MANIFEST}: not a baseline model "
                                f"(format {m.get('format') if isinstance(m, dict) else None!r}, "
                                f"expected {FORMAT!r})")
        try:
            kind = m["kind"]
            feat = _Featurizer.from_dict(m["features"])
            common = dict(kind=kind, labels=m["labels"], featurizer=feat, hyper=m["hyper"],
                          seed=m["seed"], info=m["info"])
            if kind == "logreg":
                lr = m["logreg"]
                model = cls(**common, feature_names=lr["feature_names"],
                            coef=np.asarray(lr["coef"], dtype=np.float64).reshape(
                                len(m["labels"]), len(lr["feature_names"])),
                            intercept=lr["intercept"])
            elif kind == "crf":
                path = folder / m["crf"]["model_file"]
                try:
                    model_bytes = path.read_bytes()
                except OSError as exc:
                    raise ArtifactError(f"{path}: cannot read: {exc.strerror}") from exc
                model = cls(**common, crf_model=model_bytes)
            else:
                raise ArtifactError(f"{folder / MANIFEST}: unknown baseline kind {kind!r}")
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ArtifactError(f"{folder / MANIFEST}: malformed baseline model: {exc!r}") from exc
        return model

    def __repr__(self) -> str:
        return f"BaselineLabeller(kind={self.kind!r}, labels={len(self.labels)}, hyper={self.hyper})"


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def crf_lag_marginals(emissions: np.ndarray, trans: np.ndarray, lag: int | None) -> np.ndarray:
    """Linear-chain CRF label probabilities with bounded lookahead: row t is
    p(y_t | x_0..x_{t+lag}) (``lag`` None: the whole sequence, the usual marginals). The
    forward message alpha_t covers 0..t; the backward message covers only t+1..t+lag.

    emissions (n, C) state scores, trans (C, C) [from, to] -> (n, C) probabilities."""
    n, C = emissions.shape
    if n == 0:
        return np.zeros((0, C))
    alpha = np.zeros((n, C))
    alpha[0] = emissions[0]
    for t in range(1, n):
        alpha[t] = emissions[t] + _logsumexp(alpha[t - 1][:, None] + trans, 0)
    out = np.zeros((n, C))
    if lag is None or lag >= n - 1:                    # one backward pass: the full marginals
        beta = np.zeros((n, C))
        for t in range(n - 2, -1, -1):
            beta[t] = _logsumexp(trans + (emissions[t + 1] + beta[t + 1])[None, :], 1)
        z = alpha + beta
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)
    reach = lag
    for t in range(n):
        stop = min(n - 1, t + reach)
        beta = np.zeros(C)
        for j in range(stop, t, -1):                   # beta_{j-1}(y) = lse_y' A[y,y'] + e_j(y') + beta_j(y')
            beta = _logsumexp(trans + (emissions[j] + beta)[None, :], 1)
        z = alpha[t] + beta
        z = z - z.max()
        p = np.exp(z)
        out[t] = p / p.sum()
    return out


def predict_labels(model: BaselineLabeller, frame: pd.DataFrame) -> list[str]:
    """Arg-max label per event, sessions in order of first appearance (so, for a canonical
    frame, in frame order)."""
    probs = model.predict_proba(frame)
    if not probs:
        return []
    return [model.labels[i] for i in np.concatenate(probs).argmax(axis=1)]


__all__ = ["BaselineLabeller", "DEFAULT_HYPER", "KINDS", "auto_columns", "predict_labels"]
