"""Hot swap: follow ``artifacts/current`` and hand the worker a checked new model.

``poll()`` (run in an executor, off the event loop) reads the pointer; when it names a new
folder it loads the artifact, checks it (manifest and file hashes, weights fit the declared
architecture, a neural model with bounded lookahead, a smoke prediction: one synthetic event
encoded with the model's encoder (``transform_one``; the worker itself encodes batches with
``derive`` + ``encode_derived``) and advanced by the cached ``step`` the worker uses) and parks
it as the candidate. The worker
takes the candidate between two batches, so a swap is atomic with respect to events. A bad
artifact is logged, counted and remembered (not retried until the pointer changes), and the
old model keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from trainer.artifacts import POINTER, LoadedModel, load_artifact, resolve
from trainer.errors import ArtifactError, TaggerError

log = logging.getLogger(__name__)


def smoke_check(lm: LoadedModel) -> None:
    """Label one synthetic event through the live path; raise ArtifactError if it fails."""
    from trainer.features import EventContext
    if lm.kind != "neural" or lm.model is None:
        raise ArtifactError(f"{lm.path}: a {lm.kind} model cannot be served live (needs a neural model)")
    if lm.lookahead is None:
        raise ArtifactError(f"{lm.path}: unbounded lookahead is offline-only; retrain with model.lookahead set")
    event = {"session_id": "smoke", "event_id": "smoke-0", "timestamp": "2024-01-01T00:00:00Z",
             "event_name": "Read: 123 . A1 . in smoke", "_ts": 1704067200.0}
    for col in lm.encoder.input_columns():
        event.setdefault(col, "")
    try:
        from stream.tagging import step_batch
        enc, _ = lm.encoder.transform_one(event, EventContext())
        _, outs = lm.model.step([lm.model.init_state()], step_batch(enc, lm.model))
        probs = outs[0].float().softmax(-1).cpu().numpy()
    except TaggerError:
        raise
    except Exception as exc:  # any failure of the smoke test rejects the artifact
        raise ArtifactError(f"{lm.path}: smoke prediction failed: {exc!r}") from exc
    if probs.shape[-1] != len(lm.labels) or not np.isfinite(probs).all():
        raise ArtifactError(f"{lm.path}: smoke prediction gave invalid probabilities")


class ModelHolder:
    def __init__(self, artifacts_dir: str | Path, *, on_event: Optional[Callable[[str, str, str], None]] = None):
        self.root = Path(artifacts_dir)
        self.current: Optional[LoadedModel] = None
        self._candidate: Optional[LoadedModel] = None
        self._seen_target: Optional[Path] = None
        self._lock = threading.Lock()
        self.on_event = on_event or (lambda result, version, detail: None)

    def pointer_target(self) -> Optional[Path]:
        if not (self.root / POINTER).is_file():
            return None
        return resolve(self.root).resolve()

    def load_initial(self) -> LoadedModel:
        target = self.pointer_target()
        if target is None:
            raise ArtifactError(f"{self.root}: no current model (run `tagger promote MODEL_DIR` first)")
        lm = load_artifact(target)
        smoke_check(lm)
        self.current, self._seen_target = lm, target
        self.on_event("loaded", lm.version, f"loaded {target}")  # the first model: not a swap
        return lm

    def poll(self) -> bool:
        """Check the pointer; load and vet a new model. True when a candidate is ready."""
        target = self.pointer_target()
        if target is None or target == self._seen_target:
            return False
        self._seen_target = target
        started = time.perf_counter()
        try:
            lm = load_artifact(target)
            smoke_check(lm)
        except Exception as exc:  # noqa: BLE001 - anything wrong with the artifact (a malformed
            # manifest raises KeyError/ValueError/TypeError) rejects it; the poll timer goes on
            if not isinstance(exc, (TaggerError, OSError)):
                exc = ArtifactError(f"{target}: cannot be loaded: {type(exc).__name__}: {exc}")
            log.error("model swap rejected: %s; still serving %s", exc,
                      self.current.version if self.current else "nothing")
            self.on_event("rejected", "", str(exc))
            return False
        with self._lock:
            self._candidate = lm
        log.info("model %s loaded and checked in %.2fs; swapping in between batches",
                 lm.version, time.perf_counter() - started)
        return True

    def take_candidate(self) -> Optional[LoadedModel]:
        with self._lock:
            lm, self._candidate = self._candidate, None
        if lm is not None:
            old = self.current.version if self.current else None
            self.current = lm
            self.on_event("ok", lm.version, f"swapped {old} -> {lm.version}")
        return lm
