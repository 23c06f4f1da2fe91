"""Engine and transactions, plus the clock expressions every expiry decision is made with.

The cutoff of a sweep is always the *database's* clock (`db_now()`), never a worker's: workers on
many machines disagree about the time, the database is one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timezone

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import ColumnElement, FunctionElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator

from worker.dialect import Dialect

# Long enough to ride out a sweep batch holding SQLite's write lock, short enough to surface a hang.
SQLITE_BUSY_TIMEOUT_MS = 30_000

# SQLite keeps timestamps as text in SQLAlchemy's 'YYYY-MM-DD HH:MM:SS.ffffff' form (UTC); every
# expression below produces exactly that form, so string comparison is time comparison.
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now'{modifier}) || '000'"


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in Python; `timestamptz` on PostgreSQL, UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; attach a timezone")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class db_now(FunctionElement):
    """The database's current time, optionally plus a whole number of seconds."""

    type = UTCDateTime()
    inherit_cache = True
    # The offset is part of the SQL text, so it must be part of the statement cache key too.
    _traverse_internals = [*FunctionElement._traverse_internals, ("plus_seconds", InternalTraversal.dp_plain_obj)]

    def __init__(self, plus_seconds: int = 0):
        self.plus_seconds = int(plus_seconds)
        super().__init__()


@compiles(db_now)
def _db_now_default(element, compiler, **kw):
    if element.plus_seconds:
        return f"(now() + make_interval(secs => {element.plus_seconds}))"
    return "now()"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element, compiler, **kw):
    modifier = f", '{element.plus_seconds:+d} seconds'" if element.plus_seconds else ""
    return _SQLITE_NOW.format(modifier=modifier)


class db_clock(FunctionElement):
    """The database's wall clock at the moment the statement runs, not when its transaction began: the
    time a change took effect, stamped after the statements that waited for row locks have run."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(db_clock)
def _db_clock_default(element, compiler, **kw):
    return "clock_timestamp()"


@compiles(db_clock, "sqlite")
def _db_clock_sqlite(element, compiler, **kw):
    # SQLite's 'now' is read afresh by each statement already.
    return _SQLITE_NOW.format(modifier="")


class plus_seconds(FunctionElement):
    """`timestamp_column + seconds` where `seconds` is an integer column or expression, exact on both dialects."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, timestamp: ColumnElement, seconds: ColumnElement):
        super().__init__(timestamp, seconds)


@compiles(plus_seconds)
def _plus_seconds_default(element, compiler, **kw):
    timestamp, seconds = (compiler.process(arg, **kw) for arg in element.clauses)
    return f"({timestamp} + make_interval(secs => {seconds}))"


@compiles(plus_seconds, "sqlite")
def _plus_seconds_sqlite(element, compiler, **kw):
    timestamp, seconds = (compiler.process(arg, **kw) for arg in element.clauses)
    # Whole seconds never change the fraction, so keep the stored '.ffffff' as it is.
    return (
        f"(strftime('%Y-%m-%d %H:%M:%S', {timestamp}, ({seconds}) || ' seconds') || substr({timestamp}, 20))"
    )


def normalize_url(url: str) -> str:
    """Accept `postgresql://` and `postgres://` and pick psycopg 3, the one driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(connection):
            # Take the write lock up front: a deferred transaction that reads then writes can fail
            # with SQLITE_BUSY when another process wrote in between, whatever the busy timeout.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


class Database:
    """An engine and its session factory; `transaction()` is the only way code writes."""

    def __init__(self, url: str, **engine_kwargs):
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def sql(self) -> Dialect:
        """What differs between the two databases (worker/dialect.py), for this one."""
        return Dialect(self.dialect)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one short transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
