"""Streaming evaluation: replay labelled sessions event by event through ``LiveTagger``, the
code the live worker runs, and score the label records it emits (``evaluate --streaming``).

Sessions advance in lockstep, many at a time (one event of each per ``process`` call), which
changes nothing numerically (sessions are independent) and lets the model step them in one
batch. Each record is placed at the step t (0-based event count - 1) of its session when it
was emitted; the incremental metrics of Madureira & Schlangen (2020) come from those
emissions (``trainer.metrics.incremental_from_emissions``).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from stream.records import EventIn
from stream.revisions import RevisionPolicy
from stream.tagging import LiveTagger
from trainer.artifacts import LoadedModel
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
                    progress: bool = False) -> tuple[dict[str, list[tuple[int, int, Optional[str]]]], dict[str, Any]]:
    """Run sessions through the tagger; returns per-session emissions (position, step, label)
    and timing. Every event's final record is checked to exist exactly once."""
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
        _lockstep(tagger, sessions, ids, parallel, emissions, finals, bar)
    finally:
        torch.set_num_threads(threads)
    n_events = sum(len(v) for v in sessions.values())
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    bad = {sid: (finals[sid], len(sessions[sid])) for sid in ids if finals[sid] != len(sessions[sid])}
    if bad:
        raise AssertionError(f"final records != events for sessions {list(bad.items())[:5]}")
    return emissions, {"seconds": seconds, "events": n_events,
                       "us_per_event": 1e6 * seconds / max(n_events, 1)}


def _lockstep(tagger: LiveTagger, sessions, ids, parallel, emissions, finals, bar) -> None:
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
                step = tagger.sessions[sid].n - 1
                emissions[sid].append((rec["seq"], step, rec["step_name"]))
                finals[sid] += bool(rec["final"])
            if bar is not None:
                bar.update(out.accepted)
        tagger.drop(group)


def streaming_evaluation(lm: LoadedModel, frame: pd.DataFrame, *, offline_probs: Mapping[str, np.ndarray],
                         base_dir=None, policy: RevisionPolicy | None = None, progress: bool = False,
                         emissions_out: dict | None = None) -> dict[str, Any]:
    """The ``streaming`` block of ``evaluate --streaming`` (DESIGN.md contract keys first).

    ``emissions_out``, when given, receives every session's emissions ``(seq, step, label)``
    in emission order (for the session timeline plots)."""
    if base_dir is not None:
        lm.base_dir = base_dir
    tagger = LiveTagger(lm, policy)
    sessions = frame_events(frame)
    emissions, timing = replay_sessions(tagger, sessions, progress=progress)
    if emissions_out is not None:
        emissions_out.update(emissions)
    gold = {sid: g["step_name"].tolist() for sid, g in frame.groupby("session_id", sort=False)}
    per_session = []
    for sid, evs in sessions.items():
        probs = offline_probs[sid]
        offline = [lm.labels[i] if c >= lm.threshold else None
                   for i, c in zip(probs.argmax(-1), probs.max(-1))]
        per_session.append(incremental_from_emissions(len(evs), emissions[sid], gold=gold[sid], offline=offline))
    agg = aggregate_incremental(per_session)
    keys = ("first_accuracy", "final_accuracy", "edit_overhead", "correction_time",
            "relative_correctness", "final_equals_offline")
    out = {k: agg.get(k) for k in keys}
    out.update({k: v for k, v in agg.items() if k not in out})
    out["lookahead"] = tagger.lookahead
    out["us_per_event"] = round(timing["us_per_event"], 1)
    out["policy"] = {"margin": tagger.policy.margin, "abstain_band": tagger.policy.abstain_band}
    return out
