"""Fleet scale-out on a latency-bound store: 1, 2, 4 and 8 worker processes draining a backlog from an S3
endpoint that adds 50 ms to every request, against one process in the same run.

    make bench   (or: .venv/bin/pytest tests/bench/bench_fleet_scaleout.py -s -o addopts=-ra -o python_files='bench_*.py')

Target (issue #11): N processes delete at least 0.9 x N times what one does, for N up to 8.

The store is moto's S3 server in a process of its own, its WSGI app behind a middleware that sleeps
50 ms before each request (a store across a network, or a slow one). To make one process bound by that
latency rather than by this 2-core machine's CPU (moto, PostgreSQL and the workers share it), each
process keeps two single-key DeleteObject requests in flight (`S3_DELETE_MODE=single`,
`DELETE_THREADS=2`): 40 items/s a process, so even eight processes leave the CPU mostly idle. The fleet
is real: `celery -A worker.app worker --concurrency N` and beat; beat's scheduled sweep fans the backlog
out to drains (`SWEEP_FANOUT_MAX = N - 1`), the expiry watch is off so only the drains share the work.
Timed by the database clock, from the first claim to the last deletion.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from tests.bench.support import fill_catalog, machine, table
from tests.conftest import free_port
from tests.fleet import RedisServer
from tests.s3 import MOTO_ACCOUNT
from worker.store.keys import key_for_id

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PROCESSES = (1, 2, 4, 8)
LATENCY_S = 0.05
PER_PROCESS_ITEMS = int(os.environ.get("BENCH_SCALEOUT_ITEMS", "800"))  # ~20 s of one process's work
BATCH = 100
TARGET_EFFICIENCY = 0.9
BUCKET = "scaleout"


def _serve_slow_moto(port: int, latency: float, commands) -> None:
    """Child process: moto's S3 app on `port`, each request held `latency` s first; seeds objects on request."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = DomainDispatcherApplication(create_backend_app)

    def slow(environ, start_response):
        time.sleep(latency)
        return app(environ, start_response)

    server = make_server("127.0.0.1", port, slow, threaded=True)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    commands.send("ready")
    while (command := commands.recv()) is not None:
        bucket, names = command
        backend = s3_backends[MOTO_ACCOUNT]["aws"]
        if bucket not in backend.buckets:
            backend.create_bucket(bucket, "us-east-1")
        for name in names:
            backend.put_object(bucket, name, b"x" * 10)
        commands.send(len(names))
    server.shutdown()


def drain_rate(processes: int, db, env: dict, seed, tmp_path) -> float:
    count = PER_PROCESS_ITEMS * processes
    prefix = f"p{processes}"
    seed([f"media/{key_for_id(f'{prefix}-{number}')}" for number in range(count)])
    fill_catalog(db, count, prefix=prefix, expired=count)
    env = {**env, "MEDIA_RETENTION_SWEEP_FANOUT_MAX": str(processes - 1)}
    logs = [open(tmp_path / f"{prefix}-{name}.log", "w") for name in ("worker", "beat")]
    celery = [sys.executable, "-m", "celery", "-A", "worker.app"]
    fleet = [subprocess.Popen([*celery, "worker", f"--concurrency={processes}", "--loglevel=WARNING", f"--hostname={prefix}@%h"],
                              env=env, cwd=tmp_path, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)]
    time.sleep(3 + processes * 0.5)  # the pool up before beat sends the first sweep
    fleet.append(subprocess.Popen([*celery, "beat", "--loglevel=WARNING", f"--schedule={tmp_path / (prefix + '.schedule')}"],
                                  env=env, cwd=tmp_path, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + 600
        while True:
            with db.engine.connect() as connection:
                left = connection.execute(text("SELECT count(*) FROM media_items WHERE id LIKE :p AND state <> 'deleted'"),
                                          {"p": f"{prefix}-%"}).scalar()
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} items left after 600 s with {processes} processes"
            time.sleep(0.5)
        with db.engine.connect() as connection:
            seconds = connection.execute(text("SELECT extract(epoch FROM max(deleted_at) - min(claimed_at)) FROM media_items "
                                              "WHERE id LIKE :p"), {"p": f"{prefix}-%"}).scalar()
    finally:
        for process in fleet:
            os.killpg(process.pid, signal.SIGTERM)
        for process in fleet:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    return count / float(seconds)


def test_n_worker_processes_delete_n_times_as_fast_from_a_latency_bound_store(pg_database, tmp_path):
    """Print items/s for 1, 2, 4 and 8 worker processes and each one's efficiency against N x one process."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    port = free_port()
    moto = context.Process(target=_serve_slow_moto, args=(port, LATENCY_S, theirs), daemon=True)
    moto.start()
    assert ours.recv() == "ready"

    def seed(names: list[str]) -> None:
        ours.send((BUCKET, names))
        assert ours.recv() == len(names)

    redis = RedisServer(tmp_path)
    redis.start()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MEDIA_RETENTION_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               MEDIA_RETENTION_DATABASE_URL=pg_database.url, MEDIA_RETENTION_BROKER_URL=redis.url,
               MEDIA_RETENTION_STORAGE_URL=f"s3://{BUCKET}/media", MEDIA_RETENTION_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
               MEDIA_RETENTION_S3_ADDRESSING_STYLE="path", MEDIA_RETENTION_S3_DELETE_MODE="single",
               MEDIA_RETENTION_DELETE_THREADS="2", MEDIA_RETENTION_SWEEP_BATCH_SIZE=str(BATCH),
               MEDIA_RETENTION_SWEEP_INTERVAL="5s", MEDIA_RETENTION_WATCH_INTERVAL="off",
               MEDIA_RETENTION_DATA_DIR=str(tmp_path / "data"), MEDIA_RETENTION_LOG_FORMAT="json")
    try:
        rates = {processes: drain_rate(processes, pg_database, env, seed, tmp_path) for processes in PROCESSES}
    finally:
        redis.stop()
        ours.send(None)
        moto.join(10)
    one = rates[1]
    rows = [(f"{n} process{'es' if n > 1 else ''}{' (baseline)' if n == 1 else ''}", f"{rates[n]:,.0f}",
             f"{rates[n] / one:.2f}", f"**{rates[n] / (n * one):.2f}**") for n in PROCESSES]
    table(f"fleet scale-out, S3 (moto) with {LATENCY_S * 1000:.0f} ms added per request, 2 single-key deletes in flight "
          f"a process, {PER_PROCESS_ITEMS:,} items a process; {machine()}",
          ("worker processes", "items/s", "speed-up", f"efficiency (target >= {TARGET_EFFICIENCY})"), rows)
    assert all(rates[n] / (n * one) >= TARGET_EFFICIENCY for n in PROCESSES)
