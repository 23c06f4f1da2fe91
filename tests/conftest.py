"""Shared fixtures.

Servers come from the environment (defaults match the dev machine and CI). A missing server skips
its tests with a loud reason on a laptop, and fails them under CI=true: CI must never pass by skipping.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from config.settings import Settings, get_settings, load_settings
from worker import schema
from worker.catalog import Catalog
from worker.engine import Engine, build
from worker.cli import main
from worker.db import Database
from worker.store.fs import FilesystemStore

# Fixture modules shared across the test folders, loaded as plugins so that no test module imports a
# fixture by hand: a private Redis and a Celery fleet, moto's S3 server, a webhook receiver.
pytest_plugins = ("tests.fleet", "tests.s3", "tests.receiver")

PG_URL = os.environ.get("MEDIA_RETENTION_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MEDIA_RETENTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# -- the fault-injection suite's seed and summary, across pytest-xdist's workers ----------------------------
#
# tests/faults draws its kill times from one seed a run and prints a summary of what it injected. Under
# `pytest -n` its tests run in worker processes while the summary is printed by the controller, which
# never imports tests/faults/conftest.py: so the seed is chosen here, in the controller (or the one
# process of a serial run), and handed to each worker; the rows each test records come back on its
# report (`user_properties`, which xdist carries over) and are printed from here.

FAULT_SEED: int = 0
FAULT_SUMMARY_PROPERTY = "fault_summary"
_fault_rows: list[dict] = []


def pytest_configure(config) -> None:
    global FAULT_SEED
    given = getattr(config, "workerinput", {}).get("fault_seed")
    if given is None:
        given = os.environ.get("MEDIA_RETENTION_TEST_FAULT_SEED") or random.SystemRandom().randrange(2**32)
    FAULT_SEED = int(given)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """(pytest-xdist, in the controller) every worker gets the controller's seed."""
    node.workerinput["fault_seed"] = FAULT_SEED


def pytest_runtest_logreport(report) -> None:
    if report.when == "teardown":
        _fault_rows.extend(value for name, value in report.user_properties if name == FAULT_SUMMARY_PROPERTY)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _fault_rows:
        return
    terminalreporter.section(f"fault injection (seed {FAULT_SEED})")
    for row in _fault_rows:
        terminalreporter.write_line("faults: " + json.dumps(row, sort_keys=False))


# -- the slowest tests start first ---------------------------------------------------------------------------
#
# Under pytest-xdist the run ends when its last worker does. A test of two minutes collected late starts
# late and ends the run alone; marked `critical_path(seconds=N)` (N: its duration in a parallel run, roughly)
# it is moved to the front, longest first, and xdist's round-robin hands the longest ones to different
# workers while the short tests fill in around them.


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items) -> None:
    def expected_seconds(item) -> float:
        marker = item.get_closest_marker("critical_path")
        return marker.kwargs["seconds"] if marker else 0.0

    items.sort(key=expected_seconds, reverse=True)  # stable: the rest keep their order


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def service_unavailable(what: str, url: str, error: Exception) -> None:
    message = f"{what} is not reachable at {url} ({type(error).__name__}: {error}); set the URL in the environment"
    if ON_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {message}")


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The PostgreSQL URL after checking the server answers."""
    probe = Database(PG_URL)
    try:
        with probe.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no server"
        service_unavailable("PostgreSQL", PG_URL, exc)
    finally:
        probe.dispose()
    return PG_URL


def _schema_url(url: str, schema_name: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema_name}"


@pytest.fixture
def pg_database(pg_server_url: str) -> Iterator[Database]:
    """A migrated catalog in a schema of its own, so parallel runs and tests never see each other."""
    name = f"t_{secrets.token_hex(6)}"
    admin = Database(pg_server_url)
    with admin.engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {name}"))
    db = Database(_schema_url(pg_server_url, name))
    schema.upgrade(db)
    try:
        yield db
    finally:
        db.dispose()
        with admin.engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    schema.upgrade(db)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request) -> Database:
    """The catalog database; tests using it run once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue({"sqlite": "sqlite_database", "postgresql": "pg_database"}[request.param])


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    return root


@pytest.fixture
def settings(tmp_path: Path, database: Database, media_root: Path) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database.url,
        storage_url=media_root.as_uri(),
        sweep_batch_size=50,
        delete_threads=4,
    )


@pytest.fixture
def engine(database: Database, media_root: Path, settings: Settings) -> Iterator[Engine]:
    """The engine on this test's database and a filesystem store in its media root, bound to each other
    (both empty, as a new deployment's are)."""
    engine = build(settings, database=database, store=FilesystemStore(media_root, delete_threads=4))
    engine.binding.ensure()
    yield engine
    engine.store.close()


@pytest.fixture
def catalog(engine: Engine) -> Catalog:
    return engine.catalog


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        service_unavailable("Redis", REDIS_URL, exc)
    finally:
        client.close()
    return REDIS_URL


# -- the command line, in this process -------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty data dir holding every embedded default (SQLite catalog, media, broker)."""
    directory = tmp_path / "data"
    for name in list(os.environ):
        if name.startswith("MEDIA_RETENTION_") and not name.startswith("MEDIA_RETENTION_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MEDIA_RETENTION_DATA_DIR", str(directory))
    get_settings.cache_clear()
    yield directory
    get_settings.cache_clear()


@pytest.fixture
def cli(data_dir, capsys):
    """Run `media-retention ARGS` in this process; returns exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
