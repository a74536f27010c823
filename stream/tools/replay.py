"""Streaming evaluation: replay labelled sessions event by event through ``LiveTagger``, the
code the live worker runs, and score the label records it emits (``evaluate --streaming``).

Sessions advance in lockstep, many at a time (one event of each per ``process`` call), which
changes nothing numerically (sessions are independent) and lets the model step them in one
batch. Each record is placed at the step t (0-based event count - 1) of its session when it
was emitted; the incremental metrics of Madureira & Schlangen (2020) come from those
emissions (``trainer.metrics.incremental_from_emissions``).

``streaming_evaluation`` is the ``trainer.evaluate.StreamingReplay`` that ``tagger.cli`` hands
to ``tagger evaluate --streaming`` and ``tagger cv`` (``trainer`` does not import ``stream``).
A tool rather than part of the service: the worker never replays; this drives the same
``LiveTagger`` the worker runs, from a frame instead of a topic.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from stream.errors import StreamError
from stream.records import EventIn
from stream.revisions import RevisionPolicy
from stream.tagging import LiveTagger
from trainer.artifacts import LoadedModel
from trainer.evaluate import top1_scores
from trainer.metrics import aggregate_incremental, incremental_from_emissions

_INTERNAL = {"seq", "_line", "_ts", "step_name"}


def frame_events(frame: pd.DataFrame) -> dict[str, list[EventIn]]:
    """A canonical frame -> each session's events as the worker would receive them."""
    out: dict[str, list[EventIn]] = {}
    cols = [c for c in frame.columns if c not in _INTERNAL]
    for rec, ts in zip(frame[cols].to_dict("records"), frame["_ts"].tolist()):
        fields = {k: v for k, v in rec.items() if not (isinstance(v, float) and np.isnan(v))}
        out.setdefault(rec["session_id"], []).append(EventIn(
            session_id=rec["session_id"], event_id=rec["event_id"], timestamp=rec["timestamp"], ts=ts,
            event_name=rec["event_name"], type="event", fields=fields))
    return out


def _end(sid: str) -> EventIn:
    return EventIn(session_id=sid, event_id="", timestamp="", ts=0.0, event_name="", type="session_end", fields={})


def replay_sessions(tagger: LiveTagger, sessions: Mapping[str, Sequence[EventIn]], *, parallel: int = 64,
                    progress: bool = False, first_top1: dict[str, dict[int, str]] | None = None
                    ) -> tuple[dict[str, list[tuple[int, int, Optional[str]]]], dict[str, Any]]:
    """Run sessions through the tagger; returns per-session emissions (position, step, label)
    and timing. Every event's final record is checked to exist exactly once. With
    ``first_top1`` (a dict to fill), it also records each event's top-1 label at its first
    emission, abstained or not: the model's best guess on arrival."""
    emissions: dict[str, list[tuple[int, int, Optional[str]]]] = {sid: [] for sid in sessions}
    finals: dict[str, int] = {sid: 0 for sid in sessions}
    ids = list(sessions)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(v) for v in sessions.values()), desc="streaming replay", unit="event", leave=False)
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small step per round: extra threads only add overhead
    started = time.perf_counter()
    n_events = 0
    try:
        _lockstep(tagger, sessions, ids, parallel, emissions, finals, bar, first_top1)
    finally:
        torch.set_num_threads(threads)
    n_events = sum(len(v) for v in sessions.values())
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    bad = {sid: (finals[sid], len(sessions[sid])) for sid in ids if finals[sid] != len(sessions[sid])}
    if bad:
        raise StreamError(f"final records != events for sessions {list(bad.items())[:5]}")
    return emissions, {"seconds": seconds, "events": n_events,
                       "us_per_event": 1e6 * seconds / max(n_events, 1)}


def _lockstep(tagger: LiveTagger, sessions, ids, parallel, emissions, finals, bar, first_top1=None) -> None:
    """Advance ``parallel`` sessions at a time, one event each per call, then end them."""
    for g in range(0, len(ids), parallel):
        group = ids[g:g + parallel]
        longest = max(len(sessions[s]) for s in group)
        for t in range(longest + 1):
            batch = []
            for sid in group:
                evs = sessions[sid]
                if t < len(evs):
                    batch.append(evs[t])
                elif t == len(evs):
                    batch.append(_end(sid))
            out = tagger.process(batch)
            for rec in out.records:
                sid = rec["session_id"]
                sess = tagger.sessions[sid]
                step = sess.n - 1
                emissions[sid].append((rec["seq"], step, rec["step_name"]))
                finals[sid] += bool(rec["final"])
                if first_top1 is not None and rec["revision"] == 0:
                    first_top1.setdefault(sid, {})[rec["seq"]] = _top1(tagger, sess, rec)
            if bar is not None:
                bar.update(out.accepted)
        tagger.drop(group)


def _top1(tagger: LiveTagger, sess, rec: Mapping[str, Any]) -> Optional[str]:
    """The best label behind an event's first record: its shown label, or when it abstained,
    the arg-max of the probabilities it was decided on (still held while it is pending)."""
    if rec["step_name"] is not None:
        return rec["step_name"]
    for p in sess.pending:
        if p.seq == rec["seq"] and p.probs is not None:
            return tagger.loaded.labels[int(np.argmax(p.probs))]
    return None


def streaming_evaluation(lm: LoadedModel, frame: pd.DataFrame, *, offline_probs: Mapping[str, np.ndarray],
                         base_dir=None, policy: RevisionPolicy | None = None, progress: bool = False,
                         per_event: bool = False, offline_covered: Mapping[str, np.ndarray] | None = None,
                         emissions_out: dict | None = None) -> dict[str, Any]:
    """The ``streaming`` block of ``evaluate --streaming`` (DESIGN.md contract keys first).
    ``first_top1_*``: the top-1 label behind each event's first record (its best guess on
    arrival, abstained or not), scored like the offline top-1 labels. ``per_event`` adds
    those labels, frame order, as ``first_top1_labels``, and the label each event's first
    record showed (None: abstained) as ``first_shown_labels`` (for ``tagger cv``).
    ``first_coverage``: the share of events labelled on arrival (not abstained).
    ``emissions_out``, when given, receives every session's emissions ``(seq, step, label)``
    in emission order (for the session timeline plots)."""
    if base_dir is not None:
        lm.base_dir = base_dir
    tagger = LiveTagger(lm, policy)
    sessions = frame_events(frame)
    firsts: dict[str, dict[int, str]] = {}
    emissions, timing = replay_sessions(tagger, sessions, progress=progress, first_top1=firsts)
    if emissions_out is not None:
        emissions_out.update(emissions)
    gold = {sid: g["step_name"].tolist() for sid, g in frame.groupby("session_id", sort=False)}
    per_session = []
    top1: list[Optional[str]] = []
    shown: list[Optional[str]] = []
    for sid, evs in sessions.items():
        probs = offline_probs[sid]
        cov = offline_covered[sid] if offline_covered is not None else probs.max(-1) >= lm.threshold
        offline = [lm.labels[i] if c else None for i, c in zip(probs.argmax(-1), cov)]
        per_session.append(incremental_from_emissions(len(evs), emissions[sid], gold=gold[sid], offline=offline))
        got = firsts.get(sid, {})
        # an event final at once (lookahead 0) that abstained: its first is its offline arg-max
        top1.extend(got.get(j) or lm.labels[int(probs[j].argmax())] for j in range(len(evs)))
        on_arrival = {j: label for j, t, label in emissions[sid] if t == j}   # the last one wins
        shown.extend(on_arrival.get(j) for j in range(len(evs)))
    agg = aggregate_incremental(per_session)
    keys = ("first_accuracy", "final_accuracy", "edit_overhead", "correction_time",
            "relative_correctness", "final_equals_offline")
    out = {k: agg.get(k) for k in keys}
    out.update({k: v for k, v in agg.items() if k not in out})
    flat_gold = [g for sid in sessions for g in gold[sid]]
    out.update(top1_scores(flat_gold, top1, prefix="first_top1_"))
    n_events = out.get("events") or 0
    out["first_coverage"] = out["n_first_answered"] / n_events if n_events else None
    if per_event:
        out["first_top1_labels"] = top1
        out["first_shown_labels"] = shown
    out["lookahead"] = tagger.lookahead
    out["us_per_event"] = round(timing["us_per_event"], 1)
    out["policy"] = {"margin": tagger.policy.margin, "abstain_band": tagger.policy.abstain_band}
    return out
