"""Recorded sweeps: start a run, sweep, add its counts, finish. The one sequence the sweep tasks,
the drains and the CLI's `sweep` all go through, so `status` sees every sweep the same way."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import structlog

from worker import status
from worker.db import Database
from worker.sweep import SweepCounts, Sweeper

log = structlog.get_logger("worker.runs")


class SweepRuns:
    def __init__(self, db: Database, sweeper: Sweeper, *, interval: timedelta, batch_size: int, fanout_max: int):
        self.db = db
        self.sweeper = sweeper
        self.interval = interval
        self.batch_size = batch_size
        self.fanout_max = fanout_max

    def manual(self, *, worker: str | None, limit: int | None = None, deadline: float | None = None) -> SweepCounts:
        """One sweep outside the schedule (an operator, a critical volume alert), recorded as `manual`."""
        run_id = status.start_run(self.db, kind="manual", worker=worker)
        counts = self.sweeper.sweep(limit=limit, deadline=deadline)
        status.add_counts(self.db, run_id, counts, finished=True)
        return counts

    def scheduled(self, *, worker: str | None, deadline: float | None,
                  send_drains: Callable[[int, int], None]) -> SweepCounts | None:
        """Beat's sweep: once per schedule slot fleet-wide (None when another took the slot). A backlog
        larger than a batch is shared out: `send_drains(run_id, n)` asks the fleet for n drains."""
        run_id = status.start_run(self.db, kind="scheduled", worker=worker,
                                  interval_seconds=self.interval.total_seconds())
        if run_id is None:
            return None
        fanout = status.plan_fanout(status.due_count(self.db), self.batch_size, self.fanout_max)
        if fanout:
            send_drains(run_id, fanout)
            log.info("sweep.fanned_out", run_id=run_id, drains=fanout)
        counts = self.sweeper.sweep(deadline=deadline)
        status.add_counts(self.db, run_id, counts, finished=True, fanout=fanout)
        return counts

    def drain(self, run_id: int, *, deadline: float | None = None) -> SweepCounts:
        """A helper's share of a scheduled sweep's backlog, added to that run; row claims keep shares disjoint."""
        counts = self.sweeper.drain(deadline=deadline)
        status.add_counts(self.db, run_id, counts)
        return counts
