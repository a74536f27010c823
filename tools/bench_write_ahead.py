"""Per-batch cost of the worker's batch loop against a real Redis (issue 11, write-ahead
markers): ``WorkerService.handle`` in process, the tiny test model, sessions in Redis under a
throwaway prefix (deleted after), and a producer stand-in that acknowledges every send at
once (so the broker's latency is left out and Redis's round trips show). Run it on two
checkouts and compare::

    nice .venv/bin/python tools/bench_write_ahead.py --batches 400 --batch 20

Prints wall time per batch (mean, p50, p99) and CPU time per batch of this process. With
``--ab`` (a checkout that has write-ahead markers) batches alternate between markers on and
off (``WorkerService._mark_ahead`` returning None: no marker written, none to remove), in one
process, so that a noisy machine weighs on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class AckingProducer:
    """Acknowledges each send at once with offsets counted per partition (4 partitions)."""

    def __init__(self):
        self.offsets: dict[int, int] = {}

    async def send(self, topic, key, value, partition, timestamp, headers):
        from aiokafka.partitioner import murmur2
        p = (murmur2(key) & 0x7FFFFFFF) % 4 if key else 0
        off = self.offsets.get(p, 0)
        self.offsets[p] = off + 1
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(SimpleNamespace(topic=topic, partition=p, offset=off))
        return fut


def batches(log: Path, sessions: int, size: int, rounds: int):
    from stream.tools.publisher import replay_messages
    from trainer.loading import read_events
    frame, _ = read_events(log, require_label=False)
    msgs, _ = replay_messages(frame, sessions=sessions)
    for r in range(rounds):
        evs = []
        for i, m in enumerate(msgs):
            m = {**m, "session_id": f"{m['session_id']}-{r}", "published_at": time.time()}
            evs.append(SimpleNamespace(value=json.dumps(m).encode(), message=SimpleNamespace(
                topic="tagger.events", partition=i % 4, offset=i, key=m["session_id"].encode(), timestamp=None)))
        for i in range(0, len(evs), size):
            yield evs[i:i + size]


async def main(args) -> None:
    import redis.asyncio as aredis

    from stream.app import WorkerService
    from stream.session_store import RedisSessionStore
    from stream.settings import Settings
    from tests.helpers import make_log, serving_root, train_tiny

    work = Path(args.workdir)
    model = work / "model_a"
    if not (model / "manifest.json").exists():
        train_tiny(make_log(work, 150, 11), model)
    root = serving_root(work / "root", model)
    prefix = f"tagger-bench:{uuid.uuid4().hex[:8]}:"
    settings = Settings(artifacts_dir=root, redis_url=args.redis, redis_prefix=prefix, web_port=0)
    store = RedisSessionStore(args.redis, prefix=prefix, ttl_s=600)
    svc = WorkerService(SimpleNamespace(producer=AckingProducer()), settings, store=store, limit_logs=False)
    await svc.start()
    svc.assigned = {0, 1, 2, 3}
    log = make_log(work, 60, 99, "bench.csv")
    modes = ("on", "off") if args.ab else ("as checked out",)
    mark_ahead = getattr(svc, "_mark_ahead", None)
    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    n = 0
    try:
        for batch in batches(log, 60, args.batch, rounds=1000):
            mode = modes[n % len(modes)]
            if args.ab:
                svc._mark_ahead = mark_ahead if mode == "on" else (lambda sids: None)
            c, t = time.process_time(), time.perf_counter()
            await svc.handle(batch)
            if n >= args.warmup:
                walls[mode].append(time.perf_counter() - t)
                cpus[mode].append(time.process_time() - c)
            n += 1
            if min(len(w) for w in walls.values()) >= args.batches:
                break
    finally:
        await store.close()
        svc.executor.shutdown(wait=False)
        r = aredis.from_url(args.redis)
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await r.delete(*keys[i:i + 500])
        await r.aclose()
    ms = lambda x: round(1000 * x, 3)  # noqa: E731
    for mode in modes:
        w = sorted(walls[mode])
        print(json.dumps({"write_ahead": mode, "batches": len(w), "events_per_batch": args.batch,
                          "wall_ms_mean": ms(statistics.fmean(w)), "wall_ms_p50": ms(w[len(w) // 2]),
                          "wall_ms_p99": ms(w[int(0.99 * (len(w) - 1))]),
                          "cpu_ms_mean": ms(statistics.fmean(cpus[mode])),
                          "cpu_ms_p50": ms(sorted(cpus[mode])[len(w) // 2])}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--batch", type=int, default=20, help="events per batch")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--workdir", default="/tmp/tagger-bench-write-ahead")
    ap.add_argument("--ab", action="store_true", help="alternate markers on and off, batch by batch")
    asyncio.run(main(ap.parse_args()))
