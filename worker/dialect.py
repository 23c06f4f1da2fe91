"""What differs between PostgreSQL and SQLite, in one place: row locks, id lists, the shape of an
UPDATE of picked rows, bulk inserts, commit durability. Everything else is written once for both
(the statements on `media_items` in `worker/items/`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import Float, String, any_, bindparam, func, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError


@dataclass(frozen=True)
class Dialect:
    name: str  # "postgresql" or "sqlite"

    @property
    def postgresql(self) -> bool:
        return self.name == "postgresql"

    def row_lock(self, *, skip_locked: bool) -> str:
        """The claim's row lock: PostgreSQL locks the picked rows (skipping locked ones for sweeps);
        SQLite's single writer needs none."""
        if not self.postgresql:
            return ""
        return "FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE"

    def update_alias(self, alias: str) -> str:
        """How an UPDATE names its own row's columns: `m.` on PostgreSQL, bare on SQLite (no UPDATE alias)."""
        return f"{alias}." if self.postgresql else ""

    def update_target(self, table: str, alias: str) -> str:
        """The table an UPDATE names: `table AS alias` on PostgreSQL, bare on SQLite."""
        return f"{table} AS {alias}" if self.postgresql else table

    def update_picked(self, alias: str, picked: str) -> str:
        """An UPDATE's restriction to the rows whose ids the SELECT `picked` returns: joined as
        `FROM (picked) AS picked` on PostgreSQL, `WHERE id IN (picked)` on SQLite (no UPDATE alias)."""
        if self.postgresql:
            return f"FROM (\n    {picked}\n) AS picked\nWHERE {alias}.id = picked.id"
        return f"WHERE id IN (\n    {picked}\n)"

    def compile(self, expression) -> str:
        """`expression` (one without parameters, such as `db_now()`) as SQL text for this database, for
        statements written as text."""
        dialect = postgresql.dialect() if self.postgresql else sqlite.dialect()
        return str(expression.compile(dialect=dialect))

    def id_in(self, column, ids: list[str]):
        """`column IN ids`. On PostgreSQL as `= ANY(array)`: one parameter instead of a thousand
        placeholders to render and parse, which was most of a finalize's client-side cost."""
        if self.postgresql:
            return column == any_(bindparam("ids", ids, type_=postgresql.ARRAY(String)))
        return column.in_(ids)

    def insert_rows(self, session, table, rows: list[dict]) -> None:
        """Insert `rows` (dicts of one shape) into `table` in the session's transaction. On PostgreSQL by
        COPY: one stream instead of a statement per thousand rows and a bound parameter per value, which
        made the client's side of a large import slower than the database's."""
        if not rows:
            return
        if not self.postgresql:
            session.execute(table.insert(), rows)
            return
        columns = list(rows[0])
        statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
        driver = session.connection().connection.driver_connection
        try:
            with driver.cursor() as cursor, cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row([row[column] for column in columns])
        except driver.IntegrityError as exc:
            # The driver's own error (the COPY bypasses SQLAlchemy): raised as SQLAlchemy's, like any
            # other statement's, so callers catch one IntegrityError whichever way rows went in.
            raise IntegrityError(statement, None, exc) from exc

    def rows_of(self, columns: list[str], rows: list[tuple]) -> tuple[str, dict]:
        """A FROM item that yields `rows` (tuples of text, in order) under the names `columns`, and its
        parameters: a whole batch as one or two parameters instead of a placeholder per value, which a
        multi-row VALUES of thousands of rows costs the client to build (PostgreSQL: unnest of one array a
        column; SQLite: json_each of one JSON array of rows)."""
        if self.postgresql:
            arrays = ", ".join(f"CAST(:{name} AS text[])" for name in columns)
            return (f"unnest({arrays}) AS rows ({', '.join(columns)})",
                    {name: [row[index] for row in rows] for index, name in enumerate(columns)})
        picked = ", ".join(f"json_extract(value, '$[{index}]') AS {name}" for index, name in enumerate(columns))
        return f"(SELECT {picked} FROM json_each(:rows)) AS rows", {"rows": json.dumps(rows)}

    def seconds_between(self, later, earlier):
        """`later - earlier` in seconds as a float, computed by the database: a sweep reads it for every
        item it deletes, and a number costs the client nothing where two timestamps cost a conversion each."""
        if self.postgresql:
            return func.extract("epoch", later - earlier).cast(Float)
        return ((func.julianday(later) - func.julianday(earlier)) * 86400.0).cast(Float)

    def mime_essence(self, column):
        """`type/subtype` of a MIME type column, lowercased, its parameters dropped: the SQL twin of
        `worker.policy.mime_essence` (a test holds the two to the same answers)."""
        if self.postgresql:
            head = func.split_part(column, ";", 1)
        else:
            head = func.substr(column, 1, func.instr(column.concat(";"), ";") - 1)
        return func.lower(func.rtrim(head, " "))

    def share_locked(self, statement):
        """`statement` under a share lock on PostgreSQL (SQLite's write transaction already excludes writers)."""
        return statement.with_for_update(read=True) if self.postgresql else statement

    def relax_commit(self, session) -> None:
        """Skip waiting for the WAL flush in this transaction (PostgreSQL only). Safe for finalizes
        only: a finalize lost in a crash leaves rows `deleting`, re-claimed after the lease."""
        if self.postgresql:
            session.execute(text("SET LOCAL synchronous_commit = off"))
