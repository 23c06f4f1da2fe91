"""The fleet's one volume alert: its state, the decision what a check announces, and the two tables
(`volume_samples`, `volume_alerts`) that hold them, which no other code writes.

The state lives in the catalog database rather than Redis because the database is the one store every
deployment has (the embedded default runs without any Redis server), and because its clock is the
fleet's clock: samples taken on many machines land on one time axis for the projection. A change of
state is a compare-and-set (`UPDATE volume_alerts ... WHERE volume = :v AND version = :seen`): of
several workers that saw the same state exactly one updates the row, and only that one notifies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from worker.db import Database, db_now
from worker.models import VolumeAlert, VolumeSample
from worker.volume.levels import Evaluation, Level, Usage

# One catalog has one media volume: the key of its alert row and the `volume` label of its alerts.
VOLUME = "media"


def iso(value: datetime | None) -> str | None:
    """A time as the alert state, the log and Alertmanager show it: UTC, ending in `Z`."""
    return None if value is None else value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


# -- alert state and decisions (pure) -------------------------------------------------------------


@dataclass(frozen=True)
class AlertState:
    level: Level = Level.OK
    reason: str | None = None
    since: datetime | None = None
    previous_level: Level = Level.OK
    previous_since: datetime | None = None
    notified_at: datetime | None = None
    delivery_pending: bool = False
    version: int = 0

    @classmethod
    def from_row(cls, row: VolumeAlert) -> "AlertState":
        return cls(level=Level(row.level), reason=row.reason, since=row.since, previous_level=Level(row.previous_level),
                   previous_since=row.previous_since, notified_at=row.notified_at,
                   delivery_pending=bool(row.delivery_pending), version=row.version)

    def to_dict(self) -> dict:
        return {
            "level": self.level.value,
            "reason": self.reason,
            "since": iso(self.since),
            "notified_at": iso(self.notified_at),
            "delivery_pending": self.delivery_pending,
        }


@dataclass(frozen=True)
class Notification:
    """What one check announces: `firing`, `resolved`, `reminder` or `redelivery`, and the state it announces."""

    kind: str
    state: AlertState

    @property
    def event(self) -> str:
        return f"volume.alert_{self.kind}"


def decide(state: AlertState, evaluation: Evaluation, now: datetime, *, reminder: timedelta,
           redeliver_after: timedelta, webhook: bool) -> tuple[AlertState, Notification | None]:
    """The next alert state and the notice it calls for (None: nothing to write, nothing to say).

    A change of level is announced once; an unchanged raised level is re-announced every `reminder`;
    a notice whose delivery is still pending is re-sent after `redeliver_after`. `webhook`: a notifier
    that keeps undelivered notices pending (the generic webhook) is configured.
    """
    if evaluation.level is not state.level:
        new = AlertState(level=evaluation.level, reason=evaluation.reason, since=now, previous_level=state.level,
                         previous_since=state.since, notified_at=now, delivery_pending=webhook, version=state.version)
        return new, Notification("resolved" if evaluation.level is Level.OK else "firing", new)
    last = state.notified_at
    if webhook and state.delivery_pending and (last is None or now - last >= redeliver_after):
        new = replace(state, notified_at=now)
        return new, Notification("redelivery", new)
    if state.level is not Level.OK and (last is None or now - last >= reminder):
        new = replace(state, reason=evaluation.reason, notified_at=now, delivery_pending=webhook)
        return new, Notification("reminder", new)
    return state, None


# -- the two tables ------------------------------------------------------------------------------


class FleetState:
    """The samples of the last `window` and the alert row, shared by every worker through the catalog.

    Each method is one short transaction; times are the database's.
    """

    def __init__(self, db: Database, *, window: timedelta):
        self.db = db
        self.window = window

    def record(self, usage: Usage) -> tuple[list[Usage], datetime, AlertState]:
        """Insert a sample and drop those older than the window; the window's samples, the database
        time and the alert state (its row created on the first check ever)."""
        with self.db.transaction() as session:
            # Cut-offs are computed from the database's `now` and bound as values: the clock is still
            # the database's, and the statements stay the same whatever the window.
            now = session.scalar(select(db_now()))
            session.add(VolumeSample(taken_at=now, used_bytes=usage.used_bytes, total_bytes=usage.total_bytes,
                                     used_inodes=usage.used_inodes, total_inodes=usage.total_inodes))
            session.flush()
            session.execute(delete(VolumeSample).where(VolumeSample.taken_at < now - self.window))
            return self._window(session, now), now, self._state(session, create=True)

    def read(self) -> tuple[list[Usage], datetime, AlertState]:
        """The window's samples, the database time and the alert state, writing nothing."""
        with self.db.transaction() as session:
            now = session.scalar(select(db_now()))
            return self._window(session, now), now, self._state(session, create=False)

    def reread(self) -> tuple[datetime, AlertState]:
        """The database time and the alert state, after a compare-and-set was lost."""
        with self.db.transaction() as session:
            return session.scalar(select(db_now())), self._state(session, create=True)

    def compare_and_set(self, seen: int, new: AlertState) -> bool:
        """Write `new` only if the row is still at version `seen`; True for exactly one of racing writers."""
        table = VolumeAlert.__table__
        with self.db.transaction() as session:
            result = session.execute(
                update(table)
                .where(table.c.volume == VOLUME, table.c.version == seen)
                .values(level=new.level.value, reason=new.reason, since=new.since, previous_level=new.previous_level.value,
                        previous_since=new.previous_since, notified_at=new.notified_at,
                        delivery_pending=new.delivery_pending, version=seen + 1)
            )
            return result.rowcount == 1

    def delivered(self, version: int) -> None:
        """The notice of state `version` reached every notifier that keeps it pending until then."""
        table = VolumeAlert.__table__
        with self.db.transaction() as session:
            session.execute(update(table).where(table.c.volume == VOLUME, table.c.version == version)
                            .values(delivery_pending=False))

    def _window(self, session, now: datetime) -> list[Usage]:
        rows = session.scalars(
            select(VolumeSample).where(VolumeSample.taken_at >= now - self.window).order_by(VolumeSample.taken_at)
        ).all()
        return [Usage(r.used_bytes, r.total_bytes, r.used_inodes, r.total_inodes, taken_at=r.taken_at) for r in rows]

    def _state(self, session, *, create: bool) -> AlertState:
        query = select(VolumeAlert).where(VolumeAlert.volume == VOLUME).execution_options(populate_existing=True)
        row = session.scalars(query).one_or_none()
        if row is None and create:
            try:
                # Two first-ever checks may both insert; the loser's savepoint rolls back and it reads the winner's row.
                with session.begin_nested():
                    session.add(VolumeAlert(volume=VOLUME, level=Level.OK.value, previous_level=Level.OK.value,
                                            delivery_pending=False, version=0))
            except IntegrityError:
                pass
            row = session.scalars(query).one()
        return AlertState.from_row(row) if row is not None else AlertState()
