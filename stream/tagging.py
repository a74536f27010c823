"""The tagging loop: accepted events in, label records out. No Kafka, no Redis, no asyncio.

``LiveTagger`` keeps the open sessions it owns in memory (encoder context, the model's cached
forward state, the labels still pending) and turns a batch of events into label records:

- every new event gets a first record (``revision`` 0) at once;
- an earlier event whose label or abstention changes under the revision policy gets a new
  record (``revision`` + 1);
- an event gets exactly one ``final`` record, when it leaves the model's lookahead (no later
  event can change it any more) or when its session ends; nothing follows it.

Work per event is bounded: the model advances each session by one cached ``step`` (cost
independent of the session's length), and sessions in a batch are stepped together.

Persistence is the caller's job: ``snapshot(sid)`` gives a JSON-able dict of everything needed
to resume (the raw window, the feature context, pending labels and revision numbers);
``restore`` rebuilds the model state from the raw window. The live worker writes snapshots
through to Redis; ``evaluate --streaming`` keeps them in memory. Both run this same code.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from stream.errors import ModelNotServable
from stream.revisions import Decision, RevisionPolicy
from trainer.artifacts import LoadedModel, softmax_t
from trainer.features import EncodedSession, EventContext, derive

log = logging.getLogger(__name__)


def iso_now(clock: Callable[[], float] = time.time) -> str:
    return datetime.fromtimestamp(clock(), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Pending:
    """An event whose final record has not been emitted yet."""

    seq: int
    event_id: str
    timestamp: str
    event_name: str
    shown: Optional[Decision] = None
    revision: int = -1                 # last emitted revision (-1: none yet)
    probs: Optional[np.ndarray] = None  # latest calibrated probabilities (not persisted)

    def to_dict(self) -> dict[str, Any]:
        # the shown step by name: an index would point at another step of a retrained model
        return {"seq": self.seq, "event_id": self.event_id, "timestamp": self.timestamp,
                "event_name": self.event_name, "revision": self.revision,
                "step": None if self.shown is None else self.shown.label,
                "conf": None if self.shown is None else self.shown.confidence}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], labels: Sequence[str] = ()) -> "Pending":
        """``labels``: the serving model's, to read a snapshot written before labels were
        stored by name (``label``: an index; one out of range reads as an abstention)."""
        shown = None
        if d.get("revision", -1) >= 0:
            if "step" in d:
                name = d["step"]
            else:
                i = d.get("label")
                name = labels[i] if isinstance(i, int) and 0 <= i < len(labels) else None
            shown = Decision(name, float(d.get("conf") or 0.0))
        return cls(d["seq"], d["event_id"], d["timestamp"], d["event_name"], shown, d.get("revision", -1))


@dataclass
class LiveSession:
    session_id: str
    n: int = 0                                   # events accepted so far (next seq)
    ctx: EventContext = field(default_factory=EventContext)
    state: Any = None                            # the model's cached forward state
    pending: list[Pending] = field(default_factory=list)
    window: list[dict[str, Any]] = field(default_factory=list)  # last raw events, for rebuilds
    ids: set[str] = field(default_factory=set)
    model_version: Optional[str] = None
    last_seen: float = 0.0
    closed: bool = False
    partition: Optional[int] = None
    new_raw: list[dict[str, Any]] = field(default_factory=list)  # raw events since last snapshot
    new_ids: list[str] = field(default_factory=list)
    held: list[Any] = field(default_factory=list)   # accepted, waiting out the lateness window
    max_ts: float = float("-inf")


@dataclass
class ProcessResult:
    """What one ``process`` call produced."""

    records: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    duplicates: int = 0
    touched: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (index, reason, detail)


class LiveTagger:
    def __init__(self, model: LoadedModel, policy: RevisionPolicy | None = None, *,
                 window: int | None = None, clock: Callable[[], float] = time.time,
                 max_events_per_session: int = 100_000, lateness_s: float = 0.0,
                 max_sessions: int = 50_000, max_ids: int = 2_000_000):
        self.policy = policy or RevisionPolicy()
        self.clock = clock
        self.sessions: dict[str, LiveSession] = {}
        self.max_events = max_events_per_session
        self.lateness_s = lateness_s
        self.max_sessions = max_sessions
        # event ids held in memory over all sessions (dedupe of redeliveries): a second bound
        # next to max_sessions, since one session may hold up to max_events_per_session ids
        self.max_ids = max_ids
        self.n_ids = 0
        self.evicted: deque[str] = deque(maxlen=1000)  # the most recent evictions (for tests, logs)
        self.evict_enabled = True  # the worker turns it off while the store is behind
        # sessions never evicted whatever their age: those of a batch whose save is in flight
        # (the worker's overlap), which the store may not hold yet
        self.pinned: frozenset[str] | set[str] = frozenset()
        self._window = window
        self.loaded = model   # the LoadedModel served (its .model is the network)
        self._check(model)

    # ---- the model ----------------------------------------------------------------------
    @staticmethod
    def _check(model: LoadedModel) -> None:
        if model.kind != "neural" or model.model is None:
            raise ModelNotServable(f"model {model.version} is a {model.kind} baseline; the live tagger needs a "
                             f"neural model with bounded lookahead")
        if model.lookahead is None:
            raise ModelNotServable(f"model {model.version} has unbounded lookahead (offline only); train it "
                             f"with model.lookahead set to serve it live")

    @property
    def lookahead(self) -> int:
        return int(self.loaded.lookahead)

    @property
    def window_size(self) -> int:
        a = self.loaded.model.args
        return self._window or (a.context + a.lookahead)

    def swap(self, model: LoadedModel) -> None:
        """Serve a new model from the next event on. Open sessions keep their pending labels
        (step names) and revision numbers; their model state is rebuilt from the raw window
        (re-encoded with the new encoders, sessions in one batch) the next time they are
        touched. Probabilities of the old model are dropped: they are over its label list.
        A pending label whose step the new model does not know is decided afresh by it; an
        event that is already past the new model's (shorter) lookahead gets its final
        record at the session's next event."""
        self._check(model)
        self.loaded = model
        for s in self.sessions.values():
            s.state = None
            for p in s.pending:
                p.probs = None

    # ---- events -------------------------------------------------------------------------
    # inference_mode, not just the model's no_grad: tensors skip version counting and view
    # tracking, which is much of a live step's cost (hundreds of small ops per round). The
    # states it makes are inference tensors, used only here.
    @torch.inference_mode()
    def process(self, events: Sequence[Any], partitions: Sequence[Optional[int]] | None = None) -> ProcessResult:
        """Tag a batch of parsed events (``stream.records.EventIn``).

        Events reach the model in arrival order, or, with a lateness window, in timestamp
        order: an event is held until the session has seen an event at least ``lateness_s``
        later (or ends), so events that arrive out of order within the window are put back in
        order before they are labelled. Events later than the window are labelled on arrival
        (they are never dropped)."""
        out = ProcessResult()
        rounds: list[list[tuple[LiveSession, Any]]] = []
        depth: dict[str, int] = {}
        ends: list[LiveSession] = []
        now = self.clock()

        def schedule(sess: LiveSession, ev: Any) -> None:
            k = depth.get(sess.session_id, 0)
            depth[sess.session_id] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append((sess, ev))

        for i, ev in enumerate(events):
            sess = self.sessions.get(ev.session_id)
            if sess is None:
                sess = self.sessions[ev.session_id] = LiveSession(ev.session_id)
            sess.last_seen = now
            if partitions is not None:
                sess.partition = partitions[i]
            if ev.type == "session_end":
                for held in sess.held:
                    schedule(sess, held)
                sess.held = []
                ends.append(sess)
                continue
            if ev.event_id in sess.ids:
                out.duplicates += 1
                continue
            if len(sess.ids) >= self.max_events:
                out.rejected.append((i, "session_too_long",
                                     f"session {ev.session_id!r} already has {len(sess.ids)} events "
                                     f"(limit {self.max_events})"))
                continue
            sess.ids.add(ev.event_id)
            self.n_ids += 1
            sess.new_ids.append(ev.event_id)
            if sess.closed:
                sess.closed = False  # a late event reopens the session; earlier finals stand
            out.accepted += 1
            if self.lateness_s <= 0:
                schedule(sess, ev)
                continue
            sess.held.append(ev)
            sess.held.sort(key=lambda e: e.ts)  # stable: ties keep arrival order
            sess.max_ts = max(sess.max_ts, ev.ts)
            while sess.held and sess.held[0].ts <= sess.max_ts - self.lateness_s:
                schedule(sess, sess.held.pop(0))
        for rnd in rounds:
            self._step(rnd, out.records)
            out.touched.update(s.session_id for s, _ in rnd)
        for i, ev in enumerate(events):
            if ev.type != "session_end" and ev.session_id in self.sessions:
                out.touched.add(ev.session_id)  # held events must reach the store too
        for sess in ends:
            out.records.extend(self._finalize(sess))
            out.touched.add(sess.session_id)
            out.closed.add(sess.session_id)
        self._evict(out.touched)
        return out

    @torch.inference_mode()
    def finalize(self, session_ids: Iterable[str]) -> list[dict[str, Any]]:
        """End sessions (inactivity timeout): held events are labelled, then every pending
        event gets its final record."""
        records: list[dict[str, Any]] = []
        sessions = [self.sessions[sid] for sid in session_ids if sid in self.sessions]
        held = [(s, list(s.held)) for s in sessions if s.held]
        for s, _ in held:
            s.held = []
        k = 0
        while True:
            rnd = [(s, evs[k]) for s, evs in held if k < len(evs)]
            if not rnd:
                break
            self._step(rnd, records)
            k += 1
        for sess in sessions:
            records.extend(self._finalize(sess))
        return records

    def _evict(self, keep: set[str]) -> None:
        """Bound the sessions (and the event ids) held in memory: the least recently seen
        sessions go (their state is in the store and is read back if they return)."""
        excess = len(self.sessions) - self.max_sessions
        if (excess <= 0 and self.n_ids <= self.max_ids) or not self.evict_enabled:
            return
        victims = sorted((s.last_seen, sid) for sid, s in self.sessions.items()
                         if sid not in keep and sid not in self.pinned)
        for k, (_, sid) in enumerate(victims):
            if k >= excess and self.n_ids <= self.max_ids:
                break
            self.evicted.append(sid)
            self.n_ids -= len(self.sessions.pop(sid).ids)

    def inactive(self, now: float, timeout: float) -> list[str]:
        return [sid for sid, s in self.sessions.items()
                if not s.closed and (s.pending or s.held) and now - s.last_seen >= timeout]

    def drop(self, session_ids: Iterable[str]) -> None:
        """Forget sessions held in memory (closed ones, or after losing their partition)."""
        for sid in session_ids:
            sess = self.sessions.pop(sid, None)
            if sess is not None:
                self.n_ids -= len(sess.ids)

    # ---- internals ----------------------------------------------------------------------
    def _raw(self, ev: Any) -> dict[str, Any]:
        raw = dict(ev.fields)
        raw.update(session_id=ev.session_id, event_id=ev.event_id, timestamp=ev.timestamp,
                   event_name=ev.event_name, _ts=ev.ts)
        return raw

    def _ensure_state(self, sessions: Iterable[LiveSession]) -> None:
        """Sessions without model state (new, restored, or after a swap) get it: fresh, or
        rebuilt by running their raw window through the current encoder and model. The
        rebuild steps every such session at once (one encode and one ``step`` call per
        position in the window, not per event), and each pending event keeps the
        probabilities of the last step that saw it: for an event already past the model's
        lookahead those are its final ones."""
        net = self.loaded.model
        enc = self.loaded.encoder
        todo = [s for s in {id(s): s for s in sessions}.values()
                if s.state is None or s.model_version != self.loaded.version]
        derived: list[list[Any]] = []
        for sess in todo:
            ctx = EventContext(start_ts=sess.ctx.start_ts)
            rows = []
            for raw in sess.window:
                d, ctx = derive(raw, ctx, enc.data, enc.auto_cols)
                rows.append(d)
            derived.append(rows)
            sess.state = net.init_state()
            sess.model_version = self.loaded.version
        for k in range(max((len(rows) for rows in derived), default=0)):
            active = [i for i, rows in enumerate(derived) if k < len(rows)]
            encoded = enc.encode_derived([derived[i][k] for i in active], self.loaded.base_dir)
            states, outs = net.step([todo[i].state for i in active], step_batch(encoded, net))
            sizes = [len(o) for o in outs]
            all_probs = np.split(_calibrated(torch.cat(outs), self.loaded.temperature), np.cumsum(sizes)[:-1])
            for i, state, probs in zip(active, states, all_probs):
                sess = todo[i]
                sess.state = state
                last = sess.n - len(derived[i]) + k          # seq of the window event just stepped
                first = last - len(probs) + 1
                for p in sess.pending:
                    if first <= p.seq <= last:
                        p.probs = probs[p.seq - first]

    def _step(self, rnd: list[tuple[LiveSession, Any]], records: list[dict[str, Any]]) -> None:
        self._ensure_state(s for s, _ in rnd)
        net = self.loaded.model
        enc = self.loaded.encoder
        raws = [self._raw(ev) for _, ev in rnd]
        derived = []
        for (sess, _), raw in zip(rnd, raws):
            d, sess.ctx = derive(raw, sess.ctx, enc.data, enc.auto_cols)
            derived.append(d)
        # one encoding call for the whole round: the per-call numpy overhead dominates per event
        encoded = enc.encode_derived(derived, self.loaded.base_dir)
        states, outs = net.step([s.state for s, _ in rnd], step_batch(encoded, net))
        L, W = self.lookahead, self.window_size
        thr, version = self.loaded.threshold, self.loaded.version
        stable = self.loaded.policy == "stable"
        agree = self.loaded.agreement          # stable: a final that agrees with arrival is kept
        margin = self.loaded.agreement_margin  # ... at confidence >= thr - margin
        labels = self.loaded.labels
        emitted_at = iso_now(self.clock)
        # one softmax and one copy to numpy for the whole round, then a slice per session.
        # Labels shown before an event is final use the calibration of their depth k (later
        # events visible); finals use the full-lookahead one, so they equal offline labels.
        sizes = [len(o) for o in outs]
        cuts = np.cumsum(sizes)[:-1]
        logits = torch.cat(outs)
        all_probs = np.split(_calibrated(logits, self.loaded.temperature), cuts)
        all_live = all_probs
        if self.loaded.manifest["calibration"].get("prefix_temperatures"):
            all_live = np.split(self.loaded.prefix_probs_rows(logits.float().cpu().numpy(), sizes), cuts)
        for (sess, ev), raw, state, probs, live in zip(rnd, raws, states, all_probs, all_live):
            sess.state = state
            sess.window.append(raw)
            if len(sess.window) > W:
                del sess.window[:len(sess.window) - W]
            sess.new_raw.append(raw)
            sess.pending.append(Pending(sess.n, ev.event_id, ev.timestamp, ev.event_name))
            sess.n += 1
            v = len(probs)                                             # (v, C), oldest first
            first = sess.n - v
            keep = []
            for p in sess.pending:
                j = p.seq - first
                if j < 0:
                    # out of the model's view: past the lookahead of a model swapped in with a
                    # shorter one. Its probabilities from the rebuild are the new model's
                    # final ones; without them (context lost) it waits for the session end.
                    if p.probs is None:
                        keep.append(p)
                        continue
                    d = self.policy.final(p.probs, thr, labels, p.shown if agree else None, margin)
                    is_final = True
                else:
                    p.probs = probs[j]
                    is_final = p.seq <= sess.n - 1 - L
                    if is_final:
                        d = self.policy.final(p.probs, thr, labels, p.shown if agree else None, margin)
                    else:
                        d = self.policy.decide(p.shown, live[j], self.loaded.prefix_threshold(v - 1 - j),
                                               labels, hold=stable)
                        keep.append(p)
                if is_final or not d.same_as(p.shown):
                    p.revision += 1
                    p.shown = d
                    records.append(_record(sess.session_id, p, d, is_final, version, emitted_at))
            sess.pending = keep

    def _finalize(self, sess: LiveSession) -> list[dict[str, Any]]:
        if sess.pending and any(p.probs is None for p in sess.pending):
            sess.state = None
            self._ensure_state([sess])
        thr, version = self.loaded.threshold, self.loaded.version
        emitted_at = iso_now(self.clock)
        records = []
        agree, margin = self.loaded.agreement, self.loaded.agreement_margin
        labels = self.loaded.labels
        for p in sess.pending:
            if p.probs is not None:
                d = self.policy.final(p.probs, thr, labels, p.shown if agree else None, margin)
            elif p.shown is not None and (p.shown.label is None or p.shown.label in labels):
                d = p.shown  # context lost (e.g. Redis restarted): final as last shown
            else:  # nothing to go on, or a step this model does not know: abstain
                d = Decision(None, 0.0)
            p.revision += 1
            p.shown = d
            records.append(_record(sess.session_id, p, d, True, version, emitted_at))
        sess.pending = []
        sess.closed = True
        return records

    # ---- persistence --------------------------------------------------------------------
    def snapshot(self, sid: str, *, clear: bool = True) -> dict[str, Any]:
        """The session's resumable state, JSON-able. ``new_raw``/``new_ids`` are the raw events
        and ids added since the previous snapshot, so a store can append instead of rewrite.
        ``clear=False`` keeps them until ``saved`` says the store has them (the worker: a
        save that fails must not lose them)."""
        s = self.sessions[sid]
        snap = {"session_id": sid, "n": s.n, "ctx": s.ctx.to_dict(), "closed": s.closed,
                "pending": [p.to_dict() for p in s.pending], "model_version": s.model_version,
                "last_seen": s.last_seen, "partition": s.partition,
                "new_raw": list(s.new_raw), "new_ids": list(s.new_ids),
                "held": [_event_dict(e) for e in s.held],
                "max_ts": s.max_ts if s.max_ts != float("-inf") else None}
        if clear:
            s.new_raw.clear()
            s.new_ids.clear()
        return snap

    def pending_deltas(self, sids: Iterable[str]) -> dict[str, tuple[int, int]]:
        """How many raw events and ids each session has not yet handed to a store."""
        return {sid: (len(self.sessions[sid].new_raw), len(self.sessions[sid].new_ids))
                for sid in sids if sid in self.sessions}

    def saved(self, marks: Mapping[str, tuple[int, int]]) -> None:
        """The store holds the first (raw, ids) deltas counted by ``pending_deltas``."""
        for sid, (n_raw, n_ids) in marks.items():
            s = self.sessions.get(sid)
            if s is not None:
                del s.new_raw[:n_raw]
                del s.new_ids[:n_ids]

    def restore(self, snap: Mapping[str, Any], window: Sequence[Mapping[str, Any]], ids: Iterable[str]) -> LiveSession:
        """Resume a session from a store (after a restart or rebalance)."""
        sess = LiveSession(snap["session_id"], n=int(snap["n"]), ctx=EventContext.from_dict(snap.get("ctx")),
                           pending=[Pending.from_dict(p, self.loaded.labels) for p in snap.get("pending", [])],
                           window=[dict(w) for w in window][-self.window_size:], ids=set(ids),
                           model_version=None, last_seen=float(snap.get("last_seen") or self.clock()),
                           closed=bool(snap.get("closed")), partition=snap.get("partition"),
                           held=[_event_from_dict(d) for d in snap.get("held", [])],
                           max_ts=float(snap["max_ts"]) if snap.get("max_ts") is not None else float("-inf"))
        old = self.sessions.get(sess.session_id)
        if old is not None:
            self.n_ids -= len(old.ids)
        self.sessions[sess.session_id] = sess
        self.n_ids += len(sess.ids)
        return sess


def _event_dict(ev: Any) -> dict[str, Any]:
    return {"session_id": ev.session_id, "event_id": ev.event_id, "timestamp": ev.timestamp, "ts": ev.ts,
            "event_name": ev.event_name, "type": ev.type, "fields": dict(ev.fields)}


def _event_from_dict(d: Mapping[str, Any]) -> Any:
    from stream.records import EventIn
    return EventIn(d["session_id"], d["event_id"], d["timestamp"], float(d["ts"]), d["event_name"],
                   d.get("type", "event"), dict(d.get("fields", {})))


def _calibrated(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """Final probabilities exactly as the offline pass computes them (``softmax_t`` in
    float64 on the float32 logits): a float32 softmax rounds confidences near 1 by up to
    6e-8, enough to move an event across a threshold the offline pass keeps it below."""
    return softmax_t(logits.float().cpu().numpy(), temperature)


def step_batch(enc: EncodedSession, model) -> dict[str, torch.Tensor]:
    """Encoded rows (row i = session i's new event) -> (B, 1, ...) tensors for ``Tagger.step``."""
    device = next(model.parameters()).device
    return {name: torch.from_numpy(np.ascontiguousarray(getattr(enc, name)))[:, None].to(device)
            for name in ("event", "tokens", "cats", "nums", "text", "image", "lex")}


def _record(sid: str, p: Pending, d: Decision, final: bool, version: str, emitted_at: str) -> dict[str, Any]:
    return {"session_id": sid, "event_id": p.event_id, "seq": p.seq, "timestamp": p.timestamp,
            "event_name": p.event_name, "step_name": d.label, "confidence": round(d.confidence, 6),
            "abstained": d.label is None, "revision": p.revision, "final": final,
            "model_version": version, "emitted_at": emitted_at}
