"""One read statement awaited from an event loop, on connections of its own: the HTTP lookup's
(`media-retention serve`, worker/catalog/keyed_lookup.py).

PostgreSQL: a few psycopg `AsyncConnection`s in autocommit, the statement prepared on each as it connects,
so a lookup is one round trip (Bind, Execute, Sync) with no BEGIN, no COMMIT and no checkout ping, and while
one lookup waits for the database the event loop answers others. (SQLAlchemy's pool pings a connection at
every checkout, `pool_pre_ping`: one more round trip a request. Here a connection is dropped when it fails
instead, and a lookup that failed on a connection that had been idle is run once more on a new one: a
database restart breaks every idle connection at once, and the first requests after it should not all
answer 503.)

SQLite, the embedded default: the statement on the engine's own pool in a worker thread. There is no server
and no round trip to save; a read in autocommit (WAL) takes no write lock.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import sqlalchemy.exc
import structlog

from worker.db import Database

log = structlog.get_logger("worker.db")

# Connections a serve process keeps for lookups. A lookup holds one for a round trip (~0.2 ms) while the
# process spends ~0.3 ms of CPU on the HTTP around it, so two are busy at most; four leave room for a slow
# statement without making a request wait for a connection.
POOL_SIZE = 4
# How long a lookup waits for a connection to come free, to connect, or for its statement, before it answers
# 503: a healthy database answers in milliseconds, and a caller told to retry beats one left hanging.
TIMEOUT_S = 5.0


class DatabaseUnavailable(Exception):
    """The catalog database did not answer: refused, cut, timed out, or no connection came free in time.
    The message names what happened, never the connection's address or credentials."""


class Statement(Protocol):
    """One statement, run with parameters, answering its first row."""

    async def fetchone(self, params: dict) -> tuple | None: ...

    async def close(self) -> None: ...


class PostgresStatement:
    """The statement on up to `size` psycopg AsyncConnections of its own (autocommit, prepared)."""

    def __init__(self, connect_params: dict, sql: str, prepare_params: dict, *, size: int = POOL_SIZE,
                 timeout_s: float = TIMEOUT_S):
        import psycopg

        self._psycopg = psycopg
        self._connect_params = {"connect_timeout": max(2, int(timeout_s)), **connect_params}
        self.sql = sql
        # Run once on each new connection: psycopg prepares the statement there and then, so no lookup pays the
        # extra round trip of a first (preparing) run. Same Python types as a lookup's, the same prepared statement.
        self._prepare_params = prepare_params
        self.timeout_s = timeout_s
        self._idle: list = []
        self._slots = asyncio.Semaphore(size)

    async def fetchone(self, params: dict) -> tuple | None:
        # A free slot is taken at once (the common case, without arming a timer); only when every connection is
        # busy does a lookup wait for one, for at most the timeout.
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise DatabaseUnavailable("no catalog connection came free in time") from None
        else:
            await self._slots.acquire()
        try:
            # The most recently used first: under a light load one connection stays warm.
            connection = self._idle.pop() if self._idle else None
            try:
                return await self._run(connection, params)
            except self._psycopg.OperationalError as exc:
                if connection is None or not (connection.broken or connection.closed):
                    raise DatabaseUnavailable(f"the statement failed ({type(exc).__name__})") from None
            # A connection that had been idle was found broken (a database restart, a failover, an idle timeout
            # on the way): the statement only reads, so it is run once more on a new connection.
            log.info("db.lookup_connection_replaced")
            try:
                return await self._run(None, params)
            except self._psycopg.OperationalError as exc:
                raise DatabaseUnavailable(f"the statement failed ({type(exc).__name__})") from None
        finally:
            self._slots.release()

    async def _run(self, connection, params: dict) -> tuple | None:
        """The statement on `connection` (a new one if None), which goes back to the idle list only when it
        answered: any failure, a timeout or a cancellation drops it, whatever state it was left in."""
        try:
            async with asyncio.timeout(self.timeout_s):
                if connection is None:
                    connection = await self._connect()
                cursor = await connection.execute(self.sql, params, prepare=True, binary=True)
                row = await cursor.fetchone()
        except TimeoutError:
            await _close(connection)
            raise DatabaseUnavailable(f"the catalog database did not answer within {self.timeout_s:g} s") from None
        except BaseException:
            await _close(connection)
            raise
        self._idle.append(connection)
        return row

    async def _connect(self):
        connection = await self._psycopg.AsyncConnection.connect(autocommit=True, **self._connect_params)
        try:
            await (await connection.execute(self.sql, self._prepare_params, prepare=True, binary=True)).fetchall()
        except BaseException:
            await _close(connection)
            raise
        return connection

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await _close(connection)


async def _close(connection) -> None:
    if connection is None:
        return
    try:
        await connection.close()
    except Exception:  # noqa: BLE001 - a connection being dropped may be broken already; nothing to report
        pass


class ThreadedStatement:
    """The statement on a SQLAlchemy engine's own pool, each run in a worker thread (SQLite's path; any
    database's, for tests that watch the engine's connections)."""

    def __init__(self, db: Database, sql: str):
        self.db = db
        self.sql = sql
        self._operational = db.engine.dialect.loaded_dbapi.OperationalError

    async def fetchone(self, params: dict) -> tuple | None:
        return await asyncio.to_thread(self.fetchone_now, params)

    def fetchone_now(self, params: dict) -> tuple | None:
        try:
            connection = self.db.engine.raw_connection()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError) as exc:
            raise DatabaseUnavailable(f"no connection to the catalog database ({type(exc).__name__})") from None
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self.sql, params)
                return cursor.fetchone()
            finally:
                cursor.close()
        except self._operational as exc:
            raise DatabaseUnavailable(f"the statement failed ({type(exc).__name__})") from None
        finally:
            connection.close()

    async def close(self) -> None:
        pass


def statement_on(db: Database, sql: str, prepare_params: dict) -> Statement:
    """`sql` run the fastest way `db` allows: on PostgreSQL its own prepared async connections, made from the
    same URL as the engine's; elsewhere the engine's pool in a thread."""
    if db.dialect != "postgresql":
        return ThreadedStatement(db, sql)
    _args, params = db.engine.dialect.create_connect_args(db.engine.url)
    params.pop("context", None)  # SQLAlchemy's adapters for its own connections; psycopg's defaults here
    return PostgresStatement(params, sql, prepare_params)
