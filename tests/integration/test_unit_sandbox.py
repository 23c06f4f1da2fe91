"""The systemd units' sandbox does not break what they run.

systemd is not PID 1 where the suite runs, so the units cannot be started under their sandbox here.
Instead each unit's ExecStart runs as the unit would run it (its argv, environment and working
directory) under `strace -f`, doing its real work (the worker deletes expired media and serves
/metrics; serve answers /readyz; beat sends sweeps; the migration upgrades a schema), and what it did is checked against
what the unit allows: every system call within its SystemCallFilter (as `systemd-analyze
syscall-filter` expands the groups), every socket of a family in RestrictAddressFamilies, and every
file it wrote, created, renamed or removed inside a directory ProtectSystem=strict leaves writable.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port
from tests.factories import seed_items
from tests.fleet import all_swept, wait_until
from tests.tools import require_tool
from worker.beat import HEARTBEAT_FILE
from worker.store.keys import key_for_id

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow,
              pytest.mark.parametrize("database", ["postgresql"], indirect=True)]

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
# Writable under ProtectSystem=strict whatever the unit says: the API file systems (/dev, /proc, /sys)
# and, with PrivateTmp=, a private /tmp and /var/tmp.
ALWAYS_WRITABLE = ("/dev/", "/proc/", "/sys/")
PRIVATE_TMP = ("/tmp/", "/var/tmp/")
# System calls that write to a path: which argument is the path, and whether a dirfd comes before it.
WRITING_OPEN_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC")
# (symlink's first argument is its target, not a file written: symlinkat/symlink are left out.)
PATH_CALLS = {"mkdir", "mkdirat", "unlink", "unlinkat", "rmdir", "rename", "renameat", "renameat2", "link", "linkat",
              "truncate", "chmod", "fchmodat", "utimensat", "mknod", "mknodat"}


def _unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def _filter_groups(analyze: str) -> dict[str, set[str]]:
    """`systemd-analyze syscall-filter`: each @group's members (system calls and nested @groups)."""
    listed = subprocess.run([analyze, "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, set[str]] = {}
    current = None
    for line in listed.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], set())
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.add(line.strip())
    return groups


def _expand(names: list[str], groups: dict[str, set[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= _expand(sorted(groups[name]), groups) if name.startswith("@") else {name}
    return calls


def allowed_syscalls(unit: dict[str, list[str]], analyze: str) -> set[str]:
    """The unit's SystemCallFilter= lines in order: an allow list, then `~` lines taking groups away."""
    groups = _filter_groups(analyze)
    allowed: set[str] = set()
    for line in unit["SystemCallFilter"]:
        if line.startswith("~"):
            allowed -= _expand(line[1:].split(), groups)
        else:
            allowed |= _expand(line.split(), groups)
    return allowed


class Traced:
    """A command run under `strace -f -y`, its trace read afterwards."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, trace: Path, log: Path):
        self.trace = trace
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [require_tool_strace(), "-f", "-y", "-qq", "-s", "256", "-o", str(trace), *argv], env=env, cwd=cwd,
                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise

    def calls(self) -> list[tuple[str, str]]:
        """(name, arguments) of every system call entered."""
        found = []
        for line in self.trace.read_text(errors="replace").splitlines():
            match = re.match(r"^\d+\s+([a-z0-9_]+)\((.*)", line)
            if match:
                found.append((match.group(1), match.group(2)))
        return found


def require_tool_strace() -> str:
    return require_tool("strace")


_AT_PATH = re.compile(r'(?:AT_FDCWD|\d+<([^>]*)>), "([^"]*)"')
_PLAIN_PATH = re.compile(r'"([^"]*)"')


def _paths(name: str, arguments: str, cwd: Path) -> list[str]:
    """The paths a call writes, as `strace -y` prints them: `"name"` relative to the working directory,
    or after a dirfd printed as `3</dir>`. Renames and links write both of theirs."""
    both = name.startswith(("rename", "link"))
    if name.endswith(("at", "at2")) and name != "creat":
        found = [(base or str(cwd), path) for base, path in _AT_PATH.findall(arguments)]
    else:
        found = [(str(cwd), path) for path in _PLAIN_PATH.findall(arguments)]
    return [os.path.normpath(os.path.join(base, path)) for base, path in (found if both else found[:1])]


def written_paths(calls: list[tuple[str, str]], cwd: Path) -> set[str]:
    paths = set()
    for name, arguments in calls:
        opens_to_write = name in ("open", "openat") and WRITING_OPEN_FLAGS.search(arguments)
        if opens_to_write or name == "creat" or name in PATH_CALLS:
            paths.update(_paths(name, arguments, cwd))
    return paths


def check_within_sandbox(traced: Traced, unit: dict[str, list[str]], writable: list[Path], cwd: Path,
                         scratch: Path) -> None:
    analyze = require_tool("systemd-analyze")
    calls = traced.calls()
    assert len(calls) > 1000, f"strace recorded too little to judge: {len(calls)} calls"
    used = {name for name, _ in calls}
    refused = used - allowed_syscalls(unit, analyze)
    assert not refused, f"system calls the unit's SystemCallFilter refuses: {sorted(refused)}"

    families = {re.match(r"(AF_[A-Z0-9]+)", arguments).group(1) for name, arguments in calls
                if name == "socket" and re.match(r"AF_", arguments)}
    assert families, "no socket at all: the trace missed the network"
    assert families <= set(unit["RestrictAddressFamilies"][0].split()), families

    # The test's own directories live under /tmp, which PrivateTmp= makes writable: there, only the
    # directories standing for the unit's writable ones count; elsewhere /tmp is the unit's private one.
    roots = tuple(f"{path}/" for path in writable)
    scratch_root = f"{scratch}/"
    outside = {path for path in written_paths(calls, cwd)
               if not f"{path}/".startswith(roots)
               and (f"{path}/".startswith(scratch_root) or not f"{path}/".startswith((*ALWAYS_WRITABLE, *PRIVATE_TMP)))}
    assert not outside, f"written outside the unit's writable directories: {sorted(outside)[:20]}"


def _exec_start(unit: dict[str, list[str]], instance: str = "") -> list[str]:
    [line] = unit["ExecStart"]
    argv = shlex.split(line.replace("%%", "\0").replace("%i", instance).replace("\0", "%"))
    return [str(Path(sys.executable).parent / Path(argv[0]).name), *argv[1:]]


@pytest.fixture
def unit_dirs(tmp_path) -> tuple[Path, Path]:
    """The unit's StateDirectory (its data dir and working directory) and RuntimeDirectory."""
    state, runtime = tmp_path / "state", tmp_path / "runtime"
    state.mkdir()
    runtime.mkdir()
    return state, runtime


def _env(database, redis_url: str, media_root: Path, state: Path, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MEDIA_RETENTION_", "PROMETHEUS"))}
    env.update(MEDIA_RETENTION_DATA_DIR=str(state), MEDIA_RETENTION_DATABASE_URL=database.url,
               MEDIA_RETENTION_BROKER_URL=redis_url, MEDIA_RETENTION_STORAGE_URL=media_root.as_uri(),
               MEDIA_RETENTION_LOG_FORMAT="json", **extra)
    return env


def _get(url: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError:
        return None


def test_the_worker_deletes_and_serves_metrics_within_its_units_sandbox(catalog, database, media_root, private_redis,
                                                                       unit_dirs, tmp_path):
    """The worker's ExecStart (2 pool processes, the expiry watch) deletes 300 expired files and serves
    /metrics using only allowed system calls and socket families, writing only in its state and runtime
    directories and the media root (its ReadWritePaths)."""
    state, runtime = unit_dirs
    unit = _unit("media-retention-worker@.service")
    port = free_port()
    catalog.set_org("acme", "30d")
    expired = seed_items(catalog.db, media_root, "acme", 300)
    env = _env(database, private_redis.url, media_root, state, MEDIA_RETENTION_METRICS_PORT=str(port),
               PROMETHEUS_MULTIPROC_DIR=str(runtime))
    traced = Traced(_exec_start(unit, str(port)), env, state, tmp_path / "worker.trace", tmp_path / "worker.log")
    try:
        wait_until(all_swept(database, 300), 120, "the traced worker to delete 300 items")
        scrape = wait_until(lambda: _get(f"http://127.0.0.1:{port}/metrics"), 30, "the worker's /metrics")
        assert scrape[0] == 200 and "media_retention_catalog_up 1.0" in scrape[1]
        # The expiry watch may finish before the pool has started; a SIGTERM then ends celery's start-up
        # with "Could not start worker processes" (exit 1), so stop only a worker that said it is ready.
        wait_until(lambda: " ready." in traced.log.read_text(), 60, "the traced worker to be ready")
    finally:
        returncode = traced.stop()
    assert returncode == 0, traced.log.read_text()[-3000:]
    assert not [key for key in map(key_for_id, expired) if (media_root / key).exists()], "expired files left"
    media = [path.removeprefix("-") for path in unit["ReadWritePaths"]]
    assert media == ["/mnt/wa/media"]
    check_within_sandbox(traced, unit, [state, runtime, media_root], state, tmp_path)
    # The trace did see the deletes it judged (the check of written paths is not blind).
    deleted = {path for path in written_paths(traced.calls(), state) if path.startswith(f"{media_root}/")}
    assert {str(media_root / key_for_id(expired[0])), str(media_root / key_for_id(expired[-1]))} <= deleted


def test_serve_beat_and_the_migration_run_within_their_units_sandbox(database, private_redis, media_root, unit_dirs, tmp_path):
    """`db upgrade` (the migrate unit), `serve` answering /readyz and beat sending sweeps use only allowed
    system calls and socket families; the migration writes only in its state directory and the media
    root (binding the store), serve and beat only in their state directory."""
    state, _ = unit_dirs
    env = _env(database, private_redis.url, media_root, state)
    migrate = _unit("media-retention-migrate.service")
    upgrade = Traced(_exec_start(migrate), env, state, tmp_path / "migrate.trace", tmp_path / "migrate.log")
    assert upgrade.process.wait(timeout=120) == 0, upgrade.log.read_text()[-3000:]
    # It binds the store to the catalog (a marker in the media root): its ReadWritePaths, played by media_root.
    assert [path.removeprefix("-") for path in migrate["ReadWritePaths"]] == ["/mnt/wa/media"]
    assert (media_root / ".media-retention.json").exists()
    check_within_sandbox(upgrade, migrate, [state, media_root], state, tmp_path)

    serve = _unit("media-retention-serve.service")
    port = free_port()
    argv = [str(port) if part == "8080" else part for part in _exec_start(serve)]
    traced = Traced(argv, env, state, tmp_path / "serve.trace", tmp_path / "serve.log")
    try:
        ready = wait_until(lambda: _get(f"http://127.0.0.1:{port}/readyz"), 60, "serve to answer /readyz")
        assert ready[0] == 200
    finally:
        returncode = traced.stop()
    # uvicorn shuts down cleanly on SIGTERM, then raises the signal again (exit status -15), as it should.
    assert returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in traced.log.read_text(), \
        traced.log.read_text()[-3000:]
    check_within_sandbox(traced, serve, [state], state, tmp_path)

    beat = _unit("media-retention-beat.service")
    env["MEDIA_RETENTION_SWEEP_INTERVAL"] = "1s"
    traced = Traced(_exec_start(beat), env, state, tmp_path / "beat.trace", tmp_path / "beat.log")
    queue = redis.Redis.from_url(private_redis.url)
    try:
        wait_until(lambda: queue.llen("celery") >= 2, 60, "beat to send two sweeps")
    finally:
        queue.close()
        returncode = traced.stop()
    assert returncode == 0, traced.log.read_text()[-3000:]
    assert (state / HEARTBEAT_FILE).exists()
    check_within_sandbox(traced, beat, [state], state, tmp_path)
