"""The expiry watch: deletes media within about a second of its expiry, between beat's sweeps.

Beat sweeps every `MEDIA_RETENTION_SWEEP_INTERVAL` (60 s): on its own that deletes an item up to a
minute after it expired. The watch closes the gap. One thread per worker node asks the database
when the next item becomes due (`Sweeper.seconds_until_due`: the first entry of the claim's own
partial indexes), sleeps until then, and drains what is due with the sweep's own pipeline.

What it costs the database: while nothing is due, one index probe per `MEDIA_RETENTION_WATCH_INTERVAL`
(1 s) per worker node; while items fall due continuously, a probe and a claim every quarter interval.
A longer interval costs less and deletes later (up to about the interval); 0 turns the watch off and
leaves deletion to beat's sweeps.

Correctness never rests on the watch: claims still decide with the database clock and row locks,
so a watch waking early claims nothing, and several watches (nodes) take disjoint batches.
"""

from __future__ import annotations

import random
import threading
import time

import structlog

from worker.sweep import SweepCounts, Sweeper

log = structlog.get_logger("worker.watch")

# After a look, the next comes no sooner than this share of the interval: while items fall due
# continuously the watch takes them in batches a quarter second apart instead of one by one.
SETTLE_SHARE = 0.25
# Up to this share of the interval is added at random, so the watches of many nodes do not all wake
# at the same expiry.
JITTER_SHARE = 0.1
# After a failed look (database down), wait this many intervals, doubling, up to the cap.
FAILURE_BACKOFF_CAP_S = 60.0
# A drain by the watch stops claiming after this long and looks again, so `stop` and a changed
# schedule are noticed even under a backlog (beat's fan-out shares out large backlogs).
DRAIN_BUDGET_S = 30.0
# Totals are logged once a minute (`watch.summary`) rather than per small batch.
SUMMARY_EVERY_S = 60.0


class ExpiryWatch:
    def __init__(self, sweeper: Sweeper, *, interval_s: float):
        if interval_s <= 0:
            raise ValueError("the expiry watch needs a positive interval")
        self.sweeper = sweeper
        self.interval = interval_s
        self.settle = interval_s * SETTLE_SHARE
        self.jitter = interval_s * JITTER_SHARE
        self.totals = SweepCounts()
        self._summary_due = time.monotonic() + SUMMARY_EVERY_S

    def next_wait(self, due_in: float | None) -> float:
        """Seconds to sleep before the next look, given when the next item falls due (None: nothing pending)."""
        wait = self.interval if due_in is None else min(max(due_in, self.settle), self.interval)
        return wait + random.uniform(0, self.jitter)

    def look(self, stop: threading.Event) -> float | None:
        """One look: drain what is due now, then say when the next item falls due."""
        due_in = self.sweeper.seconds_until_due()
        if due_in is not None and due_in <= 0:
            counts = self.sweeper.drain(deadline=time.monotonic() + DRAIN_BUDGET_S, stop=stop, quiet=True)
            self.totals.add(counts)
            due_in = self.sweeper.seconds_until_due()
        return due_in

    def run(self, stop: threading.Event) -> None:
        """Look, sleep, look again, until `stop` is set. A failed look (database or store down) is logged
        and retried with backoff; it never ends the watch."""
        log.info("watch.started", interval_s=self.interval)
        failures = 0
        while not stop.is_set():
            try:
                due_in = self.look(stop)
                failures = 0
                wait = self.next_wait(due_in)
            except Exception as exc:  # noqa: BLE001 - the watch outlives any one failure; beat's sweeps remain
                failures += 1
                wait = min(self.interval * 2 ** failures, FAILURE_BACKOFF_CAP_S)
                log.warning("watch.look_failed", error=f"{type(exc).__name__}: {exc}", failures=failures,
                            retry_in_s=round(wait, 3))
            self._summarize()
            stop.wait(wait)
        self._summarize(force=True)
        log.info("watch.stopped")

    def _summarize(self, *, force: bool = False) -> None:
        if not force and time.monotonic() < self._summary_due:
            return
        self._summary_due = time.monotonic() + SUMMARY_EVERY_S
        if self.totals.claimed:
            log.info("watch.summary", **self.totals.to_dict())
        self.totals = SweepCounts()


class WatchThread:
    """The watch on a daemon thread of this process, stopped (finishing its batch) on `stop()`."""

    def __init__(self, watch: ExpiryWatch):
        self.watch = watch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=watch.run, args=(self._stop,), name="expiry-watch", daemon=True)

    def start(self) -> "WatchThread":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
