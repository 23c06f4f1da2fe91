"""The deploy files run commands that exist, with the app and settings this code has."""

import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from config.settings import Settings
from worker.cli import cli
from worker.exporter import HEALTH_PROBE_PATH

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def commands_in_deploy_files() -> list[list[str]]:
    commands = []
    for path in [*DEPLOY.glob("*.yaml"), *DEPLOY.glob("kubernetes/*.yaml")]:
        for document in yaml.safe_load_all(path.read_text()):
            commands.extend(_find_commands(document))
    for path in DEPLOY.glob("systemd/*.service"):
        for line in path.read_text().splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=")):
                argv = shlex.split(line.split("=", 1)[1])
                commands.append([Path(argv[0]).name, *argv[1:]])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    commands.append(yaml.safe_load(re.search(r"^CMD (.*)$", dockerfile, re.M).group(1)))
    return commands


def _find_commands(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "command" and isinstance(value, list):
                yield value
            else:
                yield from _find_commands(value)
    elif isinstance(node, list):
        for value in node:
            yield from _find_commands(value)


# Ours only: the compose file also runs third-party images (redis-server) with commands of theirs.
COMMANDS = [command for command in commands_in_deploy_files() if command[0] in ("celery", "media-retention")]


def test_deploy_files_parse_and_run_the_worker_beat_and_schema_commands():
    """Compose, Kubernetes, systemd and the image together start workers, a beat and a schema upgrade."""
    joined = [" ".join(command) for command in COMMANDS]
    assert any("worker.app worker" in command for command in joined)
    assert any("worker.app beat" in command for command in joined)
    assert any(command.startswith("media-retention db upgrade") for command in joined)
    assert any(command.startswith("media-retention serve") for command in joined)


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_every_deploy_command_names_the_real_celery_app_or_a_real_cli_command(command):
    """`celery -A` always points at worker.app; `media-retention` subcommands exist in the CLI."""
    if command[0] == "celery":
        assert command[1:3] == ["-A", "worker.app"]
    else:
        assert command[0] == "media-retention"
        group, words = cli, command[1:]
        while words and isinstance(group, click.Group):
            group = group.commands.get(words[0])
            assert group is not None, f"no such command: {' '.join(command)}"
            words = words[1:]


def test_every_setting_named_in_deploy_files_exists():
    """A MEDIA_RETENTION_* variable in a deploy file is a field of the settings object."""
    fields = {f"MEDIA_RETENTION_{name.upper()}" for name in Settings.model_fields}
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    named = set(re.findall(r"MEDIA_RETENTION_[A-Z0-9_]+", text))
    assert named and named <= fields, named - fields


def _package_version() -> str:
    return tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["version"]


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [value for key, value in node.items() if key == "image" and isinstance(value, str)] + \
            [image for value in node.values() for image in _images(value)]
    if isinstance(node, list):
        return [image for value in node for image in _images(value)]
    return []


def test_every_media_retention_image_is_tagged_with_the_package_version():
    """Compose and Kubernetes run `media-retention:<version of pyproject.toml>`, never :latest, and the
    Dockerfile's build line tags the same; third-party images are pinned too."""
    version = _package_version()
    documents = [yaml.safe_load((DEPLOY / "compose.yaml").read_text()),
                 *yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text())]
    images = [image for document in documents for image in _images(document)]
    ours = [image for image in images if image.startswith("media-retention")]
    assert len(ours) >= 5 and set(ours) == {f"media-retention:{version}"}
    for image in set(images) - set(ours):
        tag = image.rpartition(":")[2]
        assert re.search(r"\d", tag) and tag != "latest", f"{image} is not pinned"
    assert f"-t media-retention:{version} " in (DEPLOY / "Dockerfile").read_text()


def test_the_base_image_is_pinned_to_a_patch_release_and_the_image_runs_as_a_numeric_user():
    """`FROM python:3.11.N-slim-…` and `USER uid:gid` (numbers, so runAsNonRoot can check them)."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+\.\d+-slim-\w+$", dockerfile, re.M)
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.M)


def test_health_checks_ask_the_exporter_for_the_probe_path_the_code_defines():
    """Kubernetes' worker probes and the image's HEALTHCHECK request HEALTH_PROBE_PATH (no catalog query)."""
    deployments = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text())
                   if doc and doc["kind"] == "Deployment"]
    [worker] = [doc for doc in deployments if doc["metadata"]["name"] == "media-retention-worker"]
    [container] = worker["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTH_PROBE_PATH, "port": "metrics"}
    assert f"GET {HEALTH_PROBE_PATH} HTTP/1.0" in (DEPLOY / "Dockerfile").read_text()


def test_kubernetes_migrates_in_an_init_container_of_every_deployment_and_has_no_job():
    """Each Deployment runs `media-retention db upgrade` before its container; no one-shot Job to re-apply."""
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text()) if doc]
    assert "Job" not in {doc["kind"] for doc in documents}
    for deployment in (doc for doc in documents if doc["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert [c["command"] for c in pod["initContainers"]] == [["media-retention", "db", "upgrade"]]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in (*pod["initContainers"], *pod["containers"]):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["resources"]["limits"]["memory"]


def _unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("name", ["media-retention-beat.service", "media-retention-worker@.service",
                                  "media-retention-serve.service", "media-retention-migrate.service"])
def test_systemd_units_keep_their_data_in_the_state_directory_systemd_creates(name):
    """The data dir is the unit's StateDirectory and the working directory, never `./` of wherever it started."""
    unit = _unit(name)
    assert unit["StateDirectory"] == ["media-retention"]
    assert unit["WorkingDirectory"] == ["%S/media-retention"]
    assert "MEDIA_RETENTION_DATA_DIR=%S/media-retention" in unit["Environment"]


def test_systemd_worker_instances_are_named_by_their_metrics_port():
    """`media-retention-worker@9801` serves /metrics on 9801: any port, however many instances."""
    unit = _unit("media-retention-worker@.service")
    assert "MEDIA_RETENTION_METRICS_PORT=%i" in unit["Environment"]


SERVICES = ["media-retention-beat.service", "media-retention-worker@.service", "media-retention-serve.service"]


def test_the_migrate_unit_is_a_oneshot_that_waits_for_the_database_and_runs_db_upgrade_on_every_start():
    """`media-retention-migrate` runs `db upgrade --wait` once per start (no RemainAfterExit, so a later start
    migrates a new release), waiting out a database outage inside its one start job (no Restart=: a
    restarted dependency never starts the units that failed on it), and is not enabled on its own."""
    unit = _unit("media-retention-migrate.service")
    assert unit["Type"] == ["oneshot"]
    assert [shlex.split(line)[1:] for line in unit["ExecStart"]] == [["db", "upgrade", "--wait"]]
    assert not {"Restart", "RemainAfterExit", "TimeoutStartSec", "WantedBy"} & set(unit)


@pytest.mark.parametrize("name", SERVICES)
def test_workers_beat_and_serve_start_only_after_the_migration_succeeded(name):
    """Ordered after the migrate unit and requiring it; none migrates on its own any more."""
    unit = _unit(name)
    assert "media-retention-migrate.service" in " ".join(unit["After"]).split()
    assert unit["Requires"] == ["media-retention-migrate.service"]
    assert "ExecStartPre" not in unit


def _sandbox(name: str) -> dict[str, list[str]]:
    unit = _unit(name)
    return {key: values for key, values in unit.items() if key not in ("ReadWritePaths", "WantedBy")
            and list(unit).index(key) >= list(unit).index("NoNewPrivileges")}


def test_every_unit_has_the_same_sandbox():
    """One sandbox for all four units (the worker only adds its media root): hardening one cannot be forgotten on another."""
    sandboxes = {name: _sandbox(name) for name in [*SERVICES, "media-retention-migrate.service"]}
    first = sandboxes["media-retention-beat.service"]
    assert first["ProtectSystem"] == ["strict"] and first["CapabilityBoundingSet"] == [""]
    assert all(sandbox == first for sandbox in sandboxes.values()), sandboxes


def test_the_sandbox_leaves_the_network_open_and_write_execute_memory_allowed():
    """PostgreSQL, Redis, S3 and Alertmanager stay reachable (TCP over IPv4/IPv6, local sockets, no
    PrivateNetwork or IP allow list); MemoryDenyWriteExecute is left off (C extensions may need it)."""
    unit = _unit("media-retention-worker@.service")
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(unit["RestrictAddressFamilies"][0].split())
    assert not {"PrivateNetwork", "IPAddressDeny", "IPAddressAllow", "MemoryDenyWriteExecute", "PrivateUsers"} & set(unit)


def test_the_worker_and_the_migration_may_write_the_media_root_the_example_environment_names():
    """ProtectSystem=strict makes / read-only: the worker (deletes) and the migration (binds the store)
    have the media root of env.example in ReadWritePaths (optional, `-`, so an S3 site starts); beat and
    serve never write media."""
    example = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    media_root = example["MEDIA_RETENTION_STORAGE_URL"].removeprefix("file://")
    for name in ("media-retention-worker@.service", "media-retention-migrate.service"):
        assert _unit(name)["ReadWritePaths"] == [f"-{media_root}"], name
    for name in ("media-retention-beat.service", "media-retention-serve.service"):
        assert "ReadWritePaths" not in _unit(name), f"{name} never writes media"


def _kubernetes() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text()) if doc]


def _selects(selector: dict, labels: dict) -> bool:
    """A label selector of matchLabels only (all this file uses) against a pod's labels."""
    assert set(selector) == {"matchLabels"}, selector
    return selector["matchLabels"].items() <= labels.items()


def _pods() -> dict[str, dict]:
    """Each Deployment's pod template by Deployment name."""
    return {doc["metadata"]["name"]: doc["spec"]["template"] for doc in _kubernetes() if doc["kind"] == "Deployment"}


def test_every_pod_goes_without_a_service_account_token_and_chowns_its_volumes_only_on_mismatch():
    """automountServiceAccountToken false on every pod (they never call the API); wherever fsGroup is set,
    fsGroupChangePolicy OnRootMismatch, so a media volume of millions of files is not chowned at each start."""
    pods = _pods()
    assert set(pods) == {"media-retention-worker", "media-retention-beat", "media-retention-lookup"}
    for name, template in pods.items():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        if "fsGroup" in spec["securityContext"]:
            assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", name


def test_a_disruption_budget_keeps_one_lookup_replica_serving_during_drains():
    """A PodDisruptionBudget selects exactly the lookup pods and lets one at a time go (of 2 replicas)."""
    pods = _pods()
    [budget] = [doc for doc in _kubernetes() if doc["kind"] == "PodDisruptionBudget"
                and _selects(doc["spec"]["selector"], pods["media-retention-lookup"]["metadata"]["labels"])]
    assert [name for name, pod in pods.items() if _selects(budget["spec"]["selector"], pod["metadata"]["labels"])] \
        == ["media-retention-lookup"]
    [lookup] = [doc for doc in _kubernetes() if doc["metadata"]["name"] == "media-retention-lookup" and doc["kind"] == "Deployment"]
    assert budget["spec"]["maxUnavailable"] == 1 < lookup["spec"]["replicas"]


def test_lookup_replicas_spread_over_nodes_and_zones_without_blocking_a_one_node_cluster():
    """topologySpreadConstraints by hostname and zone, selecting the lookup pods, ScheduleAnyway."""
    template = _pods()["media-retention-lookup"]
    constraints = template["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in constraints:
        assert constraint["maxSkew"] == 1 and constraint["whenUnsatisfiable"] == "ScheduleAnyway"
        assert _selects(constraint["labelSelector"], template["metadata"]["labels"])


def _allowed(direction: str, pod_labels: dict) -> set[tuple]:
    """What the NetworkPolicies selecting a pod allow in one direction: (protocol, port, peer) with peer
    a namespace name or "any". Policies add up, as Kubernetes applies them."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    allowed = set()
    for policy in (doc for doc in _kubernetes() if doc["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        if direction not in spec["policyTypes"] or not _selects(spec["podSelector"], pod_labels):
            continue
        for rule in spec.get(key, []):
            peers = [peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule.get(peers_key, [])]
            assert len(peers) == len(rule.get(peers_key, [])), f"{policy['metadata']['name']}: only namespace peers expected"
            allowed |= {(port["protocol"], port["port"], peer) for port in rule["ports"] for peer in peers or ["any"]}
    return allowed


def test_network_policies_isolate_every_pod_in_both_directions():
    """Each pod is selected by a policy of both types, so whatever no rule allows is denied."""
    for name, template in _pods().items():
        types = {kind for doc in _kubernetes() if doc["kind"] == "NetworkPolicy"
                 if _selects(doc["spec"]["podSelector"], template["metadata"]["labels"]) for kind in doc["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, name


def test_network_policies_let_in_only_lookup_callers_and_prometheus():
    """Lookup: its port 8080 from anywhere; every pod: the workers' metrics port from `monitoring`. Nothing else."""
    pods = _pods()
    metrics_port = int(next(doc for doc in _kubernetes() if doc["kind"] == "ConfigMap")["data"]["MEDIA_RETENTION_METRICS_PORT"])
    scrape = ("TCP", metrics_port, "monitoring")
    assert _allowed("Ingress", pods["media-retention-lookup"]["metadata"]["labels"]) == {("TCP", 8080, "any"), scrape}
    assert _allowed("Ingress", pods["media-retention-worker"]["metadata"]["labels"]) == {scrape}
    assert _allowed("Ingress", pods["media-retention-beat"]["metadata"]["labels"]) == {scrape}
    [lookup] = pods["media-retention-lookup"]["spec"]["containers"]
    assert lookup["ports"] == [{"name": "http", "containerPort": 8080}]


def test_network_policies_let_out_only_dns_postgresql_redis_s3_and_alertmanager():
    """Every pod: DNS (UDP and TCP 53), PostgreSQL 5432, Redis 6379, HTTPS 443 (S3) and Alertmanager 9093
    in `monitoring` (the port and namespace the ConfigMap's URL names). Nothing else."""
    config = next(doc for doc in _kubernetes() if doc["kind"] == "ConfigMap")["data"]
    assert config["MEDIA_RETENTION_ALERTMANAGER_URL"] == "http://alertmanager-operated.monitoring.svc:9093"
    expected = {("UDP", 53, "any"), ("TCP", 53, "any"), ("TCP", 5432, "any"), ("TCP", 6379, "any"), ("TCP", 443, "any"),
                ("TCP", 9093, "monitoring")}
    for name, template in _pods().items():
        assert _allowed("Egress", template["metadata"]["labels"]) == expected, name
