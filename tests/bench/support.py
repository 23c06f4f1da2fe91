"""What the benchmarks share: a large catalog made by the database itself, trees of real files, the
command line run as an operator runs it (a process, timed, its peak memory read from the kernel),
and the table each benchmark prints.

Benchmarks run on demand (`make bench`), never in the default suite; each measures its baseline in
the same run and prints the figures docs/performance.md quotes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.factories import fill_catalog, vacuum_analyze  # noqa: F401 - re-exported for the benchmarks

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("media-retention"))


def machine() -> str:
    """One line naming the machine the figures come from."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({model}), load {load:.2f} at start"


def write_tree(root: Path, keys: list[str], size: int = 1024) -> None:
    """A file of `size` bytes at each key under `root`, then everything on disk (so the timed part
    that follows does not pay for this write-back)."""
    content = b"x" * size
    made: set[Path] = set()
    for key in keys:
        path = root / key
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        with open(path, "wb") as handle:
            handle.write(content)
    os.sync()


def remove_tree(root: Path) -> None:
    """Remove everything under `root` but a media root's binding marker (a store stays bound between rounds)."""
    from worker.store import MARKER_NAME

    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            elif child.name != MARKER_NAME:
                child.unlink(missing_ok=True)
    os.sync()


@dataclass
class Run:
    seconds: float
    max_rss_bytes: int
    code: int
    stdout: str
    stderr: str
    cpu_seconds: float = 0.0  # user + system CPU of the process itself (rusage)
    system_seconds: float = 0.0  # of which in the kernel (system calls: unlinks, I/O)

    @property
    def json(self):
        return json.loads(self.stdout)

    def events(self, name: str) -> list[dict]:
        """The JSON log events called `name` this run wrote to stderr."""
        found = []
        for line in self.stderr.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found


def run(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> Run:
    """Run a command to completion: its wall time and the peak resident set size of that very process,
    from wait4's rusage (the kernel's own high-water mark, not a sample)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output: dict[str, str] = {}
    readers = [threading.Thread(target=lambda name=name, stream=stream: output.__setitem__(name, stream.read()))
               for name, stream in (("out", process.stdout), ("err", process.stderr))]
    for reader in readers:
        reader.start()
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    for reader in readers:
        reader.join()
    process.stdout.close()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    return Run(seconds, usage.ru_maxrss * 1024, process.returncode, output["out"], output["err"],
               usage.ru_utime + usage.ru_stime, usage.ru_stime)


def postgres_cpu_seconds() -> float:
    """User + system CPU every PostgreSQL process on this machine has used so far (from /proc), with that of its
    exited children (a backend's CPU passes to the postmaster's cutime/cstime when it exits): read before and after
    a run, the database's share of it."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            if "postgres" not in fields[0]:
                continue
            values = fields[1].split()
            total += sum(int(value) for value in values[11:15])  # utime, stime, cutime, cstime (fields 14 to 17)
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


def cli_env(database_url: str, storage_url: str, data_dir: Path, **settings: str) -> dict:
    """The environment an operator's shell would give `media-retention`: the settings, nothing of ours. A
    filesystem store is made and bound to the catalog first, as a deployment's is (its rows, filled by SQL,
    have no blobs yet, which a real binding rightly refuses)."""
    if storage_url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        from tests.factories import mark_store
        from worker.db import Database
        from worker.store.fs import FilesystemStore

        root = Path(unquote(urlparse(storage_url).path))
        root.mkdir(parents=True, exist_ok=True)
        database = Database(database_url)
        try:
            mark_store(database, FilesystemStore(root))
        finally:
            database.dispose()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MEDIA_RETENTION_")}
    env.update(MEDIA_RETENTION_DATABASE_URL=database_url, MEDIA_RETENTION_STORAGE_URL=storage_url,
               MEDIA_RETENTION_DATA_DIR=str(data_dir), MEDIA_RETENTION_LOG_FORMAT="json")
    env.update({f"MEDIA_RETENTION_{name.upper()}": value for name, value in settings.items()})
    return env


def table(title: str, header: tuple[str, ...], rows: list[tuple]) -> str:
    """The figures as a Markdown table (what docs/performance.md quotes), printed and returned."""
    lines = [f"\n{title}", "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    rendered = "\n".join(lines)
    print(rendered)
    return rendered
