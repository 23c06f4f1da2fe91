import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from worker.db import Database, db_clock, db_now


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'clock.sqlite3'}")
    yield database
    database.dispose()


def test_database_clock_offsets_are_not_confused_by_the_statement_cache(db):
    """db_now(), db_now(-3600) and db_now(+7200) in one engine each keep their own offset."""
    with db.transaction() as session:
        now, hour_ago, later = (session.scalar(select(db_now(offset))) for offset in (0, -3600, 7200))
    assert timedelta(minutes=59) < now - hour_ago < timedelta(minutes=61)
    assert timedelta(minutes=119) < later - now < timedelta(minutes=121)


def test_database_clock_is_utc_with_microsecond_text_on_sqlite(db):
    """The SQLite clock expression reads back as an aware UTC datetime."""
    with db.transaction() as session:
        value = session.scalar(select(db_now()))
    assert value.utcoffset() == timedelta(0)


def test_the_wall_clock_moves_on_within_one_transaction(db):
    """db_clock() read twice in one transaction, 20 ms apart, gives the later time the second time."""
    with db.transaction() as session:
        first = session.scalar(select(db_clock()))
        time.sleep(0.02)
        second = session.scalar(select(db_clock()))
    assert first.utcoffset() == timedelta(0)
    assert timedelta(milliseconds=15) < second - first < timedelta(seconds=5)
