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


# -- Kubernetes, compose, systemd ------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_are_valid_against_the_kubernetes_schemas_strictly(version):
    """Every document validates against the bundled OpenAPI schemas, unknown fields refused (strict)."""
    documents = [doc for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "media-retention.yaml").read_text()) if doc]
    kinds = [doc["kind"] for doc in documents]
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Deployment", "Deployment", "Service"]
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


def test_systemd_analyze_verifies_the_units_with_the_commands_they_run(tmp_path):
    """`systemd-analyze verify` on the beat unit and a worker instance (paths pointed at an installed venv):
    no unknown keys, no bad specifiers, every command executable."""
    analyze = require_tool("systemd-analyze")
    venv = Path(sys.executable).parent.parent
    for unit in (DEPLOY / "systemd").glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/media-retention/.venv", str(venv)))
    (tmp_path / "media-retention-worker@9801.service").symlink_to(tmp_path / "media-retention-worker@.service")
    verified = run(analyze, "verify", "--man=no", "./media-retention-beat.service", "./media-retention-worker@9801.service",
                   "./media-retention-serve.service", cwd=tmp_path)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
