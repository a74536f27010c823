"""How a worker stops: promptly, whether or not the broker answers.

``bounded_stop_worker_class()`` is the Faust worker class of both ``tagger worker`` (``stream.cli``)
and ``faust -A stream.app worker`` (the app's ``Worker`` setting, ``stream.app.create_app``).
"""

from __future__ import annotations

import functools
import logging

SHUTDOWN_TIMEOUT_S = 10.0
# How long a stop waits for the batch in progress to be acknowledged before it decides that
# the broker is unreachable.
DRAIN_TIMEOUT_S = 2.0


@functools.cache
def bounded_stop_worker_class():
    """The worker class of `tagger worker`, and of `faust -A stream.app worker` (the app's
    ``Worker`` setting)."""
    import faust

    class Worker(faust.Worker):  # named so: its log lines read `[^Worker]: Ready`, as Faust's do
        """A Faust worker that stops promptly whether or not the broker answers.

        On SIGTERM/SIGINT the batch in progress gets ``DRAIN_TIMEOUT_S`` to be acknowledged,
        then the broker is checked (``WorkerService.drain``). If it answers, Faust's own stop
        runs (offsets of finished batches committed, the group left). If not, that stop would
        wait for the broker (a commit, the producer's flush) for minutes, so the worker stops
        without it and exits 0: its sessions are in Redis as of their last acknowledged
        records, nothing more is committed, and the next owner is redelivered the unfinished
        batch. ``SHUTDOWN_TIMEOUT_S`` stays the last resort: whatever hangs, the process exits
        (code 1) by then."""

        def _schedule_shutdown(self, signal) -> None:  # mode.Worker's hook for every stop signal
            if not self._signal_stop_time:
                _exit_after(SHUTDOWN_TIMEOUT_S)
            super()._schedule_shutdown(signal)

        async def _stop_on_signal(self, signal) -> None:
            service = getattr(self.app, "worker_service", None)
            if service is not None and not await service.drain(DRAIN_TIMEOUT_S):
                await _stop_without_broker(service, signal)
            await super()._stop_on_signal(signal)

    return Worker


async def _stop_without_broker(service, signal) -> None:
    """The broker is unreachable: stop the worker's own service (Redis written, closed) and
    exit 0 without Faust's stop, which would wait for the broker to commit and flush."""
    import os
    log = logging.getLogger("tagger")
    held = service.unacknowledged
    await service.stop()
    log.warning("%s: the broker is unreachable; stopped without committing%s", signal.name,
                f" ({held} records not acknowledged: their batch is redelivered to the next owner)"
                if held else "")
    logging.shutdown()
    os._exit(0)   # exits from here: nothing after this may commit the unfinished batch's offsets


def _exit_after(seconds: float) -> None:
    import os
    import threading

    def watchdog() -> None:
        import time
        time.sleep(seconds)
        logging.getLogger("tagger").error("shutdown did not finish within %.0f s (broker or Redis "
                                          "unreachable?); exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watchdog, name="tagger-shutdown-watchdog", daemon=True).start()
