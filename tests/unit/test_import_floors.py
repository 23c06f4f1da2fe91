"""The floors of the code base, read from every module's imports (top level and inside functions):
config is the ground floor, the engine (worker/) stands on it, the edges (CLI, tasks) on both. And one
room of the engine: every statement on `media_items` is built in worker/items/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from config.durations import RETENTION_MAX
from worker.models import Organization
from worker.policy import integer_column_max

ROOT = Path(__file__).resolve().parents[2]
# The Celery glue: the app object, its worker and beat programs, beat's scheduler, the embedded broker's transport,
# and the command line that sends tasks to it and runs a worker.
CELERY_GLUE = {"worker/app.py", "worker/celery_programs.py", "worker/beat.py", "worker/broker.py", "worker/cli.py"}
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
    """worker/ never imports tasks/, and only the app (and its programs), beat's scheduler, the broker and the CLI import celery or kombu."""
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


# Where statements on media_items are built: the package that owns them and the model that defines the
# table and its indexes (migrations, history in their own literal SQL, are not read at all).
ITEMS_OWNERS = ("worker/items/", "worker/models.py")
# What builds a statement: SQLAlchemy's constructors (`select(...)`, `table.update()`, `text(...)`), and
# the ORM's reads and writes of a row (`session.get(MediaItem, ...)`, `session.query`, `MediaItem(...)`).
# Not seen: attributes set on a row an items function returned (the ORM writes them at the flush), which
# is why item holds are written by statements of `worker/items/holds.py`.
BUILDERS = {"select", "update", "delete", "insert", "text", "table", "exists", "get", "query", "merge", "MediaItem"}
_TABLE_NAME = re.compile(r"\bmedia_items\b")


def _names_the_table(node: ast.AST, derived: set[str]) -> bool:
    """Whether `node` names media_items: the model (`MediaItem`, `models.MediaItem`), the table's name in a
    string, or a variable assigned from either (`items = MediaItem.__table__`, `due = items.c.expires_at <= now`)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and (sub.id == "MediaItem" or sub.id in derived):
            return True
        if isinstance(sub, ast.Attribute) and sub.attr == "MediaItem":
            return True
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and _TABLE_NAME.search(sub.value):
            return True
    return False


def _derived_names(tree: ast.AST) -> set[str]:
    """Every name the module assigns from something that names media_items, and every function that
    returns such a thing, to a fixed point (by name, across scopes: a false alarm costs a rename, a miss
    would cost the rule)."""
    derived: set[str] = set()
    while True:
        found = set(derived)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
                if _names_the_table(node.value, derived):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    found.update(name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name))
            elif isinstance(node, (ast.For, ast.comprehension)) and _names_the_table(node.iter, derived):
                found.update(name.id for name in ast.walk(node.target) if isinstance(name, ast.Name))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    isinstance(sub, ast.Return) and sub.value is not None and _names_the_table(sub.value, derived)
                    for sub in ast.walk(node)):
                found.add(node.name)  # a helper that returns SQL text or a table makes its callers' results name it
        if found == derived:
            return derived
        derived = found


def _units(tree: ast.AST):
    """Each simple statement whole, and the header expressions of compound ones (not their bodies)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.While)):
            yield node.test
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            yield node.iter
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            yield from (item.context_expr for item in node.items)
        elif isinstance(node, ast.stmt) and not hasattr(node, "body"):
            yield node


def _sqlalchemy_builders(tree: ast.AST) -> set[str]:
    """The builders the module imports from SQLAlchemy under their local names (a function of its own
    called `text` builds nothing)."""
    return {alias.asname or alias.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy"
            for alias in node.names if alias.name in BUILDERS}


def _builds(node: ast.AST, imported: set[str]) -> bool:
    """Whether `node` calls a builder: one imported from SQLAlchemy, the model, or a method of that name
    (`session.get`, `items.update()`, `sa.select`)."""
    for call in (sub for sub in ast.walk(node) if isinstance(sub, ast.Call)):
        if isinstance(call.func, ast.Name) and (call.func.id in imported or call.func.id == "MediaItem"):
            return True
        if isinstance(call.func, ast.Attribute) and call.func.attr in BUILDERS:
            return True
    return False


def statements_on_media_items(source: str) -> list[int]:
    """The lines of `source` where a statement that builds a query (or an ORM read or write) names media_items."""
    tree = ast.parse(source)
    derived, imported = _derived_names(tree), _sqlalchemy_builders(tree)
    return sorted({unit.lineno for unit in _units(tree) if _builds(unit, imported) and _names_the_table(unit, derived)})


def test_only_worker_items_builds_statements_on_media_items():
    """Every statement on media_items is in worker/items/ (the predicates, the claim, the reads and the
    writes); the use cases call it and keep what they do with the rows."""
    offenders = {}
    for path in sorted((ROOT / "worker").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if "migrations" in path.parts or relative.startswith(ITEMS_OWNERS):
            continue
        lines = statements_on_media_items(path.read_text())
        if lines:
            offenders[relative] = lines
    assert offenders == {}, f"statements on media_items outside worker/items/: {offenders}"


def test_the_media_items_rule_sees_every_way_of_writing_a_statement():
    """The check finds a statement through a variable, the ORM, SQL text and a model instance, leaves
    statements on other tables alone, and sees worker/items/ itself as full of statements."""
    source = """
from sqlalchemy import func, select, text
from worker import models
from worker.models import AuditEvent, MediaItem

def text_of(value):
    return value.strip()

def purge_sql(where):
    return "DELETE FROM media_items WHERE " + where

def leaks(session, ids):
    items = MediaItem.__table__
    due = items.c.expires_at <= func.now()
    session.scalar(select(func.count()).where(due))
    session.get(MediaItem, "x")
    session.execute(text("DELETE FROM media_items WHERE id = :id"), {"id": "x"})
    session.add(MediaItem(id="x"))
    rows = session.execute(select(models.MediaItem.id).where(models.MediaItem.id.in_(ids))).all()
    for item in session.scalars(select(MediaItem)):
        pass
    session.execute(select(func.now()))
    session.execute(select(AuditEvent.id))
    width = MediaItem.__table__.c.mime_type.type.length
    session.execute(text(purge_sql("state = 'deleted'")))
    return rows, width, text_of(str(width))
"""
    assert statements_on_media_items(source) == [15, 16, 17, 18, 19, 20, 25]
    owned = sum(len(statements_on_media_items(path.read_text())) for path in (ROOT / "worker/items").glob("*.py"))
    assert owned >= 30
