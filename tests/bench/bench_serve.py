"""`media-retention serve` under load: lookup latency (p50, p99) and throughput, PostgreSQL catalog.

    .venv/bin/pytest tests/bench/bench_serve.py -s -p no:cacheprovider -o addopts=-ra -o python_files='bench_*.py'

One real server process (uvicorn, one process) on a PostgreSQL schema of its own holding 10,000
items of one org, 1,000 of them deleted, logging at INFO (one access-log line a request) as in
production. The load generator is `wrk` when it is installed (Debian package `wrk`: a C client that
leaves the server most of the CPU), else Python threads with keep-alive sessions, which take CPU from
the server on the same machine, so their figures are a floor. Each request looks up a random ID with
a valid key: 90 % answer 200, 10 % answer 404 gone.
"""

from __future__ import annotations

import random
import re
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from tests.serve_support import start_server, stop_server
from worker.catalog.apikeys import ApiKeys

pytestmark = pytest.mark.postgres

ITEMS = 10_000
CONCURRENCY = 16
DURATION_S = 15.0
WARMUP_S = 2.0


def fill(db) -> str:
    with db.engine.begin() as connection:
        connection.execute(text("INSERT INTO organizations (id, retention_seconds) VALUES ('acme', 2592000)"))
        connection.execute(text(
            "INSERT INTO media_items (id, org_id, storage_key, size_bytes, mime_type, created_at, expires_at, state, deleted_at, deletion_reason) "
            "SELECT 'm' || n, 'acme', 'k/' || n, 10, 'image/jpeg', now(), now() + interval '30 days', "
            "CASE WHEN n % 10 = 0 THEN 'deleted' ELSE 'active' END, CASE WHEN n % 10 = 0 THEN now() END, "
            "CASE WHEN n % 10 = 0 THEN 'retention' END FROM generate_series(1, :count) AS n"), {"count": ITEMS})
    return ApiKeys(db).create("acme", actor="bench").token


def python_load(url: str, token: str) -> tuple[list[float], int, float]:
    """(latencies of the measured window, requests answered, window seconds) from CONCURRENCY threads."""
    latencies: list[list[float]] = [[] for _ in range(CONCURRENCY)]
    errors = [0]
    start = time.perf_counter()
    measure_from, stop_at = start + WARMUP_S, start + WARMUP_S + DURATION_S

    def client(number: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        chooser = random.Random(number)
        while (now := time.perf_counter()) < stop_at:
            response = session.get(f"{url}/v1/media/m{chooser.randint(1, ITEMS)}", timeout=10)
            done = time.perf_counter()
            if response.status_code not in (200, 404):
                errors[0] += 1
            if now >= measure_from:
                latencies[number].append(done - now)
        session.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors[0] == 0
    flat = [latency for part in latencies for latency in part]
    return flat, len(flat), DURATION_S


WRK_SCRIPT = """
math.randomseed(42)
request = function()
  return wrk.format("GET", "/v1/media/m" .. math.random(1, %d), {["Authorization"] = "Bearer %s"})
end
"""


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk_load(url: str, token: str, workdir: Path) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) from wrk with CONCURRENCY connections on 2 threads."""
    script = workdir / "lookup.lua"
    script.write_text(WRK_SCRIPT % (ITEMS, token))
    subprocess.run(["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{WARMUP_S:.0f}s", "-s", str(script), url], check=True,
                   capture_output=True)
    out = subprocess.run(["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{DURATION_S:.0f}s", "--latency", "-s", str(script), url],
                         check=True, capture_output=True, text=True).stdout
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)$", out, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)$", out, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    assert p50 and p99 and rate, out
    return _ms(*p50.groups()), _ms(*p99.groups()), float(rate.group(1))


def test_lookup_latency_and_throughput_under_local_load(pg_database, tmp_path: Path):
    """Report p50/p99 lookup latency and requests per second of one serve process."""
    token = fill(pg_database)
    (tmp_path / "media").mkdir()
    server = start_server({"MEDIA_RETENTION_DATABASE_URL": pg_database.url,
                           "MEDIA_RETENTION_STORAGE_URL": (tmp_path / "media").as_uri()}, tmp_path)
    try:
        if shutil.which("wrk"):
            p50, p99, rate = wrk_load(server.url, token, tmp_path)
            print(f"\nserve lookups (wrk, {CONCURRENCY} connections, {DURATION_S:.0f} s, {ITEMS} items): "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {rate:.0f} req/s")
        latencies, answered, seconds = python_load(server.url, token)
        quantiles = statistics.quantiles(latencies, n=100)
        p50, p99 = quantiles[49] * 1000, quantiles[98] * 1000
        print(f"\nserve lookups (python threads, {CONCURRENCY} connections, {seconds:.0f} s, {ITEMS} items): "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {answered / seconds:.0f} req/s")
        assert answered > 0
    finally:
        stop_server(server)
