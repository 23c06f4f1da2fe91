"""Registering files against copying them: `register --manifest` of 20,000 1 KiB files (each copied into
the store at its sharded key, hashed, made durable, catalogued) against `cp -r` of the same files already
laid out the same way, in the same run.

    make bench   (or: .venv/bin/pytest tests/bench/bench_register_files.py -s -o addopts=-ra -o python_files='bench_*.py')

Target (issue #11): at least 0.5x cp's files/s. cp only copies; registration also hashes every file,
writes it under a temporary name, syncs the volume so no blob is ever half there under its key, and
inserts the rows; both run as processes and include their start. The copies land on the same disk.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics

import pytest
from sqlalchemy import text

from tests.bench.support import CLI, cli_env, machine, remove_tree, run, table
from worker.store.keys import key_for_id

pytestmark = pytest.mark.postgres

FILES = int(os.environ.get("BENCH_REGISTER_FILES", "20000"))
ROUNDS = 3
TARGET_RATIO = 0.5


def test_registering_files_keeps_half_the_pace_of_copying_them(pg_database, tmp_path):
    """Print files/s of `register --manifest` (file lines) and of `cp -r` over ROUNDS alternating rounds."""
    uploads, staged = tmp_path / "uploads", tmp_path / "staged"
    content = b"x" * 1024
    for number in range(FILES):
        name = f"f-{number}"
        (uploads / name[-1]).mkdir(parents=True, exist_ok=True)
        (uploads / name[-1] / name).write_bytes(content)
        (staged / key_for_id(name)).parent.mkdir(parents=True, exist_ok=True)
        (staged / key_for_id(name)).write_bytes(content)
    manifest = tmp_path / "files.jsonl"
    manifest.write_text("".join(json.dumps({"org": "bench", "id": f"f-{n}", "file": str(uploads / str(n)[-1] / f"f-{n}")}) + "\n"
                                for n in range(FILES)))
    os.sync()
    with pg_database.engine.begin() as connection:
        connection.execute(text("INSERT INTO organizations (id, retention_seconds) VALUES ('bench', 7776000)"))
    media, copied = tmp_path / "media", tmp_path / "copied"
    env = cli_env(pg_database.url, media.as_uri(), tmp_path / "data")
    copies, registrations = [], []
    for _ in range(ROUNDS):
        cp = run(["cp", "-r", str(staged), str(copied)])
        assert cp.code == 0
        copies.append(cp.seconds)
        remove_tree(copied)

        registered = run([CLI, "register", "--manifest", str(manifest), "--files-root", str(uploads), "--json"], env=env)
        assert registered.code == 0, registered.stderr[-2000:]
        assert registered.json["imported"] == FILES
        registrations.append(registered.seconds)
        with pg_database.engine.begin() as connection:
            connection.execute(text("DELETE FROM media_items"))
            connection.execute(text("DELETE FROM audit_events"))
        shutil.rmtree(media)
        os.sync()
    cp_rate, register_rate = FILES / statistics.median(copies), FILES / statistics.median(registrations)
    table(f"register --manifest of {FILES:,} 1 KiB files against cp -r of the same tree, PostgreSQL, filesystem store, "
          f"median of {ROUNDS} alternating rounds; {machine()}",
          ("", "files/s", "seconds (rounds)", "ratio"),
          [("`cp -r` of the files, laid out as the store lays them (baseline)", f"{cp_rate:,.0f}",
            ", ".join(f"{s:.2f}" for s in copies), "1.00"),
           ("`media-retention register --manifest`", f"{register_rate:,.0f}", ", ".join(f"{s:.2f}" for s in registrations),
            f"**{register_rate / cp_rate:.2f}** (target >= {TARGET_RATIO})")])
    assert register_rate / cp_rate >= TARGET_RATIO
