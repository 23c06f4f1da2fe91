"""The floors of the code base, read from every module's imports (top level and inside functions):
config is the ground floor, the engine (worker/) stands on it, the edges (CLI, tasks) on both."""

from __future__ import annotations

import ast
from pathlib import Path

from config.durations import RETENTION_MAX
from worker.models import Organization
from worker.policy import integer_column_max

ROOT = Path(__file__).resolve().parents[2]
# The Celery glue: the app object and the command line that sends tasks to it and runs a worker.
CELERY_GLUE = {"worker/app.py", "worker/cli.py"}
# What a task module may reach in worker/: the per-process engine and the app it registers on.
TASK_REACH = {"worker.runtime", "worker.app", "worker"}
# A task is a few lines that bind context and call the engine; more than this is logic in the wrong floor.
TASK_STATEMENTS_MAX = 12


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as dotted names (`from a import b` gives `a` and `a.b`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules_under(folder: str) -> dict[str, set[str]]:
    return {str(path.relative_to(ROOT)): imported_modules(path) for path in sorted((ROOT / folder).rglob("*.py"))
            if "migrations" not in path.parts}


def roots(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_config_imports_nothing_from_worker_or_tasks():
    """config/ is the ground floor: settings, logging, schedule and their validators stand alone."""
    offenders = {path: sorted(roots(names) & {"worker", "tasks"}) for path, names in modules_under("config").items()}
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_engine_imports_no_task_and_no_celery_outside_the_celery_glue():
    """worker/ never imports tasks/, and only the app and the CLI import celery or kombu."""
    offenders = {}
    for path, names in modules_under("worker").items():
        forbidden = {"tasks"} | (set() if path in CELERY_GLUE else {"celery", "kombu"})
        if roots(names) & forbidden:
            offenders[path] = sorted(roots(names) & forbidden)
    assert offenders == {}


def test_tasks_reach_the_engine_only_through_the_runtime_and_stay_a_few_lines():
    """tasks/ import worker.runtime and worker.app only (no models, no SQL), and each task is a few statements."""
    for path, names in modules_under("tasks").items():
        reached = {name for name in names if name.split(".")[0] in ("worker", "sqlalchemy")}
        assert reached <= TASK_REACH | {"worker.app.app", "worker.app.SWEEP_TASK_BUDGET_S", "worker.runtime"}, (path, reached)
        tree = ast.parse((ROOT / path).read_text())
        for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
            statements = sum(isinstance(node, ast.stmt) for node in ast.walk(function)) - 1
            assert statements <= TASK_STATEMENTS_MAX, f"{path}:{function.name} has {statements} statements"


def test_the_retention_ceiling_in_config_is_what_the_catalog_column_holds():
    """config's RETENTION_MAX (no models down there) equals the largest organizations.retention_seconds."""
    assert RETENTION_MAX.total_seconds() == integer_column_max(Organization.__table__.c.retention_seconds)
