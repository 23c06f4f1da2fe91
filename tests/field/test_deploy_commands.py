"""Every command the deploy files run, run from the installed venv outside a container, with the
environment it would get there: the image's CMD and HEALTHCHECK, compose's services, Kubernetes' init
containers, containers and probes, systemd's ExecStartPre and ExecStart.

What a deployment points at servers and volumes (database, broker, media store, Alertmanager, data
dir) is pointed at this test's PostgreSQL schema, private Redis (a database of its own per process)
and temp dirs; the sweep interval is shortened so each beat is seen sending within seconds. Everything
else (log format, fan-out, metrics port setting, flags) is taken from the files as they are.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import redis
import yaml

from tests.conftest import free_port
from tests.field.conftest import Installed, Processes, run
from tests.fleet import wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Where the image and the units keep their data, and where systemd's units expect the venv.
IMAGE_DATA_DIR = "/var/lib/media-retention"
UNIT_VENV_BIN = "/opt/media-retention/.venv/bin/"
# Settings that name a server or a volume: every deployment's own, replaced by the test's.
ADDRESSES = ("DATABASE_URL", "BROKER_URL", "STORAGE_URL", "ALERTMANAGER_URL", "ALERT_WEBHOOK_URL", "S3_ENDPOINT_URL")


@dataclass
class Deployed:
    """One command of a deploy file with the environment and working directory it gets there."""

    source: str
    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    http_probes: list[str] = field(default_factory=list)
    exec_probes: list[list[str]] = field(default_factory=list)
    healthcheck: list[str] | None = None
    # systemd: directories the service manager creates before starting the unit.
    make_dirs: list[str] = field(default_factory=list)

    @property
    def role(self) -> str:
        if Path(self.argv[0]).name == "media-retention" and self.argv[1:3] == ["db", "upgrade"]:
            return "upgrade"
        if Path(self.argv[0]).name == "media-retention" and self.argv[1:2] == ["serve"]:
            return "serve"
        if Path(self.argv[0]).name == "celery" and self.argv[1:3] == ["-A", "worker.app"]:
            return self.argv[3]
        raise AssertionError(f"{self.source}: not a command of ours: {self.argv}")


# -- reading the deploy files ------------------------------------------------------------------------


def image() -> dict:
    """The Dockerfile's ENV, WORKDIR, CMD and HEALTHCHECK command."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env = dict(item.split("=", 1) for line in re.findall(r"^ENV (.*)$", text, re.M) for item in shlex.split(line))
    return {
        "env": env,
        "workdir": re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1],
        "cmd": json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1)),
        "healthcheck": json.loads(re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.M).group(1)),
    }


def _interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set in the environment: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def from_dockerfile() -> list[Deployed]:
    built = image()
    return [Deployed("Dockerfile CMD", built["cmd"], dict(built["env"]), built["workdir"], healthcheck=built["healthcheck"])]


def from_compose() -> list[Deployed]:
    built = image()
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    deployed = []
    for name, service in services.items():
        if not str(service.get("image", "")).startswith("media-retention:"):
            continue
        env = {**built["env"], **{key: _interpolate(str(value)) for key, value in service.get("environment", {}).items()}}
        own = service.get("healthcheck", {})
        # A service's own `test` replaces the image's HEALTHCHECK, as compose does.
        healthcheck = None if own.get("disable", False) else own["test"][1:] if "test" in own else built["healthcheck"]
        deployed.append(Deployed(f"compose {name}", service["command"], env, built["workdir"], healthcheck=healthcheck))
    return deployed


def from_kubernetes() -> list[Deployed]:
    built = image()
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text()) if doc]
    config = next(doc["data"] for doc in documents if doc["kind"] == "ConfigMap")
    deployed = []
    for deployment in (doc for doc in documents if doc["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            probes = [container[name] for name in ("startupProbe", "livenessProbe", "readinessProbe") if name in container]
            deployed.append(Deployed(
                f"kubernetes {deployment['metadata']['name']}/{container['name']}", container["command"],
                {**built["env"], **config}, built["workdir"],
                http_probes=[probe["httpGet"]["path"] for probe in probes if "httpGet" in probe],
                exec_probes=[probe["exec"]["command"] for probe in probes if "exec" in probe]))
    return deployed


def _unit(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def from_systemd(instance: str, state: Path, runtime: Path) -> list[Deployed]:
    """ExecStartPre and ExecStart of each unit (the worker template as instance `instance`), specifiers resolved."""
    example = {key: value for key, value in (line.split("=", 1) for line in (DEPLOY / "systemd" / "env.example").read_text().splitlines()
                                             if line and not line.startswith("#"))}
    deployed = []
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        name = path.name.replace("@.", f"@{instance}.")

        def resolve(text: str) -> str:
            text = text.replace("%%", "\0").replace("%i", instance).replace("%S", str(state)).replace("%t", str(runtime))
            return text.replace("\0", "%").replace(UNIT_VENV_BIN, "")

        unit = _unit(path)
        assert unit["EnvironmentFile"] == ["/etc/media-retention/env"]
        # systemd: EnvironmentFile= overrides Environment=.
        env = {**dict(resolve(item).split("=", 1) for item in unit.get("Environment", [])), **example}
        directories = [str(state / resolve(d)) for d in unit.get("StateDirectory", [])]
        directories += [str(runtime / resolve(d)) for d in unit.get("RuntimeDirectory", [])]
        for key in ("ExecStartPre", "ExecStart"):
            for line in unit.get(key, []):
                deployed.append(Deployed(f"systemd {name} {key}", shlex.split(resolve(line)), env,
                                         resolve(unit["WorkingDirectory"][0]), make_dirs=directories))
    return deployed


# -- running them --------------------------------------------------------------------------------------


@dataclass
class Started:
    deployed: Deployed
    name: str
    env: dict[str, str]
    cwd: Path
    broker_db: int
    port: int | None


def _prepare(deployed: Deployed, number: int, *, base: Path, installed: Installed, database_url: str, redis_url: str,
             media: Path) -> Started:
    name = re.sub(r"[^A-Za-z0-9@.-]+", "-", deployed.source)
    data = base / name / "data"
    data.mkdir(parents=True)
    env = {key: value.replace(IMAGE_DATA_DIR, str(data)) for key, value in deployed.env.items()}
    env = {key: value for key, value in env.items() if key.removeprefix("MEDIA_RETENTION_") not in ADDRESSES}
    port = free_port() if "MEDIA_RETENTION_METRICS_PORT" in env else None
    if port and not deployed.source.startswith("systemd"):
        env["MEDIA_RETENTION_METRICS_PORT"] = str(port)
    elif port:
        port = int(env["MEDIA_RETENTION_METRICS_PORT"])
    database = 1 + number % 15
    env.update(MEDIA_RETENTION_DATABASE_URL=database_url, MEDIA_RETENTION_BROKER_URL=f"{redis_url.rsplit('/', 1)[0]}/{database}",
               MEDIA_RETENTION_STORAGE_URL=media.as_uri(), MEDIA_RETENTION_SWEEP_INTERVAL="1s")
    for directory in deployed.make_dirs:
        Path(directory).mkdir(parents=True, exist_ok=True)
    if deployed.role == "serve":
        # The file's port (8080) may be taken on this machine: each server gets a free one, its
        # health check asks that one.
        port = free_port()
        given = deployed.argv[deployed.argv.index("--port") + 1]
        deployed = replace(deployed, argv=[str(port) if part == given else part for part in deployed.argv],
                           healthcheck=[part.replace(f":{given}/", f":{port}/") for part in deployed.healthcheck]
                           if deployed.healthcheck else None)
    cwd = Path(deployed.cwd.replace(IMAGE_DATA_DIR, str(data)))
    cwd.mkdir(parents=True, exist_ok=True)
    return Started(deployed, name, {**installed.env(), **env}, cwd, database, port)


@pytest.mark.critical_path(seconds=20)
def test_every_deploy_command_starts_from_the_installed_venv(installed, fresh_schema, redis_server, tmp_path):
    """The schema upgrades (run together) exit 0; every worker answers `celery inspect ping` and its probes
    and HEALTHCHECK pass; every beat puts a task on its queue, and its liveness probe passes."""
    media = tmp_path / "media"
    media.mkdir()
    instance = str(free_port())
    deployed = [*from_dockerfile(), *from_compose(), *from_kubernetes(),
                *from_systemd(instance, tmp_path / "state", tmp_path / "runtime")]
    roles = [d.role for d in deployed]
    assert roles.count("upgrade") >= 4 and roles.count("worker") >= 4 and roles.count("beat") >= 3, roles
    assert roles.count("serve") >= 3, roles
    assert len(deployed) <= 15, "each process needs a Redis database of its own (1-15)"
    started = [_prepare(d, n, base=tmp_path, installed=installed, database_url=fresh_schema, redis_url=redis_server.url,
                        media=media) for n, d in enumerate(deployed)]
    for one in started:
        # Probe commands are shown failing before anything runs: a check that cannot fail proves nothing.
        if one.deployed.healthcheck:
            assert run(_in_data_dir(one.deployed.healthcheck, one), env=one.env, cwd=one.cwd).returncode != 0, one.name
        for probe in one.deployed.exec_probes:
            assert run(_in_data_dir(probe, one), env=one.env, cwd=one.cwd).returncode != 0, one.name

    processes = Processes(tmp_path)
    try:
        upgrades = [processes.start(one.name, one.deployed.argv, env=one.env, cwd=one.cwd)
                    for one in started if one.deployed.role == "upgrade"]
        for process, one in zip(upgrades, [s for s in started if s.deployed.role == "upgrade"]):
            assert process.wait(timeout=120) == 0, f"{one.deployed.source}:\n{processes.log(one.name)}"

        services = [one for one in started if one.deployed.role in ("worker", "beat", "serve")]
        for one in services:
            processes.start(one.name, one.deployed.argv, env=one.env, cwd=one.cwd)
        for one in services:
            if one.deployed.role == "worker":
                _check_worker(one, installed, processes)
            elif one.deployed.role == "serve":
                _check_serve(one, processes)
            else:
                _check_beat(one, redis_server, processes)
    finally:
        processes.stop_all()


def _in_data_dir(argv: list[str], one: Started) -> list[str]:
    return [part.replace(IMAGE_DATA_DIR, one.env.get("MEDIA_RETENTION_DATA_DIR", IMAGE_DATA_DIR)) for part in argv]


def _node_name(argv: list[str]) -> str:
    """The worker's node name as Celery expands it (`--hostname`, default `celery@%h`)."""
    template = argv[argv.index("--hostname") + 1] if "--hostname" in argv else "celery@%h"
    return template.replace("%h", socket.gethostname())


def _check_worker(one: Started, installed: Installed, processes: Processes) -> None:
    def pong() -> bool:
        processes.assert_alive(one.name)
        ping = run([installed.bin("celery"), "-A", "worker.app", "inspect", "ping", "--timeout", "2",
                    "--destination", _node_name(one.deployed.argv)], env=one.env, cwd=one.cwd)
        return "pong" in ping.stdout

    wait_until(pong, 90, f"{one.deployed.source} to answer ping", interval=0.5)
    if one.port:
        # The port the file gives it serves the worker's metrics, the catalog reachable.
        scrape = wait_until(lambda: _scrape(one.port), 30, f"{one.deployed.source} /metrics on port {one.port}")
        assert "media_retention_catalog_up 1.0" in scrape, f"{one.deployed.source}: {scrape[:500]}"
        for path in one.deployed.http_probes:
            response = wait_until(lambda: _get(one.port, path), 30, f"{one.deployed.source} probe {path}")
            assert response == 200, f"{one.deployed.source}: probe {path} answered {response}"
    if one.deployed.healthcheck:
        checked = run(one.deployed.healthcheck, env=one.env, cwd=one.cwd)
        assert checked.returncode == 0, f"{one.deployed.source} HEALTHCHECK: {checked.stdout}{checked.stderr}"


def _scrape(port: int) -> str | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None


def _check_serve(one: Started, processes: Processes) -> None:
    """The lookup service answers /readyz (catalog reachable) and its probes and health check pass."""
    def ready() -> bool:
        processes.assert_alive(one.name)
        return _get(one.port, "/readyz") == 200

    wait_until(ready, 60, f"{one.deployed.source} /readyz on port {one.port}", interval=0.3)
    for path in one.deployed.http_probes:
        assert _get(one.port, path) == 200, f"{one.deployed.source}: probe {path}"
    if one.deployed.healthcheck:
        checked = run(one.deployed.healthcheck, env=one.env, cwd=one.cwd)
        assert checked.returncode == 0, f"{one.deployed.source} health check: {checked.stdout}{checked.stderr}"


def _get(port: int, path: str) -> int | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except OSError:
        return None


def _check_beat(one: Started, redis_server, processes: Processes) -> None:
    queue = redis.Redis(port=redis_server.port, db=one.broker_db)
    try:
        def sent() -> bool:
            processes.assert_alive(one.name)
            return queue.llen("celery") > 0

        wait_until(sent, 90, f"{one.deployed.source} to send a task", interval=0.5)
    finally:
        queue.close()
    for probe in [*one.deployed.exec_probes, *([one.deployed.healthcheck] if one.deployed.healthcheck else [])]:
        checked = run(_in_data_dir(probe, one), env=one.env, cwd=one.cwd)
        assert checked.returncode == 0, f"{one.deployed.source} liveness probe {probe}: {checked.stdout}{checked.stderr}"
