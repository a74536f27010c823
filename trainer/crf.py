"""The linear-chain CRF architecture (``model.arch: crf``), trained with CRFsuite and served
by the torch ``Tagger`` like every other architecture.

A CRF is a streaming model: with causal state features (the event and the ``wide_past``
events before it: lexical ids and standardised numbers from the shared ``FeatureEncoder``;
``model.crf_future: 0``, the default) forward filtering gives p(y_t | events up to t), the
label on arrival, and fixed-lag smoothing over the L later events gives the final label,
which is also what offline prediction computes (``LookaheadCRF`` with window L). With
``crf_future: F`` the state features also read the next F events; its labels before they
are final are then read with those features still missing. The weights are
fit by CRFsuite (L-BFGS with an elastic-net penalty, the usual strong CRF trainer) and
copied into the ``WidePath`` tables and the transition matrix of ``Tagger(arch="crf")``,
so the artifact is a plain state dict, ``step()`` serves it live, and nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.config import ModelConfig
from trainer.errors import ConfigError, DataError
from trainer.features import EncodedSession
from trainer.model import Tagger

# CRFsuite's L-BFGS settings; the penalties are those of the offline CRF reference
C1, C2, MAX_ITERATIONS = 0.05, 0.05, 200
UNSEEN = -30.0  # label score of a step absent from the training sessions: never predicted


def attributes(s: EncodedSession, past: int, future: int = 0) -> list[dict[str, float]]:
    """CRFsuite attribute dicts of one encoded session: for each offset o = -past .. future
    the lexical ids (``o:l<id>``) and non-zero numbers (``o:n<j>``) of event t+o, or
    ``o:start`` before the session's first event (nothing after its last: live, an event not
    yet seen looks the same)."""
    out = []
    n = len(s)
    for t in range(n):
        f: dict[str, float] = {}
        for o in range(-past, future + 1):
            j = t + o
            if j < 0:
                f[f"{o}:start"] = 1.0
                continue
            if j >= n:
                continue
            for i in s.lex[j]:
                if i:
                    f[f"{o}:l{int(i)}"] = 1.0
            for m, v in enumerate(s.nums[j]):
                if v != 0.0:
                    f[f"{o}:n{m}"] = float(v)
        out.append(f)
    return out


def fit_crf(args: ModelConfig, train: Sequence[EncodedSession], *, c1: float = C1, c2: float = C2,
            max_iterations: int = MAX_ITERATIONS) -> tuple[Tagger, dict[str, Any]]:
    """Fit a CRF on labelled encoded sessions; returns ``Tagger(args)`` holding its weights
    (``args.arch`` must be ``"crf"``) and a small training log."""
    import sklearn_crfsuite

    if args.arch != "crf":
        raise ConfigError(f"model.arch: fit_crf needs 'crf', got {args.arch!r}")
    started = time.perf_counter()
    if args.lex_ignore:                  # features it does not read get no weight (stay 0)
        train = without_lex(train, np.array(args.lex_ignore, dtype=np.int64))
    P = args.wide_past
    X, Y = [], []
    for s in train:
        keep = s.labels != -100
        if not keep.any():
            continue
        X.append(attributes(s, P, model_future(args)))
        Y.append([str(int(y)) for y in s.labels])
    if not X:
        raise DataError("CRF training: no labelled events")
    with tempfile.TemporaryDirectory(prefix="tagger-crf-") as tmp:
        crf = sklearn_crfsuite.CRF(algorithm="lbfgs", c1=c1, c2=c2, max_iterations=max_iterations,
                                   all_possible_transitions=True, model_filename=str(Path(tmp) / "m"))
        try:
            crf.fit(X, Y)
        except (ValueError, RuntimeError) as exc:
            raise DataError(f"CRF training failed: {exc}") from exc
        info = crf.tagger_.info()
        iterations = len(crf.training_log_.iterations) if crf.training_log_ else None
    model = Tagger(args)
    load_weights(model, info.state_features, info.transitions)
    model.eval()
    return model, {"iterations": iterations, "seconds": time.perf_counter() - started,
                   "features": len(info.state_features)}


def without_lex(sessions: Sequence[EncodedSession], ids: np.ndarray) -> list[EncodedSession]:
    """The sessions with the lexical feature ids in ``ids`` blanked (0, padding): what a CRF
    fit on them never reads, so its weights for them stay zero."""
    return [dataclasses.replace(s, lex=np.where(np.isin(s.lex, ids), 0, s.lex)) for s in sessions]


def model_future(args: ModelConfig) -> int:
    """How many later events the CRF's state features read (``Tagger`` caps it likewise)."""
    return 0 if args.lookahead is None else min(args.wide_future, args.lookahead)


@torch.no_grad()
def load_weights(model: Tagger, state: dict[tuple[str, str], float],
                 transitions: dict[tuple[str, str], float]) -> None:
    """CRFsuite weights (labels are label ids as strings) into the model's tables. A label
    CRFsuite never saw gets a score so low that it is never predicted (``UNSEEN``)."""
    wide, crf = model.wide, model.crf
    P = wide.P
    C = crf.trans.shape[0]
    seen = set()
    for (attr, label), w in state.items():
        c = int(label)
        seen.add(c)
        off, _, what = attr.partition(":")
        slot = int(off) + P
        if what == "start":
            wide.before_start[slot, c] = w
        elif what[0] == "l":
            wide.table[int(what[1:]), slot * C + c] = w
        else:
            wide.nums[slot, int(what[1:]), c] = w
    for (a, b), w in transitions.items():
        crf.trans[int(a), int(b)] = w
        seen.update((int(a), int(b)))
    unseen = [c for c in range(C) if c not in seen]
    if unseen:
        wide.bias[unseen] = UNSEEN


__all__ = ["attributes", "fit_crf", "load_weights", "without_lex"]
