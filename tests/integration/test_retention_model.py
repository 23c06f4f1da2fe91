"""A model-based test of the retention promises: never early, never held, never leaked, one owner per blob.

Hypothesis strings together operations no one wrote down as a case: organizations created and changed
(with and without a new retention, under different default retentions), registrations (and re-running one a
crash cut short, and `register --key` of blobs an upstream service wrote), holds and releases of items and
orgs, purges, sweeps, reconciles, `adopt`, a blob vanishing and coming back, the store refusing some deletes,
a crash at any transaction or store boundary of any operation, and the database's clock moving by seconds
to months. It races operations against each other on real threads (two registrations of one ID or one key,
overlapping manifests, reconcile or adopt against `register --key`, a sweep against a hold or a retention
change), pausing the first at a boundary Hypothesis picks while the second runs. And it runs the commands
misconfigured (an empty catalog, the wrong prefix, an unmounted volume), where they must refuse and change
nothing. The real engine runs it all (SQLite and PostgreSQL catalogs, the filesystem store) next to a plain
model, and after every step the two must agree; the oracle sees:

- time to the second, by the database's clock: an item leaves `active` in a sweep only if it expired by the
  database's clock when the sweep ended (read after it) and must have left if it had expired when the sweep
  began. Items are made to expire seconds either side of "now". On PostgreSQL the database's clock is not
  the process's: `now()` and `clock_timestamp()` are shadowed in the test's schema by functions adding an
  offset the model moves, starting two days behind the process clock and overtaking it, so a cutoff taken
  from a worker's clock is off by hours (on SQLite, whose clock is the process's, stored times move instead);
- the order of claim and delete: every delete the store gets is checked, from another connection, against
  the committed catalog: the blob's row must have left `active` already (or no row names it);
- the store's answer per key: keys the store refuses stay undeleted and their rows never become tombstones;
- leases: a claim is taken over only once its lease ran out by the database's clock;
- reconcile's grace: an orphan blob younger than the grace (by the database's clock) is never deleted; and
  drift of nearly everything (every item's blob gone) is refused, never acted on;
- holds in every layer (item and org; sweeps, purges, reconcile), the expiry of each item as the model
  computes it (`verify`'s wrong_expiry), lookups answering 404 from the expiry unless held;
- retention rules by content type (`org rule set|rm`, crashed, raced against a sweep, repeated as no-ops):
  items of several MIME types (other case, parameters) each expire under their most specific rule by the
  model's own reading (a TTL over every rule, `type/subtype` over `type/*` over the org's period), so none is
  deleted early under it, and a no-op rule change moves no expiry by a microsecond;
- `verify` itself: a planted early deletion and a planted held deletion must be reported;
- at the end, with every blob back and the clock far ahead, a sweep and a reconcile leave no blob behind a
  tombstone, and verify is clean.

`tests/mutants/` plants deliberate bugs one at a time and checks that this test fails on each (`make mutants`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import create_engine, delete, func, literal, select, text, update
from sqlalchemy.orm import sessionmaker

from config.errors import BadInput, Gone, MediaRootMissing, NotFound, RetentionError
from config.settings import load_settings
from worker import items as items_sql
from worker import schema
from worker.binding import Unbound
from worker.catalog import Catalog
from worker.db import Database, UTCDateTime, db_now, normalize_url, plus_seconds
from worker.engine import build
from worker.models import AuditEvent, Base, CatalogIdentity, Hold, HoldItem, MediaItem, MediaVariant, Organization, RetentionRule, State
from worker.reconcile import Reconciler, TooMany
from worker.store import MARKER_NAME, BlobInfo, DeleteResult
from worker.store.fs import FilesystemStore
from worker.store.keys import key_for_id
from worker.verify import Verifier

HOUR = 3600
DAY = 24 * HOUR
ORGS = ("acme", "beta")
RETENTIONS = {"1h": HOUR, "3h": 3 * HOUR, "2d": 2 * DAY, "90d": 90 * DAY}
TTLS = {"1h": HOUR, "2h": 2 * HOUR, "1d": DAY, "30d": 30 * DAY}
# Where a new item's expiry lies from the database's "now", in seconds: to the second either side, and far.
EXPIRES_IN = (-40 * DAY, -HOUR, -3, 2, 5, 40, 600, 2 * HOUR)
CLOCK_STEPS = (1, 3, 10, 600, HOUR, DAY, 31 * DAY, 91 * DAY)
# Reconcile's grace in the model.
RECONCILE_GRACE = timedelta(hours=1)
# The PostgreSQL clock starts this far behind the process's and the model moves it forward: a cutoff taken
# from a worker's clock is then hours off (first ahead of the database, later behind it).
CLOCK_START_OFFSET = -2 * DAY
# How long a racing second operation is given before the paused first one goes on: enough for it to finish
# when nothing stops it, short when the first holds a lock it waits for.
RACE_GRACE_S = 0.25
TRACE = os.environ.get("MEDIA_RETENTION_TEST_MODEL_TRACE")
# Rules pick among what exists by an index drawn from a fixed range, and check what they need inside: draws
# whose shape depended on the state would make Hypothesis' replays inconsistent, since a race's outcome (which
# registration won) is up to the threads.
PICK = st.integers(0, 10**6)
# Retention rules by content type: the patterns the model sets (in any case: stored lowercased) and the MIME types
# it registers (exact, other case, with parameters, of a type with no rule).
RULE_PATTERNS = ("image/*", "image/png", "IMAGE/PNG", "audio/*", "audio/ogg", "application/pdf")
RULE_MIMES = ("image/png", "Image/PNG", "image/jpeg", "audio/ogg; codecs=opus", "audio/mpeg", "application/pdf", "text/plain")


# Holds by case (issue #23): the cases the model places holds for (the legacy rules use the case `default`),
# where a query's window bounds lie from the database's "now" (seconds), the MIME types items are registered
# with and the patterns queries match them by.
CASES = ("case-a", "case-b", "case-c")
WINDOW_BOUNDS = (-60 * DAY, -10 * DAY, -2 * DAY, -HOUR, 0, 2 * HOUR, 10 * DAY)
MIMES = ("image/png", "IMAGE/JPEG", "video/mp4", "application/octet-stream")
MIME_PATTERNS = (None, "image/*", "image/png", "video/*")


def choose(options, pick: int):
    """The `pick`th of `options` (sorted by the caller), or None when there are none."""
    options = list(options)
    return options[pick % len(options)] if options else None
# Shrinking a failure replays hundreds of sequences: the mutation runs and debugging may go without it.
SHRINK = os.environ.get("MEDIA_RETENTION_TEST_MODEL_SHRINK", "1") != "0"


class Crash(BaseException):
    """The process died here: nothing after this point runs, no cleanup, no rollback beyond the database's own."""


class CrashPlan:
    """Kills the operation at the chosen boundary (each database transaction, each store write or delete).
    Once dead, every further boundary dies too, so cleanup code a killed process would never run does not run."""

    def __init__(self, at: int):
        self.at = at
        self.crossed = 0
        self.dead = False

    def boundary(self, kind: str) -> None:
        if self.dead:
            raise Crash()
        self.crossed += 1
        if self.crossed == self.at:
            self.dead = True
            raise Crash()


# Where a raced operation may be paused: the nth boundary of a kind it crosses. A transaction's start, a store
# write or delete (a delete inside reconcile's transaction, its keys held), right after a sweep's claim
# statement (its rows locked), or as a hold or retention change is about to touch the org's items (the org
# locked). An operation that never crosses the chosen one simply runs to its end first. Each operation pauses
# where it has something to hold (a registration between its reservation, its write and its insert; reconcile
# while it deletes), so a race draws from its first operation's own list.
PAUSES = {
    "registration": (("transaction", 1), ("transaction", 2), ("transaction", 3), ("put", 1)),
    "reconcile": (("transaction", 1), ("transaction", 2), ("delete", 1), ("delete", 1)),
    "sweep": (("transaction", 1), ("claimed", 1), ("claimed", 1), ("delete", 1)),
    "policy": (("transaction", 1), ("policy", 1), ("policy", 1), ("policy", 1)),
    "adopt": (("transaction", 1), ("transaction", 2), ("transaction", 3), ("transaction", 4)),
    "manifest": (("transaction", 2), ("transaction", 3), ("transaction", 4), ("put", 1)),
}


def pause_of(operation: str, pick: int) -> tuple[str, int]:
    return PAUSES[operation][pick % len(PAUSES[operation])]


class PausePlan:
    """Stops the operation at the chosen boundary until the racing operation has had its go."""

    def __init__(self, at: tuple[str, int]):
        self.kind, self.at = at
        self.crossed = 0
        self.paused = threading.Event()
        self.resume = threading.Event()

    def boundary(self, kind: str) -> None:
        if kind != self.kind:
            return
        self.crossed += 1
        if self.crossed == self.at:
            self.paused.set()
            if not self.resume.wait(120):
                raise AssertionError("a paused operation was never resumed")


# The plan of the operation running in this context: an operation's boundaries are counted in its own thread
# and in the threads it hands work to (the sweep's pipeline copies its context into them), never in a racing
# operation's.
PLAN: contextvars.ContextVar[CrashPlan | PausePlan | None] = contextvars.ContextVar("model_plan", default=None)


def cross(kind: str) -> None:
    plan = PLAN.get()
    if plan is not None:
        plan.boundary(kind)


class ModelStore(FilesystemStore):
    """The filesystem store with the model's hands on it: boundaries for crashes and pauses, keys whose deletes
    it refuses (as a store answering AccessDenied would), and a monitor shown every delete before it happens."""

    def __init__(self, root: Path, monitor: Callable[[list[str]], None], refused: set[str]):
        super().__init__(root, delete_threads=2)
        self.monitor = monitor
        self.refused = refused  # the model's own set: it outlives a crash, as a bucket policy would

    def put_files(self, files, written):
        cross("put")
        return super().put_files(files, written)

    def put_file(self, key, source):
        cross("put")
        return super().put_file(key, source)

    def delete_many(self, keys: list[str]) -> list[DeleteResult]:
        try:
            cross("delete")
        except Crash:
            self._delete_checked(keys[: len(keys) // 2])  # died half-way through the batch's deletes
            raise
        return self._delete_checked(keys)

    def _delete_checked(self, keys: list[str]) -> list[DeleteResult]:
        self.monitor(keys)
        allowed = [key for key in keys if key not in self.refused]
        done = dict(zip(allowed, super().delete_many(allowed), strict=True)) if allowed else {}
        return [done.get(key) or DeleteResult(key, ok=False, error="AccessDenied (refused by the model)") for key in keys]


class Clock:
    """The database's clock as the model moves it, and what it read when the process clock read a time."""

    def advance(self, db: Database, seconds: int) -> None:
        raise NotImplementedError

    def db_time_of(self, real: datetime) -> datetime:
        raise NotImplementedError


class OffsetClock(Clock):
    """PostgreSQL: `now()` and `clock_timestamp()` of the test's schema are functions adding an offset, which the
    model moves; the process clock is left alone, so the two disagree the way two machines' clocks can."""

    def __init__(self, db: Database, start_offset: int):
        self.changes: list[tuple[float, float]] = [(0.0, float(start_offset))]
        with db.transaction() as session:
            session.execute(text("CREATE TABLE IF NOT EXISTS model_clock (offset_seconds double precision NOT NULL)"))
            session.execute(text("DELETE FROM model_clock"))
            session.execute(text("INSERT INTO model_clock VALUES (:offset)"), {"offset": start_offset})
            session.execute(text("CREATE OR REPLACE FUNCTION now() RETURNS timestamptz LANGUAGE sql STABLE AS $$ SELECT "
                                 "pg_catalog.now() + make_interval(secs => (SELECT offset_seconds FROM model_clock)) $$"))
            session.execute(text("CREATE OR REPLACE FUNCTION clock_timestamp() RETURNS timestamptz LANGUAGE sql VOLATILE AS "
                                 "$$ SELECT pg_catalog.clock_timestamp() + "
                                 "make_interval(secs => (SELECT offset_seconds FROM model_clock)) $$"))
            # Column defaults were bound to pg_catalog.now() when the migrations made them: bind them anew.
            for table, column in session.execute(text(
                    "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                    "AND column_default LIKE '%now()%'")).all():
                session.execute(text(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET DEFAULT now()'))

    def advance(self, db: Database, seconds: int) -> None:
        with db.transaction() as session:
            offset = session.scalar(text("UPDATE model_clock SET offset_seconds = offset_seconds + :s RETURNING offset_seconds"),
                                    {"s": seconds})
        self.changes.append((time.time(), offset))

    def db_time_of(self, real: datetime) -> datetime:
        stamp = real.timestamp()
        offset = [offset for at, offset in self.changes if at <= stamp][-1]
        return real + timedelta(seconds=offset)


class ShiftClock(Clock):
    """SQLite: its clock is the process's, so time passes by moving every time the catalog holds back instead."""

    def __init__(self):
        self.shifts: list[tuple[float, int]] = []

    def advance(self, db: Database, seconds: int) -> None:
        with db.transaction() as session:
            for table in Base.metadata.sorted_tables:
                columns = [column for column in table.c if isinstance(column.type, UTCDateTime)]
                if columns:
                    session.execute(update(table).values({c.name: plus_seconds(c, literal(-seconds)) for c in columns}))
        self.shifts.append((time.time(), seconds))

    def db_time_of(self, real: datetime) -> datetime:
        moved_since = sum(seconds for at, seconds in self.shifts if at >= real.timestamp())
        return real - timedelta(seconds=moved_since)


def clocked_url(url: str) -> str:
    """The test schema's own `now()` before pg_catalog's: a schema is searched before pg_catalog only when both
    are named in the search path (the URL's last option names the schema)."""
    assert url.rsplit("search_path%3D", 1)[1].isidentifier(), url
    return url + "%2Cpg_catalog"


@dataclass
class Org:
    retention: int
    held: bool = False
    # Retention rules by content type (pattern -> seconds), replaced whole on every change, never mutated in place:
    # a race keeps a copy of the orgs as they were.
    rules: dict = dataclasses.field(default_factory=dict)


@dataclass
class Item:
    id: str
    org: str
    key: str
    created: datetime
    ttl: int | None
    held: bool = False
    gone: bool = False
    # How it went: "deleted" (a sweep or purge claimed it: its blob may go from then on) or "tombstoned"
    # (reconcile found its blob missing: a blob that comes back may go only once the item expired).
    gone_by: str | None = None
    # Its expiry when it went: what a tombstone's returning blob is kept until (a later retention change
    # reschedules live items only).
    gone_expiry: datetime | None = None
    stashed: bool = False
    # PostgreSQL's one-transaction sweep deleted its blob (or a variant's) under the row lock and crashed before
    # its commit: the row is still active and expired (404), and the next sweep tombstones it.
    lost_in_crash: bool = False
    # Once a blob has been away, it may come back behind a tombstone: a leak reconcile repairs, not a bug.
    ever_stashed: bool = False
    content: bytes = b""
    # Its derived blobs (thumbnails, previews): upstream blobs it adopted by key, which live and go with it.
    variants: tuple[str, ...] = ()
    # Its MIME type as registered: retention rules match it (see "retention rules by content type" below).
    mime: str = "application/octet-stream"
    # Expired is final: the expiry it had when a policy step found it expired and unheld (gone by expiry, 404).
    # From then on no hold covers it and no retention or rule reschedules it (see `policy_step`).
    final_expiry: datetime | None = None


@dataclass
class CasePlacement:
    """An open hold of a case as the model sees it: what it holds is computed here, never read back."""

    reason: str  # unique: how the model finds its row after a crash
    case: str
    scope: str  # item | org | query
    org: str | None = None
    members: set = dataclasses.field(default_factory=set)  # item and query placements: the items it held when placed
    known: set = dataclasses.field(default_factory=set)  # query: the items that existed then (later ones are future media)
    after: datetime | None = None
    before: datetime | None = None
    mime: str | None = None
    future: bool = False


@dataclass
class Orphan:
    """A blob no item names: what a killed registration left, or what an upstream service wrote."""

    content: bytes
    written: datetime  # by the database's clock


class System:
    """The engine under test, rebuilt after every crash as a new process would build it."""

    def __init__(self, url: str, root: Path, monitor: Callable[[list[str]], None], clock: Clock, refused: set[str]):
        self.url = url
        self.root = root
        self.db = Database(url)
        transaction = Database.transaction.__get__(self.db)

        def crossing_transaction():
            cross("transaction")
            return transaction()

        self.db.transaction = crossing_transaction
        self.store = ModelStore(root, monitor, refused)
        self.settings = load_settings(data_dir=root.parent / "data", database_url=url, storage_url=root.as_uri(),
                                      sweep_batch_size=3)
        self.engine = build(self.settings, database=self.db, store=self.store)
        self.catalog = self.engine.catalog
        self.clock = clock
        self._wrap_listing()

    def close(self) -> None:
        self.store.close()
        self.db.dispose()

    def with_default(self, default_retention: str) -> Catalog:
        """The same catalog as a process started with another MEDIA_RETENTION_DEFAULT_RETENTION would see it."""
        return build(load_settings(**{**self.settings.model_dump(), "default_retention": default_retention}),
                     database=self.db, store=self.store).catalog

    def reconciler(self) -> Reconciler:
        return self.engine.reconciler

    def _wrap_listing(self) -> None:
        """Report blob ages as the database's clock sees them (reconcile and adopt judge ages by it)."""
        store, clock = self.store, self.clock
        listing = FilesystemStore.iter_keys.__get__(store)

        def aged(stamp: datetime | None) -> datetime | None:
            return None if stamp is None else clock.db_time_of(stamp)

        def iter_keys(**options):
            for info in listing(**options):
                if isinstance(info, BlobInfo):
                    yield dataclasses.replace(info, modified=aged(info.modified), mtime=aged(info.mtime))
                else:
                    yield dataclasses.replace(info, started=aged(info.started))

        store.iter_keys = iter_keys


@dataclass
class Outcome:
    """What one operation of a step did: its result, or the error it ended with."""

    result: object = None
    error: BaseException | None = None


class RetentionModel(RuleBasedStateMachine):
    """One example: a fresh catalog and media root, then a random sequence of operations."""

    url: str
    workdir: Path
    postgresql: bool

    def __init__(self):
        super().__init__()
        if TRACE:
            with open(TRACE, "a") as trace:
                trace.write("example\n")
        self.root = self.workdir / "media"
        self.stash = self.workdir / "stash"
        for directory in (self.root, self.stash, self.workdir / "up"):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
        self.observer = Database(self.url)
        # Reads from a connection of their own that never takes SQLite's write lock: the store's monitor reads
        # while the operation under test holds it (reconcile deletes inside its transaction).
        self.reader = sessionmaker(create_engine(normalize_url(self.url)))
        with self.observer.transaction() as session:
            for table in reversed(Base.metadata.sorted_tables):
                if table.name != CatalogIdentity.__tablename__:
                    session.execute(delete(table))
            session.execute(update(CatalogIdentity).values(store_url=None, bound_at=None))
        self.violations: list[str] = []
        self.deleted_under_lock: set[str] = set()
        self.refused: set[str] = set()
        self.clock = OffsetClock(self.observer, CLOCK_START_OFFSET) if self.postgresql else ShiftClock()
        self.system = self._new_system()
        self.system.engine.binding.ensure()
        self.orgs: dict[str, Org] = {}
        self.items: dict[str, Item] = {}
        self.orphans: dict[str, Orphan] = {}  # key -> what is there with no item
        # Upstream blobs an item adopted as its variants: out of `orphans` while a row names them, back in when
        # compaction removes the tombstone that named them (reconcile's grace then counts from when they were written).
        self.adopted: dict[str, Orphan] = {}
        self.leases: dict[str, tuple[str | None, datetime | None]] = {}  # deleting rows: id -> (token, lease)
        self.counter = 0
        self.pending: tuple | None = None  # a registration a crash cut short, for the operator to re-run
        self.placements: list[CasePlacement] = []  # open holds of the model's cases (see "holds by case" below)
        self.mimes: dict[str, str] = {}  # item id -> MIME type, as registered

    def _new_system(self) -> System:
        return System(self.url, self.root, self.monitor_delete, self.clock, self.refused)

    def teardown(self):
        try:
            if sys.exc_info()[0] is None:
                self.everything_is_repaired_in_the_end()
        finally:
            self.system.close()
            self.observer.dispose()
            self.reader.kw["bind"].dispose()

    def everything_is_repaired_in_the_end(self):
        """Every blob back, the store answering again, the clock far ahead, one sweep and one reconcile: no blob
        is left behind a deleted item, held media is still there, and only blobs of registrations a crash cut
        short or an upstream service wrote have no item; verify is clean."""
        self.refused.clear()
        for item in self.items.values():
            if item.stashed:
                self.blob_comes_back_for(item)
        self.advance_clock(200 * DAY)
        self.sweep(None)
        self.no_blob_outlives_a_finished_deletion()  # before reconcile, which would repair a sweep's leak
        self.run(lambda system: system.reconciler().run(grace=RECONCILE_GRACE, actor="model", allow_mass_drift=True),
                 None, self.reconcile_may_take)
        live = set()
        for item in self.items.values():
            path = self.root / item.key
            if self.held(item) and not item.gone:
                assert path.exists(), f"held item {item.id} lost its blob"
                assert all((self.root / key).exists() for key in item.variants), f"held item {item.id} lost a variant"
                live.update((item.key, *item.variants))
            else:
                assert item.gone, f"{item.id} is still active 200 days later though it is not held"
                assert not path.exists(), f"{item.id} is gone but its blob was never deleted"
                left = [key for key in item.variants if (self.root / key).exists()]
                assert not left, f"{item.id} is gone but its variants {left} were never deleted"
        unexplained = self.blobs_on_disk() - live - set(self.orphans)
        assert not unexplained, f"blobs nobody can account for: {sorted(unexplained)}"
        report = self.verify()
        assert report.clean, f"verify after the final sweep and reconcile: {report.to_dict()}"

    # -- the clock -----------------------------------------------------------------------------

    def now(self) -> datetime:
        with self.reader() as session:
            return session.scalar(select(db_now()))

    def expiry(self, item: Item) -> datetime:
        if item.gone and item.gone_expiry is not None:
            return item.gone_expiry
        if item.final_expiry is not None:
            return item.final_expiry
        return item.created + timedelta(seconds=self.lifetime_of(item, self.orgs[item.org]))

    def held(self, item: Item) -> bool:
        if item.final_expiry is not None:
            return False  # gone by expiry before some hold: none covers it (expired is final)
        return item.held or self.orgs[item.org].held or self.held_by_a_case(item)

    # -- expired is final: what a hold, a release, a retention or a rule change may act on ----------

    def freeze_expired(self, at: datetime) -> None:
        """Every live, unheld item expired by `at` (the database's clock) is gone by expiry: its expiry is final."""
        for item in self.items.values():
            if not item.gone and item.final_expiry is None and not self.held(item) and self.expiry(item) <= at:
                item.final_expiry = self.expiry(item)

    def settle_policy_step(self, before: datetime, pending: dict) -> None:
        """After a policy step that ran from `before` to now: an item that expired, unheld, while it ran may have
        been judged gone by expiry or not (each statement reads the clock once the row is locked). Where the catalog
        left such an item unheld though the model's holds cover it, or kept its expiry though the model's policy moves
        it, the step found it gone: its expiry is final. Items expired before the step are never in doubt."""
        after = self.now()
        doubtful = {media_id: expiry for media_id, (expiry, held) in pending.items()
                    if not held and before < expiry <= after and not self.items[media_id].gone
                    and self.items[media_id].final_expiry is None}
        if not doubtful:
            return
        with self.reader() as session:
            rows = {row.id: row for row in session.execute(
                select(MediaItem.id, MediaItem.expires_at, MediaItem.held_at, MediaItem.org_held)
                .where(MediaItem.id.in_(sorted(doubtful))))}
        for media_id, expiry in doubtful.items():
            item, row = self.items[media_id], rows[media_id]
            unheld = row.held_at is None and not row.org_held
            if (self.held(item) and unheld) or (self.expiry(item) != expiry and row.expires_at == expiry):
                item.final_expiry = expiry

    def policy_step(step):
        """A step that places or releases holds or changes retention: expired is final for every item gone by
        expiry when it began, and settled by the catalog for those that expired while it ran."""

        @functools.wraps(step)
        def wrapped(self, *args, **kwargs):
            before = self.now()
            self.freeze_expired(before)
            pending = {item.id: (self.expiry(item), self.held(item)) for item in self.items.values()
                       if not item.gone and item.final_expiry is None}
            try:
                return step(self, *args, **kwargs)
            finally:
                self.settle_policy_step(before, pending)

        return wrapped

    def gone_while_it_ran(self, ids) -> bool:
        """Whether one of these items is unheld and expired by now: a hold naming it may be refused as gone."""
        now = self.now()
        return any(not self.held(self.items[media_id]) and self.expiry(self.items[media_id]) <= now for media_id in ids)

    @rule(seconds=st.sampled_from(CLOCK_STEPS))
    def advance_clock(self, seconds):
        """Time passes on the database's clock."""
        self.clock.advance(self.observer, seconds)
        if isinstance(self.clock, ShiftClock):
            for item in self.items.values():
                item.created -= timedelta(seconds=seconds)
                if item.gone_expiry is not None:
                    item.gone_expiry -= timedelta(seconds=seconds)
                if item.final_expiry is not None:
                    item.final_expiry -= timedelta(seconds=seconds)
            for placement in self.placements:  # the catalog's stored windows moved with every other time
                if placement.after is not None:
                    placement.after -= timedelta(seconds=seconds)
                    placement.before -= timedelta(seconds=seconds)
            for orphan in (*self.orphans.values(), *self.adopted.values()):
                orphan.written -= timedelta(seconds=seconds)

    # -- what the store sees, checked as it happens --------------------------------------------

    def monitor_delete(self, keys: list[str]) -> None:
        """Shown every delete before the store does it: the committed catalog (read on another connection) must
        have taken the row out of `active` already. A claim commits before its blobs are touched; registrations
        and reconcile delete only blobs no row names."""
        if not keys:
            return
        table = MediaItem.__table__
        with self.reader() as session:
            rows = session.execute(select(table.c.storage_key, table.c.id, table.c.state)
                                   .where(table.c.storage_key.in_(keys))).all()
        variants = MediaVariant.__table__
        with self.reader() as session:
            owned = session.execute(select(variants.c.storage_key, table.c.id, table.c.state)
                                    .join_from(variants, table, table.c.id == variants.c.item_id)
                                    .where(variants.c.storage_key.in_(keys))).all()
        active = {media_id for _key, media_id, state in (*rows, *owned) if state == State.ACTIVE.value}
        excused = self.locked_by_an_expiry_sweep(active)
        for key, media_id, state in rows:
            if state == State.ACTIVE.value and media_id not in excused:
                self.violations.append(f"the blob of {media_id} ({key}) was deleted while its row was still active")
        for key, media_id, state in owned:
            if state == State.ACTIVE.value and media_id not in excused:
                self.violations.append(f"variant {key} of {media_id} was deleted while its item was still active")
        self.deleted_under_lock |= excused

    def locked_by_an_expiry_sweep(self, ids: set[str]) -> set[str]:
        """Of these active rows, those a one-transaction sweep may be deleting the blobs of (PostgreSQL): expired by
        the database's clock and unheld in the committed catalog (so they answer 404 already), and locked FOR UPDATE
        by another transaction (a row lock FOR KEY SHARE cannot take: SKIP LOCKED leaves it out)."""
        if not ids or not self.postgresql:
            return set()
        table = MediaItem.__table__
        with self.reader() as session:
            due = set(session.scalars(select(table.c.id).where(
                table.c.id.in_(sorted(ids)), table.c.state == State.ACTIVE.value, table.c.expires_at <= db_now(),
                table.c.held_at.is_(None), table.c.org_held.is_(False))))
            free = set(session.scalars(select(table.c.id).where(table.c.id.in_(sorted(due)))
                                       .with_for_update(key_share=True, skip_locked=True))) if due else set()
        return due - free

    # -- running an operation against the engine, with an optional crash -----------------------

    def run(self, operation, crash_at: int | None, allowed):
        """Run `operation(system)`; then check every item's state and blob against what `allowed` permits.

        `allowed(item, before, after)` says whether this operation may take the item (claim, delete or
        tombstone it), given the database's clock read before and after it. Returns the operation's result,
        or None when it crashed."""
        before = self.now()
        self.snapshot_leases()
        self.deleted_under_lock = set()
        plan = CrashPlan(crash_at) if crash_at is not None else None
        armed = PLAN.set(plan)
        result = None
        try:
            result = operation(self.system)
        except Crash:
            pass
        finally:
            PLAN.reset(armed)
            if plan is not None:
                # A new process: new engine, new store, nothing carried over.
                self.system.close()
                self.system = self._new_system()
        self.observe(before, allowed)
        # Blobs a one-transaction sweep deleted under its row locks before it died: the rows stayed active.
        for media_id in self.deleted_under_lock:
            item = self.items.get(media_id)
            if item is not None and not item.gone:
                item.lost_in_crash = True
        return result

    def snapshot_leases(self) -> None:
        table = MediaItem.__table__
        with self.reader() as session:
            self.leases = {row.id: (row.claim_token, row.lease_until) for row in session.execute(
                select(table.c.id, table.c.claim_token, table.c.lease_until).where(table.c.state == State.DELETING.value))}

    def observe(self, before: datetime, allowed) -> None:
        """Read the catalog's states and fold them into the model, failing on any transition it forbids."""
        after = self.now()
        table = MediaItem.__table__
        with self.reader() as session:
            rows = {row.id: row for row in session.execute(
                select(table.c.id, table.c.state, table.c.deletion_reason, table.c.claim_token, table.c.expires_at))}
        for media_id, (token, lease) in self.leases.items():
            row = rows.get(media_id)
            if row is not None and row.claim_token is not None and token is not None and row.claim_token != token:
                assert lease <= after, (f"{media_id}'s claim was taken over while its lease ran until {lease.isoformat()} "
                                        f"(database time after the step: {after.isoformat()})")
        for item in self.items.values():
            row = rows.get(item.id)
            assert row is not None, f"item {item.id} vanished from the catalog"
            if item.gone:
                assert row.state != State.ACTIVE.value, f"item {item.id} came back to life after it was gone"
                continue
            if row.state == State.ACTIVE.value:
                continue
            how = allowed(item, before, after)
            assert how, (f"item {item.id} became {row.state} ({row.deletion_reason}) though this operation may not take "
                         f"it: held={self.held(item)}, expires {self.expiry(item).isoformat()}, database time "
                         f"{before.isoformat()} .. {after.isoformat()}")
            item.gone_expiry = self.expiry(item)
            item.gone, item.gone_by = True, how
        self.learn_new_rows(rows)

    def learn_new_rows(self, rows: dict) -> None:
        """Items other operations than `register` made (adopt, manifests, races): the model takes them in."""
        new = [media_id for media_id in rows if media_id not in self.items]
        if not new:
            return
        with self.reader() as session:
            found = session.scalars(select(MediaItem).where(MediaItem.id.in_(new))).all()
            session.expunge_all()
        with self.reader() as session:
            owned = session.execute(select(MediaVariant.item_id, MediaVariant.storage_key)
                                    .where(MediaVariant.item_id.in_(new)).order_by(MediaVariant.storage_key)).all()
        for row in found:
            path = self.root / row.storage_key
            self.items[row.id] = Item(row.id, row.org_id, row.storage_key, row.created_at, row.ttl_seconds,
                                      content=path.read_bytes() if path.exists() else b"",
                                      variants=tuple(key for item_id, key in owned if item_id == row.id),
                                      mime=row.mime_type)
            self.orphans.pop(row.storage_key, None)
            for key in self.items[row.id].variants:
                self.adopted[key] = self.orphans.pop(key)
            if row.state != State.ACTIVE.value:
                self.items[row.id].gone, self.items[row.id].gone_by = True, "deleted"

    def blobs_on_disk(self) -> set[str]:
        return {str(path.relative_to(self.root)) for path in self.root.rglob("*")
                if path.is_file() and path.name != MARKER_NAME and not path.name.startswith(".incoming-")}

    # -- organizations --------------------------------------------------------------------------

    @rule(org=st.sampled_from(ORGS), retention=st.none() | st.sampled_from(sorted(RETENTIONS)),
          default=st.sampled_from(("1h", "90d")), crash_at=st.none() | st.integers(1, 3))
    @policy_step
    def org_set(self, org, retention, default, crash_at):
        """`org set ORG [--retention D]`, from a process whose default retention may differ from the org's."""
        creating = org not in self.orgs
        self.run(lambda system: system.with_default(default).set_org(org, retention, actor="model"), crash_at,
                 lambda item, before, after: None)
        if crash_at is not None:
            self.learn_orgs()
            return
        if creating:
            self.orgs[org] = Org(RETENTIONS[retention] if retention else RETENTIONS[default])
        elif retention is not None:
            self.orgs[org].retention = RETENTIONS[retention]

    def learn_orgs(self) -> None:
        """Died, raced or not, the org rows say what happened (an org hold of the legacy rules: the case `default`'s
        open org placements; the model's own cases it tracks itself)."""
        with self.reader() as session:
            held = set(session.scalars(select(Hold.org_id).where(Hold.case_name == "default", Hold.scope == "org",
                                                                 Hold.released_at.is_(None))))
            for row in session.scalars(select(Organization)):
                known = self.orgs.setdefault(row.id, Org(row.retention_seconds))
                known.retention, known.held = row.retention_seconds, row.id in held
        self.learn_rules()

    # -- registration ---------------------------------------------------------------------------

    @initialize(retentions=st.tuples(st.sampled_from(sorted(RETENTIONS)), st.sampled_from(sorted(RETENTIONS))),
                items=st.lists(st.tuples(st.sampled_from(ORGS), st.none() | st.sampled_from(sorted(TTLS)),
                                         st.sampled_from(EXPIRES_IN)), max_size=6),
                upstream=st.integers(0, 2))
    def a_deployment(self, retentions, items, upstream):
        """Where each example starts: both orgs, blobs an upstream service wrote two hours ago that no item names
        yet (older than reconcile's grace), and a few items expiring seconds to weeks either side of now."""
        for org, retention in zip(ORGS, retentions, strict=True):
            self.org_set(org, retention, "90d", None)
        for _ in range(upstream):
            self.upstream_writes_a_blob()
        self.advance_clock(2 * HOUR)
        for org, ttl, expires_in in items:
            self.register(org, ttl, expires_in, None)

    @rule(org=st.sampled_from((*ORGS, "ghost")), ttl=st.none() | st.sampled_from(sorted(TTLS)),
          expires_in=st.sampled_from(EXPIRES_IN), crash_at=st.none() | st.integers(1, 4),
          name=st.sampled_from(("plain", "plain", "temporary-looking")))
    def register(self, org, ttl, expires_in, crash_at, name="plain"):
        """`register --org ORG --file F --id ID [--ttl T] --created-at T` for an item expiring `expires_in` from now
        (into an org that does not exist, or under an ID named like the store's temporary files: refused)."""
        self.counter += 1
        if name == "temporary-looking" and org in self.orgs:
            before = self.state_of_everything()
            with pytest.raises(BadInput, match="reserved"):
                self.system.catalog.register(org=org, file=self.upload(), media_id=f".incoming-{self.counter:016x}")
            assert self.state_of_everything() == before
            return
        self._register(f"m{self.counter}", org, ttl, expires_in, crash_at)

    def created_for(self, org: str, ttl: str | None, expires_in: int, mime: str | None = None) -> datetime:
        probe = Item("", org, "", self.now(), TTLS[ttl] if ttl else None, mime=mime or Item.mime)
        lifetime = self.lifetime_of(probe, self.orgs[org])
        return self.now() - timedelta(seconds=lifetime - min(expires_in, lifetime))

    def _register(self, media_id, org, ttl, expires_in, crash_at, content: bytes | None = None, mime: str | None = None):
        content = content or f"blob of {media_id}".encode()
        source = self.workdir / "up" / f"{media_id}.bin"
        source.write_bytes(content)
        if org not in self.orgs:
            with pytest.raises(BadInput):
                self.system.catalog.register(org=org, file=source, media_id=media_id, ttl=ttl, mime=mime)
            self.observe(self.now(), lambda item, before, after: None)
            return
        created = self.created_for(org, ttl, expires_in, mime)

        def operation(system):
            return system.catalog.register(org=org, file=source, media_id=media_id, ttl=ttl, created_at=created, mime=mime)

        result = self.run(operation, crash_at, lambda item, before, after: None)
        with self.reader() as session:
            row = session.get(MediaItem, media_id)
        key = key_for_id(media_id)
        if media_id not in self.items:
            assert crash_at is not None, f"register of {media_id} returned without a catalog row"
            if (self.root / key).exists():
                self.orphans[key] = Orphan(content, self.now())
            self.pending = (media_id, org, ttl, expires_in, content)
            return
        if result is not None:
            assert result.id == media_id and result.state == State.ACTIVE.value
        self.items[media_id].content = content
        assert row is not None

    @precondition(lambda self: self.pending is not None)
    @rule()
    def register_again_after_a_crash(self):
        """Re-running the registration a crash cut short succeeds, as an operator would expect (unless `adopt`
        made the blob it left an item meanwhile: then the key is taken, and it says so)."""
        media_id, org, ttl, expires_in, content = self.pending
        self.pending = None
        if any(item.key == key_for_id(media_id) for item in self.items.values()):
            with pytest.raises(BadInput, match="already belongs to another media item"):
                self.system.catalog.register(org=org, file=self.upload(), media_id=media_id)
            return
        self._register(media_id, org, ttl, expires_in, None, content)

    @rule()
    def upstream_writes_a_blob(self):
        """An upstream service writes a blob straight into the store, to register it by key (or never). It ages
        as the database's clock moves (the listing reports ages by that clock)."""
        self.counter += 1
        key = f"up/{self.counter:06d}.jpg"  # zero-padded: sorted keys come in the order they were written
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"upstream {self.counter}".encode())
        self.orphans[key] = Orphan(path.read_bytes(), self.now())

    def upstream_keys(self) -> list[str]:
        return sorted(key for key in self.orphans if key.startswith("up/") and (self.root / key).exists())

    @rule(pick=PICK, org=st.sampled_from(ORGS), variants=st.sampled_from((0, 0, 1, 2)))
    def register_an_upstream_blob_by_key(self, pick, org, variants=0):
        """`register --key KEY [--variant V]...`: the blob an upstream service wrote becomes an item, and the next
        `variants` upstream blobs its derived files."""
        upstream = self.upstream_keys()
        key = choose(upstream, pick)
        if key is None or org not in self.orgs:
            return
        derived = [other for other in upstream if other != key][:variants]
        self.counter += 1
        outcome = self.attempt(lambda: self.system.catalog.register(org=org, key=key, media_id=f"k{self.counter}",
                                                                    variants=derived))
        self.observe(self.now(), lambda item, before, after: None)
        assert outcome.error is None or isinstance(outcome.error, BadInput), outcome.error
        if outcome.error is None:
            assert self.items[f"k{self.counter}"].variants == tuple(sorted(derived))

    @rule(pick=PICK, key_pick=PICK)
    def add_a_variant(self, pick, key_pick):
        """`variant add ID --key KEY`: an upstream blob becomes a derived file of an item; refused (Gone) once the
        item is gone by lookup's rule (claimed, deleted, or expired and unheld), and then nothing changes."""
        item, key = self._some_item(pick), choose(self.upstream_keys(), key_pick)
        if item is None or key is None:
            return
        before = self.now()
        outcome = self.attempt(lambda: self.system.catalog.add_variants(item.id, [key], actor="model"))
        after = self.now()
        if item.gone or (not self.held(item) and self.expiry(item) <= before):
            assert isinstance(outcome.error, Gone), f"a variant was added to {item.id}, which is gone: {outcome}"
        elif not self.held(item) and self.expiry(item) <= after:
            assert outcome.error is None or isinstance(outcome.error, Gone), outcome.error
        else:
            assert outcome.error is None, outcome.error
        if outcome.error is None:
            item.variants = tuple(sorted((*item.variants, key)))
            self.adopted[key] = self.orphans.pop(key)
        self.observe(self.now(), lambda other, before, after: None)

    # -- holds ----------------------------------------------------------------------------------

    def _some_item(self, pick: int) -> Item | None:
        media_id = choose(sorted(self.items), pick)
        return None if media_id is None else self.items[media_id]

    @rule(pick=PICK, held=st.booleans(), crash_at=st.none() | st.integers(1, 2))
    @policy_step
    def hold_or_release_item(self, pick, held, crash_at):
        """`hold ID --reason R` / `release ID --reason R`."""
        item = self._some_item(pick)
        if item is None:
            return

        def raw(system):
            return system.catalog.set_hold(held=held, reason="model", ids=[item.id], actor="model")

        def operation(system):
            try:
                return raw(system)
            except Gone:
                if held and self.gone_while_it_ran([item.id]):
                    return None  # it expired, unheld, while the hold waited: gone, nothing changed
                raise

        if held and (item.gone or item.final_expiry is not None):
            with pytest.raises(Gone):
                raw(self.system)
            self.observe(self.now(), lambda other, before, after: None)
            return
        self.run(operation, crash_at, lambda other, before, after: None)
        self.learn_item_holds()

    def learn_item_holds(self) -> None:
        """The legacy item holds (the case `default`'s), died, raced or not; the model's own cases it tracks itself."""
        with self.reader() as session:
            held = set(session.scalars(select(HoldItem.item_id).join(Hold, Hold.id == HoldItem.hold_id)
                                       .where(Hold.case_name == "default", Hold.released_at.is_(None))))
        for item in self.items.values():
            item.held = item.id in held

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, held=st.booleans(), crash_at=st.none() | st.integers(1, 2))
    @policy_step
    def hold_or_release_org(self, pick, held, crash_at):
        """`hold --org ORG --reason R` / `release --org ORG --reason R`."""
        org = choose(sorted(self.orgs), pick)
        self.run(lambda system: system.catalog.set_hold(held=held, reason="model", org=org, actor="model"), crash_at,
                 lambda item, before, after: None)
        self.learn_orgs()

    # -- holds by case (issue #23): item, org and query holds of several cases, with and without include-future -

    def held_by_a_case(self, item: Item) -> bool:
        """The model's own answer: an open placement of one of its cases holds the item itself, through its org,
        as a member of a query it matched when placed, or as media registered later inside an include-future query."""
        for placement in self.placements:
            if placement.scope == "org" and placement.org == item.org:
                return True
            if item.id in placement.members:
                return True
            if placement.future and item.id not in placement.known and self.query_matches(placement, item):
                return True
        return False

    def org_held_by_a_case(self, org: str) -> bool:
        return any(placement.scope == "org" and placement.org == org for placement in self.placements)

    def mime_of(self, item: Item) -> str:
        if item.id not in self.mimes:  # registered by another rule (a file, a key, adopt): as the catalog guessed it
            with self.reader() as session:
                self.mimes[item.id] = session.scalar(select(MediaItem.mime_type).where(MediaItem.id == item.id))
        return self.mimes[item.id]

    def query_matches(self, placement: CasePlacement, item: Item) -> bool:
        mime = self.mime_of(item).lower()
        pattern = placement.mime
        return (item.org == placement.org and placement.after <= item.created < placement.before
                and (pattern is None or mime == pattern or (pattern.endswith("/*") and mime.startswith(pattern[:-1]))))

    def _placed(self, reason: str) -> bool:
        """Whether the placement made with this (unique) reason committed: a crash may have cut it short."""
        with self.reader() as session:
            return session.scalar(select(Hold.id).where(Hold.reason == reason)) is not None

    @precondition(lambda self: self.orgs)
    @rule(org=st.sampled_from(ORGS), mime=st.sampled_from(MIMES), age=st.sampled_from((0, HOUR, 3 * DAY, 20 * DAY)))
    def register_media_of_a_type(self, org, mime, age):
        """`register --mime TYPE --created-at T`: media of several types created now to weeks ago (what query holds
        select by; under a short org retention some are due at once), the older ones with a 30-day TTL."""
        if org not in self.orgs:
            return
        self.counter += 1
        media_id = f"t{self.counter}"
        source = self.workdir / "up" / f"{media_id}.bin"
        source.write_bytes(f"typed {media_id}".encode())
        created = self.now() - timedelta(seconds=age)
        self.mimes[media_id] = mime
        self.run(lambda system: system.catalog.register(org=org, file=source, media_id=media_id, created_at=created,
                                                        mime=mime, ttl="30d" if age > DAY else None),
                 None, lambda item, before, after: None)
        assert media_id in self.items
        self.items[media_id].content = source.read_bytes()

    @rule(case=st.sampled_from(CASES), picks=st.lists(PICK, min_size=1, max_size=3), crash_at=st.none() | st.integers(1, 2))
    @policy_step
    def place_a_case_hold_on_items(self, case, picks, crash_at):
        """`hold ID... --case C --reason R`: refused (changing nothing) when one of them is already gone."""
        chosen = sorted({choose(sorted(self.items), pick) for pick in picks} - {None})
        if not chosen:
            return
        self.counter += 1
        reason = f"items {self.counter}"

        def raw(system):
            return system.catalog.set_hold(held=True, reason=reason, ids=chosen, case=case, actor="model")

        def operation(system):
            try:
                return raw(system)
            except Gone:
                if self.gone_while_it_ran(chosen):
                    return None  # one expired, unheld, while the hold waited: gone, nothing changed
                raise

        if any(self.items[media_id].gone or self.items[media_id].final_expiry is not None for media_id in chosen):
            with pytest.raises(Gone):
                raw(self.system)
            assert not self._placed(reason)
            self.observe(self.now(), lambda item, before, after: None)
            return
        self.run(operation, crash_at, lambda item, before, after: None)
        if self._placed(reason):
            self.placements.append(CasePlacement(reason, case, "item", members=set(chosen)))

    @precondition(lambda self: self.orgs)
    @rule(case=st.sampled_from(CASES), org=st.sampled_from(ORGS), crash_at=st.none() | st.integers(1, 2))
    @policy_step
    def place_a_case_hold_on_an_org(self, case, org, crash_at):
        """`hold --org ORG --case C --reason R`."""
        if org not in self.orgs:
            return
        self.counter += 1
        reason = f"org {self.counter}"
        self.run(lambda system: system.catalog.set_hold(held=True, reason=reason, org=org, case=case, actor="model"),
                 crash_at, lambda item, before, after: None)
        if self._placed(reason):
            self.placements.append(CasePlacement(reason, case, "org", org=org))

    @precondition(lambda self: self.orgs)
    @rule(case=st.sampled_from(CASES), org=st.sampled_from(ORGS),
          bounds=st.lists(st.sampled_from(WINDOW_BOUNDS), min_size=2, max_size=2, unique=True),
          mime=st.sampled_from(MIME_PATTERNS), future=st.booleans(), crash_at=st.none() | st.integers(1, 2))
    @policy_step
    def place_a_case_hold_by_query(self, case, org, bounds, mime, future, crash_at):
        """`hold --org ORG --created-after A --created-before B [--mime P] [--include-future] --case C`: holds the
        org's live items created in [A, B) of a matching type, and with include-future media registered later too."""
        if org not in self.orgs:
            return
        self.counter += 1
        reason = f"query {self.counter}"
        now = self.now()
        after, before = (now + timedelta(seconds=bound) for bound in sorted(bounds))
        placement = CasePlacement(reason, case, "query", org=org, after=after, before=before, mime=mime, future=future,
                                  known=set(self.items))
        placement.members = {item.id for item in self.items.values()
                             if not item.gone and item.final_expiry is None and self.query_matches(placement, item)}
        self.run(lambda system: system.catalog.set_hold(held=True, reason=reason, org=org, case=case, created_after=after,
                                                        created_before=before, mime=mime, include_future=future,
                                                        actor="model"),
                 crash_at, lambda item, before, after: None)
        if self._placed(reason):
            self.placements.append(placement)

    @rule(case=st.sampled_from(CASES), form=st.sampled_from(("ids", "org", "case")), pick=PICK,
          crash_at=st.none() | st.integers(1, 2))
    @policy_step
    def release_a_case(self, case, form, pick, crash_at):
        """`release ID... --case C` (its item holds on them), `release --org ORG --case C` (its org and query holds
        there) or `release --case C` (all of them): what another case holds stays held. A case with no open hold is
        bad input and changes nothing."""
        mine = [placement for placement in self.placements if placement.case == case]
        if form == "ids":
            media_id = choose(sorted(self.items), pick)
            if media_id is None:
                return
            scope = {"ids": [media_id]}
            closing = [p for p in mine if p.scope == "item" and p.members <= {media_id}]
        elif form == "org":
            org = choose(sorted(self.orgs), pick)
            if org is None:
                return
            scope = {"org": org}
            closing = [p for p in mine if p.scope != "item" and p.org == org]
        else:
            scope = {"release_all": True}
            closing = list(mine)
        self.counter += 1
        reason = f"release {self.counter}"

        def operation(system):
            return system.catalog.set_hold(held=False, reason=reason, case=case, actor="model", **scope)

        if not mine:
            before = self.state_of_everything()
            with pytest.raises(BadInput, match="holds nothing"):
                operation(self.system)
            assert self.state_of_everything() == before
            return
        self.run(operation, crash_at, lambda item, before, after: None)
        with self.reader() as session:  # committed or not (a crash): one transaction, all or nothing
            committed = session.scalar(select(Hold.id).where(Hold.release_reason == reason).limit(1)) is not None
            if form == "ids" and not committed:
                still = set(session.scalars(select(HoldItem.item_id).join(Hold, Hold.id == HoldItem.hold_id).where(
                    Hold.case_name == case, Hold.scope == "item", Hold.released_at.is_(None))))
                committed = not any(media_id in p.members for p in mine if p.scope == "item") or media_id not in still
        if not committed:
            return
        if form == "ids":
            for placement in mine:
                if placement.scope == "item":
                    placement.members.discard(media_id)
        self.placements = [placement for placement in self.placements if placement not in closing
                           and not (placement.scope == "item" and not placement.members)]

    @precondition(lambda self: self.items)
    @rule(pick=PICK, cases=st.permutations(CASES), second=st.sampled_from(("item", "query", "org")),
          release=st.sampled_from(("ids", "org", "case")))
    def overlap_two_cases_on_one_item_then_release_one(self, pick, cases, second, release):
        """Case 1 holds an item itself; case 2 holds it too (itself, by a query covering every live item of its org,
        or through its org); then case 1 (or case 2) is released: the item stays held while the other case holds it."""
        item = self._some_item(pick)
        if item is None or item.gone:
            return
        first, other = cases[0], cases[1]
        self.place_a_case_hold_on_items(first, [pick], None)
        if second == "item":
            self.place_a_case_hold_on_items(other, [pick], None)
        elif second == "query":
            self.place_a_case_hold_by_query(other, item.org, [WINDOW_BOUNDS[0], WINDOW_BOUNDS[-1]], None, False, None)
        else:
            self.place_a_case_hold_on_an_org(other, item.org, None)
        released = first if release == "ids" else (first, other)[pick % 2]
        org_pick = sorted(self.orgs).index(item.org)
        self.release_a_case(released, release, pick if release == "ids" else org_pick, None)

    @invariant()
    def what_the_claim_reads_says_held_exactly_when_a_case_holds_it(self):
        """Holds are resolved into the two columns the claim reads (`held_at`, `org_held`): for every live item they
        say held exactly when the model's cases (and the legacy default case) hold it."""
        with self.reader() as session:
            rows = {row.id: row.held_at is not None or bool(row.org_held) for row in session.execute(
                select(MediaItem.id, MediaItem.held_at, MediaItem.org_held).where(MediaItem.state == State.ACTIVE.value))}
        for item in self.items.values():
            if not item.gone and item.id in rows:
                assert rows[item.id] == self.held(item), (
                    f"{item.id}: the claim reads held={rows[item.id]}, the model's cases say {self.held(item)}")

    @invariant()
    def every_case_holds_what_the_model_says(self):
        """`hold list`'s count of each model case is the model's own: the live items its placements hold (never one
        gone by its expiry before the placement: expired is final)."""
        counts = {view.case: view.items_held for view in self.system.catalog.list_holds() if view.case in CASES}
        for case in CASES:
            expected = {item.id for item in self.items.values() if not item.gone and item.final_expiry is None and any(
                (p.scope == "org" and p.org == item.org) or item.id in p.members
                or (p.future and item.id not in p.known and self.query_matches(p, item))
                for p in self.placements if p.case == case)}
            assert counts.get(case, 0) == len(expected), (
                f"case {case} holds {counts.get(case, 0)} items by the catalog, {len(expected)} by the model: {sorted(expected)}")

    # -- deletions ------------------------------------------------------------------------------

    def sweep_may_take(self, item: Item, before: datetime, after: datetime) -> str | None:
        """A sweep takes an unheld item that expired by the database's clock when it claimed, at the latest
        when the step ended (also a claim a crash left behind, taken over once its lease ran out)."""
        return "deleted" if not self.held(item) and self.expiry(item) <= after else None

    def refusing(self, operation, refuse: bool):
        """`operation(system)`, with the store answering AccessDenied for every delete while it runs when
        `refuse`: the claimed items must stay `deleting`, their blobs and rows untouched by a finalize."""
        if not refuse:
            return operation
        keys = {key for item in self.items.values() for key in (item.key, *item.variants)}

        def refused(system):
            added = keys - self.refused
            self.refused |= added
            try:
                return operation(system)
            finally:
                self.refused -= added

        return refused

    @rule(crash_at=st.none() | st.integers(1, 8), refuse=st.booleans())
    def sweep(self, crash_at, refuse=False):
        """`sweep`: takes expired, unheld items (and finishes claims a crash left behind), against a store that
        may refuse every delete."""
        before = self.now()
        counts = self.run(self.refusing(lambda system: system.catalog.sweeper.sweep(), refuse), crash_at, self.sweep_may_take)
        if counts is not None:
            for item in self.items.values():
                if not item.gone and self.expiry(item) <= before and not self.held(item):
                    raise AssertionError(f"a finished sweep left {item.id} active though it expired at "
                                         f"{self.expiry(item).isoformat()}, before the sweep began ({before.isoformat()})")

    @rule(picks=st.lists(PICK, min_size=1, max_size=3), crash_at=st.none() | st.integers(1, 4), refuse=st.booleans())
    def purge_items(self, picks, crash_at, refuse):
        """`purge ID... --yes`: deletes now, whatever the expiry, never held media (against a store that may
        refuse every delete)."""
        chosen = {choose(sorted(self.items), pick) for pick in picks} - {None}
        if not chosen:
            return
        self.run(self.refusing(lambda system: system.catalog.purge(ids=sorted(chosen), actor="model"), refuse), crash_at,
                 lambda item, before, after: "deleted" if item.id in chosen and not self.held(item) else None)

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, crash_at=st.none() | st.integers(1, 4))
    def purge_org(self, pick, crash_at):
        """`purge --org ORG --yes`: refused for a held org; otherwise every unheld item of the org goes."""
        org = choose(sorted(self.orgs), pick)
        if self.orgs[org].held or self.org_held_by_a_case(org):
            with pytest.raises(BadInput):
                self.system.catalog.purge(org=org, actor="model")
            self.observe(self.now(), lambda item, before, after: None)
            return
        self.run(lambda system: system.catalog.purge(org=org, actor="model"), crash_at,
                 lambda item, before, after: "deleted" if item.org == org and not self.held(item) else None)

    def reconcile_may_take(self, item: Item, before: datetime, after: datetime) -> str | None:
        return "tombstoned" if (item.stashed or item.lost_in_crash) and not self.held(item) else None

    def mass_drift(self) -> bool | None:
        """Whether reconcile faces drift of nearly everything now (True), clearly not (False), or a case the
        model does not call (None): every active item's blob missing is one; half of them or fewer, none."""
        active = [item for item in self.items.values() if not item.gone]
        missing = sum(1 for item in active if item.stashed or item.lost_in_crash)
        if active and missing == len(active):
            return True
        if missing * 2 <= len(active) and len(self.orphans) * 2 <= len(self.blobs_on_disk()):
            return False
        return None

    @rule(crash_at=st.none() | st.integers(1, 6), grace=st.sampled_from((1, HOUR)))
    def reconcile(self, crash_at, grace=HOUR):
        """`reconcile --grace G`: may tombstone an unheld item whose blob is missing, counting the held ones it
        leaves; deletes no live blob, no orphan younger than the grace; refuses, changing nothing, when every
        active item's blob is missing."""
        drift = self.mass_drift()
        held_missing = sum(1 for item in self.items.values()
                           if not item.gone and (item.stashed or item.lost_in_crash) and self.held(item))
        blobs = self.blobs_on_disk()
        outcome = Outcome()

        def operation(system):
            try:
                return system.reconciler().run(grace=timedelta(seconds=grace), actor="model")
            except TooMany as exc:
                outcome.error = exc
                return None

        report = self.run(operation, crash_at, self.reconcile_may_take)
        refused = outcome.error is not None
        if crash_at is None and drift is not None:
            assert refused == drift, (f"reconcile {'refused' if refused else 'acted'} though the drift was "
                                      f"{'' if drift else 'not '}of nearly everything: {outcome.error or report}")
        if refused:
            assert self.blobs_on_disk() == blobs, "a reconcile that refused deleted blobs"
        elif report is not None:
            assert report.missing_held == held_missing, f"reconcile counted {report.missing_held} held items missing their blob, not {held_missing}"
        self.orphans_deleted_by_reconcile(grace)

    def orphans_deleted_by_reconcile(self, grace: int = HOUR) -> None:
        """An orphan blob reconcile deleted was older than the grace by the database's clock when it ended."""
        after = self.now()
        for key, orphan in list(self.orphans.items()):
            if not (self.root / key).exists():
                assert orphan.written <= after - timedelta(seconds=grace - 1), (
                    f"reconcile deleted {key}, written {orphan.written.isoformat()}, younger than the grace at "
                    f"{after.isoformat()}")
                del self.orphans[key]

    @rule(pick=PICK, days_away=st.sampled_from((0, 2)))
    def a_blob_goes_away_for_a_while(self, pick, days_away=0):
        """An operator's `mv` undone hours (or days, with the daily compaction running meanwhile) later:
        reconcile records the blob missing, tombstones the unheld item once it has been missing for the grace,
        and keeps the blob that comes back until the item's expiry; compaction keeps that tombstone until then."""
        media_id = choose(sorted(i.id for i in self.items.values() if not i.stashed and not i.gone), pick)
        if media_id is None:
            return
        item = self.items[media_id]
        self.stash_blob(item)
        self.reconcile(None)
        self.advance_clock(2 * HOUR)
        self.reconcile(None)
        if days_away:
            self.advance_clock(days_away * DAY)
            self.compact(1)
        if item.stashed:
            self.blob_comes_back_for(item)
        self.reconcile(None)

    @rule(days=st.sampled_from((1, 40)))
    def compact(self, days):
        """`compact --older-than D`: removes tombstones deleted longer ago, never a live or claimed row, never
        a `missing_blob` tombstone before its item's expiry (its blob may come back). Its IDs answer not_found."""
        table = MediaItem.__table__
        with self.reader() as session:
            tombstones = {row.id: row for row in session.execute(
                select(table.c.id, table.c.deletion_reason, table.c.deleted_at, table.c.expires_at)
                .where(table.c.state == State.DELETED.value))}
        before = self.now()
        self.system.engine.tombstones.compact(older_than=timedelta(days=days), actor="model")
        after = self.now()
        with self.reader() as session:
            left = set(session.scalars(select(table.c.id)))
        for media_id in [media_id for media_id in self.items if media_id not in left]:
            row = tombstones.get(media_id)
            assert row is not None, f"compaction removed {media_id}, which was not a tombstone"
            assert row.deleted_at <= after - timedelta(days=days), f"compaction removed {media_id}, deleted {row.deleted_at}"
            assert row.deletion_reason != "missing_blob" or row.expires_at <= after, (
                f"compaction removed the missing_blob tombstone of {media_id}, which expires {row.expires_at} "
                f"(now {before.isoformat()}): a blob coming back would then be taken for an orphan")
            for key in self.items[media_id].variants:  # no row names them now: any left are orphans
                orphan = self.adopted.pop(key)
                if (self.root / key).exists():
                    self.orphans[key] = orphan
            del self.items[media_id]

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK)
    def adopt(self, pick):
        """`adopt --org ORG --yes`: every old blob the catalog does not know becomes an item of ORG."""
        org = choose(sorted(self.orgs), pick)
        outcome = self.attempt(lambda: self.system.catalog.adopter().run(org=org, grace=timedelta(minutes=10), actor="model"))
        assert outcome.error is None, outcome.error
        self.observe(self.now(), lambda item, before, after: None)

    # -- the store's own troubles --------------------------------------------------------------

    @rule(pick=PICK, every=st.booleans())
    def blob_vanishes(self, pick, every):
        """An operator's `mv`, an unmounted shard: the blob is briefly not where the catalog says. Or `rm -rf`
        of the media (the marker left): reconcile must see drift of everything, not act on it."""
        if every:
            for item in self.items.values():
                if not item.gone:
                    self.stash_blob(item)
            return
        media_id = choose(sorted(i.id for i in self.items.values() if not i.stashed), pick)
        if media_id is not None:
            self.stash_blob(self.items[media_id])

    def stash_blob(self, item: Item) -> None:
        path = self.root / item.key
        if path.exists():
            path.rename(self.stash / item.id)
            item.stashed = item.ever_stashed = True

    @rule(pick=PICK)
    def blob_comes_back(self, pick):
        media_id = choose(sorted(i.id for i in self.items.values() if i.stashed), pick)
        if media_id is not None:
            self.blob_comes_back_for(self.items[media_id])

    def blob_comes_back_for(self, item: Item) -> None:
        path = self.root / item.key
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.stash / item.id).rename(path)
        item.stashed = False

    @rule(picks=st.lists(PICK, min_size=1, max_size=2), refuse=st.booleans())
    def the_store_refuses_some_deletes_or_accepts_all_again(self, picks, refuse):
        """The store answers AccessDenied for these keys until told otherwise (a bucket policy, an immutable dir)."""
        if not refuse:
            self.refused.clear()
            return
        chosen = {choose(sorted(self.items), pick) for pick in picks} - {None}
        self.refused |= {self.items[media_id].key for media_id in chosen}

    # -- races: the first operation paused at a boundary while the second runs --------------------

    # Each race a rule of its own (Hypothesis picks rules evenly): the races are what one owner per blob is
    # about. Each makes what it races over (an orphan old enough, an expired item) so that it always bites.

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, pause=st.integers(0, 3), same_content=st.booleans())
    def race_of_two_registrations_of_one_id(self, pick, pause, same_content):
        self.race_two_registrations_of_one_id(pick=pick, pause_at=pause_of("registration", pause), same_content=same_content)

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, pause=st.integers(0, 3))
    def race_of_two_registrations_of_one_key(self, pick, pause):
        self.upstream_writes_a_blob()
        self.race_two_registrations_of_one_key(pick=pick, pause_at=pause_of("registration", pause))

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, pause=st.integers(0, 3), reconcile_first=st.booleans())
    def race_of_reconcile_and_a_registration_of_an_orphans_key(self, pick, pause, reconcile_first):
        # An orphan older than the one-second grace the racing reconcile is given.
        self.upstream_writes_a_blob()
        self.advance_clock(3)
        self.race_reconcile_and_a_registration_of_an_orphans_key(
            pick=-1, pause_at=pause_of("reconcile" if reconcile_first else "registration", pause),
            reconcile_first=reconcile_first, org=choose(sorted(self.orgs), pick), grace=1)

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, pause=st.integers(0, 3), race=st.sampled_from(("adopt and a registration", "two manifests")),
          lines=st.integers(1, 4))
    def race_of_adopt_or_manifests(self, pick, pause, race, lines):
        if race == "two manifests":
            self.race_two_overlapping_manifests(pick=pick, pause_at=pause_of("manifest", pause), lines=lines)
        else:
            self.upstream_writes_a_blob()
            self.race_adopt_and_a_registration_of_the_same_key(pick=-1, pause_at=pause_of("adopt", pause),
                                                               org=choose(sorted(self.orgs), pick))

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, pause=st.integers(0, 3), change=st.sampled_from(("hold-org", "release-org", "retention", "hold-item")),
          retention=st.sampled_from(sorted(RETENTIONS)), policy_first=st.booleans())
    @policy_step
    def race_of_a_sweep_and_a_policy_change(self, pick, pause, change, retention, policy_first):
        # Something for the sweep to claim in the org the change is about.
        org = choose(sorted(self.orgs), pick)
        self.register(org, "1h", -3, None)
        self.freeze_expired(self.now())  # registered expired: gone by its expiry before the race's change begins
        self.race_a_sweep_and_a_policy_change(pick=pick, pause_at=pause_of("policy" if policy_first else "sweep", pause),
                                              change=change, retention=retention, policy_first=policy_first)

    def attempt(self, operation) -> Outcome:
        try:
            return Outcome(result=operation())
        except RetentionError as exc:
            return Outcome(error=exc)

    def race(self, first, second, pause_at: tuple[str, int]) -> tuple[Outcome, Outcome]:
        """Run `first` in a thread paused at the boundary `pause_at` (or to its end), `second` in another
        meanwhile (given RACE_GRACE_S before `first` goes on: it may be waiting for `first`'s locks), then both
        to their ends. Returns their outcomes; an unexpected exception fails the test."""
        plan = PausePlan(pause_at)
        outcomes = [Outcome(), Outcome()]

        def runner(index, operation, plan_for_thread):
            PLAN.set(plan_for_thread)  # a thread starts in a context of its own
            try:
                outcomes[index].result = operation()
            except BaseException as exc:  # noqa: BLE001 - judged below
                outcomes[index].error = exc
            finally:
                if plan_for_thread is not None:
                    plan_for_thread.paused.set()

        one = threading.Thread(target=runner, args=(0, first, plan))
        one.start()
        plan.paused.wait(60)
        two = threading.Thread(target=runner, args=(1, second, None))
        two.start()
        two.join(RACE_GRACE_S)
        plan.resume.set()
        one.join(120)
        two.join(120)
        assert not one.is_alive() and not two.is_alive(), "a raced operation hung"
        for outcome in outcomes:
            if outcome.error is not None and not isinstance(outcome.error, RetentionError):
                raise outcome.error
        return outcomes[0], outcomes[1]

    def raced(self, first, second, pause_at: tuple[str, int], allowed) -> tuple[Outcome, Outcome]:
        before = self.now()
        self.snapshot_leases()
        outcomes = self.race(first, second, pause_at)
        self.learn_orgs()
        self.learn_item_holds()
        self.observe(before, allowed)
        return outcomes

    def race_two_registrations_of_one_id(self, pick, pause_at, same_content, **_):
        """Two `register --file F --id ID` at once (the same file, or two files): at most one wins, its item
        has its blob, the loser says so in one sentence and deletes nothing it does not own."""
        org = choose(sorted(self.orgs), pick)
        self.counter += 1
        media_id = f"r{self.counter}"
        sources = []
        for number in range(2):
            source = self.workdir / "up" / f"{media_id}-{number}.bin"
            source.write_bytes(f"raced {media_id}".encode() if same_content else f"raced {media_id} {number}".encode())
            sources.append(source)
        created = self.created_for(org, None, 2 * HOUR)
        first, second = (lambda source=source: self.system.catalog.register(org=org, file=source, media_id=media_id,
                                                                          created_at=created) for source in sources)
        outcomes = self.raced(first, second, pause_at, lambda item, before, after: None)
        assert sum(1 for outcome in outcomes if outcome.error is None) <= 1, outcomes
        for outcome in outcomes:
            assert outcome.error is None or isinstance(outcome.error, BadInput), outcome.error
        if media_id not in self.items and (self.root / key_for_id(media_id)).exists():
            self.orphans[key_for_id(media_id)] = Orphan((self.root / key_for_id(media_id)).read_bytes(), self.now())

    def race_two_registrations_of_one_key(self, pick, pause_at, **_):
        """Two `register --key KEY` of one upstream blob under different IDs: at most one row names the key."""
        key, org = choose(self.upstream_keys(), pick), choose(sorted(self.orgs), pick)
        if key is None:
            return
        self.counter += 1
        ids = [f"k{self.counter}a", f"k{self.counter}b"]
        first, second = (lambda media_id=media_id: self.system.catalog.register(org=org, key=key, media_id=media_id) for media_id in ids)
        outcomes = self.raced(first, second, pause_at, lambda item, before, after: None)
        assert sum(1 for outcome in outcomes if outcome.error is None) <= 1, outcomes
        assert sum(1 for item in self.items.values() if item.key == key) <= 1

    def race_reconcile_and_a_registration_of_an_orphans_key(self, pick, pause_at, reconcile_first, org=None, grace=HOUR, **_):
        """Reconcile and `register --key` of an orphan's key at once: the registration ends with an item whose
        blob is there, or fails saying the blob is gone; reconcile never deletes a blob a row names."""
        key, org = choose(self.upstream_keys(), pick), org or choose(sorted(self.orgs), pick)
        if key is None:
            return
        self.counter += 1

        def registration():
            return self.system.catalog.register(org=org, key=key, media_id=f"k{self.counter}")

        def reconciliation():
            try:
                return self.system.reconciler().run(grace=timedelta(seconds=grace), actor="model")
            except TooMany:
                return None

        first, second = (reconciliation, registration) if reconcile_first else (registration, reconciliation)
        outcomes = self.raced(first, second, pause_at, self.reconcile_may_take)
        registered = outcomes[1] if reconcile_first else outcomes[0]
        if registered.error is not None:
            assert isinstance(registered.error, BadInput), registered.error
        self.orphans_deleted_by_reconcile(grace)

    def race_adopt_and_a_registration_of_the_same_key(self, pick, pause_at, org=None, **_):
        """`adopt` and `register --key` of one of the blobs it adopts, at once: one row names the key, with its blob."""
        key, org = choose(self.upstream_keys(), pick), org or choose(sorted(self.orgs), pick)
        if key is None:
            return
        self.counter += 1
        outcomes = self.raced(lambda: self.system.catalog.adopter().run(org=org, grace=timedelta(0), actor="model"),
                              lambda: self.system.catalog.register(org=org, key=key, media_id=f"k{self.counter}"),
                              pause_at, lambda item, before, after: None)
        assert outcomes[0].error is None, outcomes[0].error
        assert sum(1 for item in self.items.values() if item.key == key) <= 1

    def race_two_overlapping_manifests(self, pick, pause_at, lines, **_):
        """Two `register --manifest` of the same file lines in opposite order: every row that committed has its blob."""
        org = choose(sorted(self.orgs), pick)
        self.counter += 1
        rows = []
        for number in range(lines):
            source = self.workdir / "up" / f"mf{self.counter}-{number}.bin"
            source.write_bytes(f"manifest {self.counter} {number}".encode())
            rows.append({"org": org, "id": f"mf{self.counter}-{number}", "file": str(source), "ttl": "30d"})
        paths = []
        for name, ordered in (("forward", rows), ("backward", rows[::-1])):
            path = self.workdir / "up" / f"mf{self.counter}-{name}.jsonl"
            path.write_text("".join(json.dumps(line) + "\n" for line in ordered))
            paths.append(path)
        outcomes = self.raced(*(lambda path=path: self.system.catalog.register_manifest(path, files_root=self.workdir / "up", batch_size=2) for path in paths),
                              pause_at=pause_at, allowed=lambda item, before, after: None)
        for outcome in outcomes:
            assert outcome.error is None or "nothing in this batch" in str(outcome.error) or "already" in str(outcome.error) \
                or "taken over" in str(outcome.error), outcome.error
        for number in range(lines):
            key = key_for_id(f"mf{self.counter}-{number}")
            if f"mf{self.counter}-{number}" not in self.items and (self.root / key).exists():
                self.orphans[key] = Orphan((self.root / key).read_bytes(), self.now())

    def race_a_sweep_and_a_policy_change(self, pick, pause_at, change, retention, policy_first=False, rule_pattern="image/*", **_):
        """A sweep paused mid-way while a hold, a release or a retention change lands: the sweep may finish what
        it claimed under the old policy, and verify (which judges claims by when each change took effect)
        reports nothing."""
        org, item = choose(sorted(self.orgs), pick), self._some_item(pick)
        if item is None:
            return
        old_orgs = {name: dataclasses.replace(value) for name, value in self.orgs.items()}
        old_items = {media_id: other.held for media_id, other in self.items.items()}

        def policy():
            if change in ("hold-org", "release-org"):
                return self.system.catalog.set_hold(held=change == "hold-org", reason="model", org=org, actor="model")
            if change == "retention":
                return self.system.catalog.set_org(org, retention, actor="model")
            if change == "rule":
                return self.system.catalog.rules.set(org, rule_pattern, retention, actor="model")
            return self.system.catalog.set_hold(held=True, reason="model", ids=[item.id], actor="model")

        def may_take(candidate: Item, before: datetime, after: datetime) -> str | None:
            # Under the policy before the change or after it: the claim may have come first.
            old = old_orgs[candidate.org]
            held_then = old_items[candidate.id] or old.held
            expiry_then = candidate.created + timedelta(seconds=self.lifetime_of(candidate, old))
            if not held_then and expiry_then <= after:
                return "deleted"
            return self.sweep_may_take(candidate, before, after)

        sweep = lambda: self.system.catalog.sweeper.sweep()  # noqa: E731
        # The policy change paused in its transaction (after it locked the org, before it touched the items)
        # while a sweep claims; or the sweep paused (after its claim, its locks held) while the change waits.
        first, second = (policy, sweep) if policy_first else (sweep, policy)
        outcomes = self.raced(first, second, pause_at, may_take)
        swept, changed = (outcomes[1], outcomes[0]) if policy_first else outcomes
        assert swept.error is None, swept.error
        assert changed.error is None or isinstance(changed.error, (Gone, BadInput)), changed.error

    # -- retention rules by content type: `org rule set|rm`, registrations of several MIME types -------------------

    @staticmethod
    def lifetime_of(item: Item, org: Org) -> int:
        """The model's own reading of the contract: a TTL wins over every rule; else the rule for the item's exact
        `type/subtype` (case and parameters ignored), else its `type/*` rule, else the org's period."""
        if item.ttl:
            return item.ttl
        essence = item.mime.split(";")[0].strip().lower()
        for pattern in (essence, essence.split("/")[0] + "/*"):
            if pattern in org.rules:
                return org.rules[pattern]
        return org.retention

    def learn_rules(self) -> None:
        """Died or raced, the rules table says which rules exist."""
        with self.reader() as session:
            rows = session.execute(select(RetentionRule.org_id, RetentionRule.mime_pattern, RetentionRule.retention_seconds)).all()
        for name, org in self.orgs.items():
            org.rules = {pattern: seconds for org_id, pattern, seconds in rows if org_id == name}

    def expiries(self) -> dict:
        with self.reader() as session:
            return dict(session.execute(select(MediaItem.id, MediaItem.expires_at)).all())

    @initialize(before=st.lists(st.tuples(st.sampled_from(ORGS), st.sampled_from(RULE_MIMES), st.sampled_from(EXPIRES_IN)),
                                max_size=4),
                changes=st.lists(st.tuples(st.sampled_from(ORGS), st.sampled_from(RULE_PATTERNS),
                                           st.none() | st.sampled_from(sorted(RETENTIONS))), max_size=4),
                after=st.lists(st.tuples(st.sampled_from(ORGS), st.none() | st.sampled_from(sorted(TTLS)),
                                         st.sampled_from(RULE_MIMES), st.sampled_from(EXPIRES_IN)), max_size=3))
    def a_deployment_with_content_types(self, before, changes, after):
        """Where every example also starts (before or after `a_deployment`): TTL-less items of several content types,
        rules set, changed and removed over them, more items under those rules. A random step is one of dozens, so
        rules drawn only as steps would seldom meet the items they cover."""
        for org in ORGS:
            if org not in self.orgs:
                self.org_set(org, None, "90d", None)
        for org, mime, expires_in in before:
            self.register_a_content_type(org, None, mime, expires_in, None)
        for org, pattern, retention in changes:
            self.set_or_remove_a_rule(sorted(self.orgs).index(org), pattern, retention, None)
        for org, ttl, mime, expires_in in after:
            self.register_a_content_type(org, ttl, mime, expires_in, None)

    @rule(org=st.sampled_from(ORGS), ttl=st.none() | st.sampled_from(sorted(TTLS)), mime=st.sampled_from(RULE_MIMES),
          expires_in=st.sampled_from(EXPIRES_IN), crash_at=st.none() | st.integers(1, 4))
    def register_a_content_type(self, org, ttl, mime, expires_in, crash_at):
        """`register … --mime M`: an item of one of several content types (the same type in other case, with
        parameters), expiring `expires_in` from now under its most specific rule."""
        self.counter += 1
        self._register(f"m{self.counter}", org, ttl, expires_in, crash_at, mime=mime)

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, pattern=st.sampled_from(RULE_PATTERNS), retention=st.none() | st.sampled_from(sorted(RETENTIONS)),
          crash_at=st.none() | st.integers(1, 3))
    @policy_step
    def set_or_remove_a_rule(self, pick, pattern, retention, crash_at):
        """`org rule set ORG --mime P --retention D` (`retention` None: `org rule rm ORG --mime P`). Removing a rule
        that does not exist is not found and changes nothing; setting the period a rule has changes nothing, not an
        expiry by a microsecond, nor the audit trail."""
        org = choose(sorted(self.orgs), pick)
        rules, key = self.orgs[org].rules, pattern.lower()
        if retention is None and key not in rules:
            before = self.state_of_everything(), self.expiries()
            with pytest.raises(NotFound):
                self.system.catalog.rules.remove(org, pattern, actor="model")
            assert (self.state_of_everything(), self.expiries()) == before
            return
        same = retention is not None and rules.get(key) == RETENTIONS[retention]
        before, trail = self.expiries(), self.audit_length()

        def operation(system):
            if retention is None:
                return system.catalog.rules.remove(org, pattern, actor="model")
            return system.catalog.rules.set(org, pattern, retention, actor="model")

        self.run(operation, crash_at, lambda item, before, after: None)
        if crash_at is not None:
            self.learn_rules()
            return
        if same:
            assert self.expiries() == before and self.audit_length() == trail, "a no-op rule change rescheduled or audited"
        changed = {pattern: seconds for pattern, seconds in rules.items() if pattern != key}
        if retention is not None:
            changed[key] = RETENTIONS[retention]
        self.orgs[org].rules = changed

    def audit_length(self) -> int:
        with self.reader() as session:
            return session.scalar(select(func.count()).select_from(AuditEvent))

    @precondition(lambda self: self.orgs)
    @rule(pick=PICK, pause=st.integers(0, 3), pattern=st.sampled_from(RULE_PATTERNS),
          retention=st.sampled_from(sorted(RETENTIONS)), policy_first=st.booleans())
    @policy_step
    def race_of_a_sweep_and_a_rule_change(self, pick, pause, pattern, retention, policy_first):
        """A sweep paused mid-way while a rule lands (or the rule change paused, its org locked, while a sweep claims)."""
        self.race_a_sweep_and_a_policy_change(pick=pick, pause_at=pause_of("policy" if policy_first else "sweep", pause),
                                              change="rule", retention=retention, policy_first=policy_first,
                                              rule_pattern=pattern)

    # -- misconfigurations: every command refuses and nothing changes ------------------------------

    def state_of_everything(self) -> tuple:
        table = MediaItem.__table__
        with self.reader() as session:
            rows = session.execute(select(table.c.id, table.c.state, table.c.held_at).order_by(table.c.id)).all()
        return tuple(rows), frozenset(self.blobs_on_disk())

    def refuses(self, system: System, command: str) -> None:
        operations = {
            "reconcile": lambda: system.reconciler().run(grace=RECONCILE_GRACE, actor="model"),
            "reconcile-allowing-drift": lambda: system.reconciler().run(grace=RECONCILE_GRACE, actor="model",
                                                                        allow_mass_drift=True),
            "sweep": lambda: system.catalog.sweeper.sweep(),
            "purge": lambda: system.catalog.purge(org=ORGS[0], actor="model"),
            "verify": lambda: Verifier(system.db, system.store).run(grace=RECONCILE_GRACE, stuck_after=timedelta(days=3650)),
            "register": lambda: system.catalog.register(org=ORGS[0], file=self.upload(), media_id="misconfigured"),
            "adopt": lambda: system.catalog.adopter().run(org=ORGS[0], grace=timedelta(0), actor="model"),
        }
        # Refused before anything changed: the binding (or, for a command that first names an org, the org).
        with pytest.raises((BadInput, NotFound, MediaRootMissing)) as refused:
            operations[command]()
        assert isinstance(refused.value, (Unbound, MediaRootMissing)) or command in ("purge", "adopt"), refused.value

    def upload(self) -> Path:
        source = self.workdir / "up" / "misconfigured.bin"
        source.write_bytes(b"misconfigured")
        return source

    COMMANDS = ("reconcile", "reconcile-allowing-drift", "sweep", "purge", "verify", "register", "adopt")

    @rule(how=st.sampled_from(("an empty catalog", "the wrong prefix", "an unmounted volume", "a missing media root")),
          command=st.sampled_from(COMMANDS), pick=PICK)
    def a_command_misconfigured(self, how, command, pick):
        """A command run with the wrong settings refuses in one sentence and changes nothing."""
        {"an empty catalog": self.a_command_against_an_empty_catalog,
         "the wrong prefix": self.a_command_on_the_wrong_prefix,
         "an unmounted volume": self.a_command_while_the_volume_is_not_mounted,
         "a missing media root": self.a_command_without_its_media_root}[how](command=command, pick=pick)

    def a_command_without_its_media_root(self, command, **_):
        """The media root is not there at all: a new process refuses, and nothing creates the directory."""
        before = self.state_of_everything()
        away = self.workdir / "mounted-away"
        self.root.rename(away)
        other = None
        try:
            other = System(self.url, self.root, lambda keys: None, self.clock, set())
            self.refuses(other, command)
            assert not self.root.exists(), f"{command} created the missing media root"
        finally:
            if other is not None:
                other.close()
            if self.root.exists():
                shutil.rmtree(self.root)
            away.rename(self.root)
        assert self.state_of_everything() == before

    def a_command_against_an_empty_catalog(self, command, **_):
        """MEDIA_RETENTION_DATABASE_URL unset: a new, empty catalog facing this store refuses, whatever the command."""
        before = self.state_of_everything()
        other_url, cleanup = self.empty_catalog_url()
        other = System(other_url, self.root, lambda keys: None, self.clock, set())
        try:
            with other.db.transaction() as session:
                for name in ORGS:
                    session.merge(Organization(id=name, retention_seconds=HOUR))
            self.refuses(other, command)
        finally:
            other.close()
            cleanup()
        assert self.state_of_everything() == before

    def empty_catalog_url(self) -> tuple[str, Callable[[], None]]:
        if not self.postgresql:
            path = self.workdir / f"empty-{self.counter}.sqlite3"
            database = Database(f"sqlite:///{path}")
            schema.upgrade(database)
            database.dispose()
            return f"sqlite:///{path}", lambda: path.unlink(missing_ok=True)
        name = f"e_{os.getpid()}_{self.counter}_{threading.get_ident() % 10_000}"
        with self.observer.engine.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {name}"))
        url = self.url.split("?")[0] + f"?options=-csearch_path%3D{name}"
        database = Database(url)
        schema.upgrade(database)
        database.dispose()

        def cleanup():
            with self.observer.engine.begin() as connection:
                connection.execute(text(f"DROP SCHEMA {name} CASCADE"))

        return url, cleanup

    def a_command_on_the_wrong_prefix(self, pick, command, **_):
        """The storage URL names a directory inside the media root (a prefix left off or added): it refuses."""
        inner = choose(sorted(path.name for path in self.root.iterdir() if path.is_dir()), pick)
        if inner is None:
            return
        before = self.state_of_everything()
        other = System(self.url, self.root / inner, lambda keys: None, self.clock, set())
        try:
            self.refuses(other, command)
        finally:
            other.close()
        assert self.state_of_everything() == before

    def a_command_while_the_volume_is_not_mounted(self, command, **_):
        """The volume is not mounted: its mount point is an empty directory. Every command refuses and nothing
        is written beneath the mount point."""
        before = self.state_of_everything()
        mounted = self.workdir / "mounted-away"
        self.root.rename(mounted)
        self.root.mkdir()
        try:
            self.refuses(self.system, command)
            assert list(self.root.iterdir()) == [], f"{command} wrote beneath the mount point: {list(self.root.iterdir())}"
        finally:
            self.root.rmdir()
            mounted.rename(self.root)
        assert self.state_of_everything() == before

    # -- verify is an oracle too: what it must see -------------------------------------------------

    def plant(self, item: Item, **values) -> None:
        table = MediaItem.__table__
        with self.observer.transaction() as session:
            session.execute(update(table).where(table.c.id == item.id).values(**values))

    @rule(pick=PICK, kind=st.sampled_from(("early_deletion", "held_deleted")))
    def verify_sees_a_planted_breach(self, pick, kind):
        """A row made `deleted` behind the engine's back, before its expiry or while held: verify reports it."""
        now = self.now()
        candidates = [item for item in self.items.values() if not item.gone and not self.held(item)
                      and (kind == "held_deleted" or self.expiry(item) > now + timedelta(minutes=5))]
        if not candidates:
            return
        item = choose(sorted(candidates, key=lambda candidate: candidate.id), pick)
        reason = "ttl" if item.ttl else "retention"
        held = {"held_at": db_now(), "hold_reason": "planted"} if kind == "held_deleted" else {}
        before = self.verify().breaches[kind]
        self.plant(item, state=State.DELETED.value, deletion_reason=reason, claimed_at=db_now(), deleted_at=db_now(), **held)
        try:
            assert self.verify().breaches[kind] == before + 1, f"verify did not report the planted {kind} of {item.id}"
        finally:
            self.plant(item, state=State.ACTIVE.value, deletion_reason=None, claimed_at=None, deleted_at=None,
                       held_at=None if kind == "held_deleted" else MediaItem.held_at,
                       hold_reason=None if kind == "held_deleted" else MediaItem.hold_reason)

    # -- what must hold after every step -----------------------------------------------------------

    def blob_may_be_gone(self, item: Item, now: datetime) -> bool:
        if not item.gone:
            return False
        if item.gone_by == "deleted":
            return True
        # A tombstone for a missing blob: a blob that came back stays until the item's own expiry.
        return self.expiry(item) <= now

    @invariant()
    def nothing_the_store_saw_broke_a_promise(self):
        assert not self.violations, self.violations

    @invariant()
    def no_blob_goes_before_its_time(self):
        now = self.now()
        for item in self.items.values():
            for key in item.variants:
                assert (self.root / key).exists() or item.gone or item.lost_in_crash, (
                    f"variant {key} of {item.id} was deleted though its item is live: held={self.held(item)}, "
                    f"expires {self.expiry(item).isoformat()}, now {now.isoformat()}")
            if item.stashed or (self.root / item.key).exists():
                continue
            if item.lost_in_crash and not item.gone:
                assert self.expiry(item) <= now and not self.held(item), (
                    f"{item.id}'s blob went in a batch that never committed, yet it is live now")
                continue
            assert self.blob_may_be_gone(item, now), (
                f"the blob of {item.id} was deleted though the model forbids it: gone={item.gone} ({item.gone_by}), "
                f"held={self.held(item)}, expires {self.expiry(item).isoformat()}, now {now.isoformat()}")

    def verify(self):
        """`media-retention verify`, with a grace and a stuck-after so long that only what is wrong now counts
        (crash leftovers too young for reconcile, and claims of a fleet that is not running, are not breaches here)."""
        return Verifier(self.system.db, self.system.store).run(grace=timedelta(days=3650), stuck_after=timedelta(days=3650))

    @invariant()
    def verify_finds_no_item_deleted_early_or_while_held_and_no_wrong_expiry(self):
        """The operator's oracle agrees with the model at every step: nothing that depends on blobs moving
        around (those the model tracks itself), only what the rows can tell."""
        report = self.verify()
        found = {kind: report.breaches[kind] for kind in ("early_deletion", "held_deleted", "wrong_expiry", "size_mismatch")
                 if report.breaches[kind]}
        assert not found, f"verify reports {found}: {report.examples}"

    @invariant()
    def lookups_answer_what_the_model_says(self):
        """Gone once taken; gone too from its expiry (database clock) unless held, before any sweep; else the item."""
        catalog = self.system.catalog
        before = self.now()
        answers = {}
        for item in self.items.values():
            try:
                answers[item.id] = catalog.lookup(item.id).state
            except Gone as gone:
                answers[item.id] = gone.tombstone.state
        after = self.now()
        for item in self.items.values():
            answer = answers[item.id]
            if item.gone:
                assert answer != State.ACTIVE.value, f"{item.id} is gone but its lookup answers {answer}"
            elif self.held(item) or self.expiry(item) > after:
                assert answer == State.ACTIVE.value, f"{item.id} is live (expires {self.expiry(item).isoformat()}) but answers {answer}"
            elif self.expiry(item) <= before:
                assert answer == "expired", f"{item.id} expired at {self.expiry(item).isoformat()} but its lookup answers {answer}"
        with pytest.raises(NotFound):
            catalog.lookup("never-registered")

    @invariant()
    def no_blob_outlives_a_finished_deletion(self):
        """A `deleted` row whose blob is still there is a leak, unless that blob came back after its tombstone."""
        with self.reader() as session:
            deleted = session.execute(
                select(MediaItem.id, MediaItem.storage_key, MediaItem.deletion_reason).where(MediaItem.state == State.DELETED.value)
            ).all()
        for row in deleted:
            item = self.items[row.id]
            if (self.root / row.storage_key).exists():
                assert item.ever_stashed, f"{row.id} is deleted ({row.deletion_reason}) but its blob is still there"
            if row.deletion_reason != "missing_blob":  # reconcile's tombstone leaves variants to its expiry
                left = [key for key in item.variants if (self.root / key).exists()]
                assert not left, f"{row.id} is deleted ({row.deletion_reason}) but its variants {left} are still there"

    @invariant()
    def every_live_item_has_its_blob(self):
        """An item the catalog answers for has its blob, unless the model moved it away itself."""
        for item in self.items.values():
            if item.lost_in_crash and not item.gone:
                continue  # its blob went in a batch that died before its commit: expired, 404, the next sweep's
            if not item.gone and not item.stashed:
                assert (self.root / item.key).exists(), f"active item {item.id} has no blob at {item.key}"
            if not item.gone:
                missing = [key for key in item.variants if not (self.root / key).exists()]
                assert not missing, f"active item {item.id} lost its variants {missing}"


# Examples per run: enough to find each defect this test was written against within the default suite's
# time budget; every CI run draws new ones; `make soak` runs thousands.
EXAMPLES = int(os.environ.get("MEDIA_RETENTION_TEST_MODEL_EXAMPLES", "120"))


@contextlib.contextmanager
def boundaries_inside_transactions():
    """More boundaries an operation can be paused or killed at, inside transactions that hold row locks: after
    a sweep's claim statement (its rows locked until it commits), and before a hold or a retention change
    touches the org's items (the org row locked). A race paused there is the audit's: a hold that waited for
    a claim, a claim that got in while a change was under way."""
    real_claim = items_sql.Claims.expired
    real_lock = items_sql.Claims.lock_expired
    real = {name: getattr(items_sql, name) for name in ("mirror_org_hold", "rewrite_expiry", "mark_members", "hold_by_query",
                                                        "unhold_members")}

    def claim(self, *args, **kwargs):
        rows = real_claim(self, *args, **kwargs)
        cross("claimed")
        return rows

    def lock(self, *args, **kwargs):  # the one-transaction sweep's pick (PostgreSQL): its rows locked, unwritten
        rows = real_lock(self, *args, **kwargs)
        cross("claimed")
        return rows

    def crossing(function):
        def changed(*args, **kwargs):
            cross("policy")
            return function(*args, **kwargs)
        return changed

    items_sql.Claims.expired = claim
    items_sql.Claims.lock_expired = lock
    for name, function in real.items():
        setattr(items_sql, name, crossing(function))
    try:
        yield
    finally:
        items_sql.Claims.expired = real_claim
        items_sql.Claims.lock_expired = real_lock
        for name, function in real.items():
            setattr(items_sql, name, function)


def run_model(url: str, workdir: Path, max_examples: int, *, postgresql: bool, steps: int = 30) -> None:
    machine = type("Model", (RetentionModel,), {"url": url, "workdir": workdir, "postgresql": postgresql})
    with boundaries_inside_transactions():
        _run(machine, max_examples, steps)


def _run(machine, max_examples: int, steps: int) -> None:
    run_state_machine_as_test(
        machine,
        # No explain phase: on Python < 3.12 it traces every line, which makes each step of this test crawl.
        settings=settings(max_examples=max_examples, stateful_step_count=steps, deadline=None,
                          suppress_health_check=list(HealthCheck),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target] + ([Phase.shrink] if SHRINK else [])),
    )


@pytest.mark.critical_path(seconds=120)
@pytest.mark.timeout(1200)
def test_no_sequence_of_operations_deletes_early_deletes_held_media_or_leaks_on_sqlite(sqlite_database, tmp_path):
    """Random operation sequences with crashes, races, misconfigurations and a moving clock never break the promises (SQLite)."""
    run_model(sqlite_database.url, tmp_path, max_examples=EXAMPLES, postgresql=False)


@pytest.mark.critical_path(seconds=60)
@pytest.mark.timeout(1200)
def test_no_sequence_of_operations_deletes_early_deletes_held_media_or_leaks_on_postgresql(pg_database, tmp_path):
    """The same model against PostgreSQL, whose clock the model sets apart from the process's (fewer examples:
    each costs more round trips)."""
    run_model(clocked_url(pg_database.url), tmp_path, max_examples=max(EXAMPLES // 3, 1), postgresql=True)


def test_the_models_postgresql_clock_runs_apart_from_the_process_clock_and_claims_follow_it(pg_database, tmp_path):
    """The oracle's premise: in the model's schema `now()` is the offset clock (two days behind the process at
    first), a sweep's claim follows it, and moving it moves what is due."""
    url = clocked_url(pg_database.url)
    db = Database(url)
    clock = OffsetClock(db, CLOCK_START_OFFSET)
    root = tmp_path / "media"
    root.mkdir()
    engine = build(load_settings(data_dir=tmp_path / "data", database_url=url, storage_url=root.as_uri()), database=db)
    try:
        with db.transaction() as session:
            now = session.scalar(select(db_now()))
        assert abs((datetime.now(timezone.utc) - now).total_seconds() - 2 * DAY) < 60
        engine.catalog.set_org("acme", "1h")
        source = tmp_path / "f.bin"
        source.write_bytes(b"x")
        # Expired a day ago by the process's clock, due in an hour by the database's.
        item = engine.catalog.register(org="acme", file=source, media_id="m", created_at=now)
        assert engine.sweeper.sweep().claimed == 0
        clock.advance(db, HOUR + 1)
        assert engine.sweeper.sweep().deleted == 1 and not (root / item.key).exists()
    finally:
        engine.close()
