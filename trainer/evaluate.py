"""``tagger evaluate`` and ``tagger predict``: score or apply a saved model on a log file.

The JSON written by ``evaluate --json`` follows the DESIGN.md contract: ``events``,
``sessions``, the ``offline`` block and, with ``--streaming``, the ``streaming`` block, plus
details (per-class report, confusions, risk-coverage curve) beside them.

The streaming block comes from replaying the sessions through the live tagger, which lives
in ``stream`` (``stream.tools.replay.streaming_evaluation``). ``trainer`` never imports
``stream``: the caller passes that replay in as ``streaming`` (``tagger.cli`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np
import pandas as pd

from trainer.artifacts import LoadedModel, json_default, load_artifact
from trainer.errors import ConfigError
from trainer.loading import read_events
from trainer.metrics import ABSTAIN, classification_metrics, offline_metrics


class StreamingReplay(Protocol):
    """Replays a labelled frame event by event through the live tagger and returns the
    ``streaming`` block (``stream.tools.replay.streaming_evaluation`` is the one there is)."""

    def __call__(self, lm: LoadedModel, frame: pd.DataFrame, *, offline_probs: Mapping[str, np.ndarray],
                 offline_covered: Optional[Mapping[str, np.ndarray]] = None, base_dir: Any = None,
                 progress: bool = False, per_event: bool = False,
                 emissions_out: Optional[dict] = None) -> dict[str, Any]: ...


def label_ids(names: Sequence[str], labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Gold names -> ids; names the model has never seen get ids past its label list (they
    count as errors and appear in macro-F1, since the contract averages over test labels)."""
    extended = list(labels)
    index = {s: i for i, s in enumerate(extended)}
    ids = []
    for s in names:
        if s not in index:
            index[s] = len(extended)
            extended.append(s)
        ids.append(index[s])
    return np.asarray(ids, dtype=np.int64), extended


def top1_metrics(gold: Sequence[str], pred: Sequence[Optional[str]]) -> dict[str, Any]:
    """``classification_metrics`` of label names (a None prediction counts as wrong)."""
    names = sorted(set(gold) | {p for p in pred if p is not None})
    y, _ = label_ids(gold, names)
    index = {n: i for i, n in enumerate(names)}
    p = np.array([-1 if x is None else index[x] for x in pred], dtype=np.int64)
    return classification_metrics(y, p, names)


def top1_scores(gold: Sequence[str], pred: Sequence[Optional[str]], prefix: str = "") -> dict[str, Any]:
    """Accuracy and macro-F1 (over the labels present in ``gold``) of label names; a None
    prediction counts as wrong."""
    cls = top1_metrics(gold, pred)
    return {f"{prefix}accuracy": cls["token_accuracy"], f"{prefix}macro_f1": cls["macro_f1"]}


def score(gold: Sequence[str], probs: np.ndarray, labels: list[str], threshold: float,
          covered: np.ndarray | None = None) -> dict[str, Any]:
    """The offline report for flat gold names and calibrated probabilities (n, C); ``covered``
    says which events keep a label (default: confidence >= threshold)."""
    y_true, extended = label_ids(gold, labels)
    y_pred = probs.argmax(-1) if len(probs) else np.zeros(0, dtype=np.int64)
    conf = probs.max(-1) if len(probs) else np.zeros(0)
    return offline_metrics(y_true, y_pred, conf, threshold, extended, covered)


def evaluate(model_dir: str | Path, data: str | Path, json_out: str | Path | None = None, *,
             streaming: Optional[StreamingReplay] = None, skip_bad_rows: bool = False,
             plots: bool = True, progress: bool = False) -> dict[str, Any]:
    """The report of DESIGN.md's evaluation contract; with ``streaming`` (the live replay),
    also its ``streaming`` block."""
    if streaming is True:
        raise ConfigError("evaluate(streaming=...) takes the live replay (stream.tools.replay."
                          "streaming_evaluation), not True: trainer does not import stream")
    lm = load_artifact(model_dir)
    frame, report = read_events(data, require_label=True, skip_bad_rows=skip_bad_rows,
                                numeric_columns=lm.encoder.data.num_features)
    base_dir = Path(data).parent
    sids, probs, covered = lm.predict_decisions(frame, base_dir=base_dir)
    flat = np.concatenate(probs) if probs else np.zeros((0, len(lm.labels)))
    res = score(frame["step_name"].tolist(), flat, lm.labels, lm.threshold,
                np.concatenate(covered) if covered else None)
    out: dict[str, Any] = {"events": int(len(frame)), "sessions": int(frame["session_id"].nunique()),
                           "model_version": lm.version, "model_kind": lm.kind,
                           "offline": res["offline"]}
    emissions: dict | None = {} if (json_out and plots) else None
    if streaming is not None:
        out["streaming"] = streaming(lm, frame, offline_probs=dict(zip(sids, probs)),
                                     offline_covered=dict(zip(sids, covered)),
                                     base_dir=base_dir, progress=progress,
                                     emissions_out=emissions)
    out["details"] = {k: res[k] for k in ("classification", "selective", "risk_coverage")}
    if report.bad_rows:
        out["skipped_rows"] = [str(b) for b in report.bad_rows]
    if json_out:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=2, default=json_default), encoding="utf-8")
        if plots:
            from trainer.report import write_report, write_timelines
            plots_dir = json_out.parent / (json_out.stem + "_plots")
            write_report(res, plots_dir)
            if emissions:
                write_timelines(_histories(frame, emissions), plots_dir)
    return out


def _histories(frame: pd.DataFrame, emissions: dict) -> dict[str, list[dict[str, Any]]]:
    """Each replayed session's label history, event by event (``report.session_timeline``)."""
    from trainer.report import session_timeline
    return {sid: session_timeline(g["_ts"].tolist(), g["event_name"].tolist(), emissions[sid],
                                  g["step_name"].tolist())
            for sid, g in frame.groupby("session_id", sort=False) if sid in emissions}


def predict(model_dir: str | Path, data: str | Path, out_csv: str | Path, *,
            skip_bad_rows: bool = False) -> pd.DataFrame:
    """Label every event; abstained events get an empty ``pred_step_name``, id -1.

    Columns, and the live record field (``tagger.labels``) each corresponds to: the contract's
    ``session_id, event_name, pred_step_name`` (``step_name``; "" here where live says null),
    ``pred_confidence`` (``confidence``), ``pred_step_id`` (no live field; -1 when abstained),
    ``abstained`` (``abstained``); then ``event_id``, ``timestamp`` and ``best_step_name``,
    the most likely step even where the model abstained (equal to ``pred_step_name``
    elsewhere): the best guess for a reviewer, never a claim that clears the threshold.
    """
    lm: LoadedModel = load_artifact(model_dir)
    frame, _ = read_events(data, require_label=False, skip_bad_rows=skip_bad_rows,
                           numeric_columns=lm.encoder.data.num_features)
    _, probs, covered = lm.predict_decisions(frame, base_dir=Path(data).parent)
    flat = np.concatenate(probs)
    ids = flat.argmax(-1)
    conf = flat.max(-1)
    abstained = ~np.concatenate(covered)
    result = pd.DataFrame({
        "session_id": frame["session_id"].values,
        "event_name": frame["event_name"].values,
        "pred_step_name": np.where(abstained, "", np.asarray(lm.labels, dtype=object)[ids]),
        "pred_confidence": np.round(conf, 6),
        "pred_step_id": np.where(abstained, -1, ids),
        "abstained": abstained,
        "event_id": frame["event_id"].values,
        "timestamp": frame["timestamp"].values,
        "best_step_name": np.asarray(lm.labels, dtype=object)[ids],
    })
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(out_csv, index=False)
    return result


__all__ = ["evaluate", "predict", "score", "label_ids", "ABSTAIN"]
