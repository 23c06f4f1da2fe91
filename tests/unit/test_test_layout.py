"""The suites share helpers through support modules (tests/factories.py, tests/*_support.py, tests/e2e/support.py,
tests/deploy_files.py, ...), never by importing another test module: importing one runs its module-level code,
drags its fixtures into the importer's namespace, and ties two suites together by accident."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def is_test_module(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return dotted.startswith("tests.") and (last.startswith(("test_", "bench_")))


def test_no_module_of_the_suite_imports_a_test_or_benchmark_module():
    offenders = {
        str(path.relative_to(TESTS)): sorted(name for name in imported_modules(path) if is_test_module(name))
        for path in TESTS.rglob("*.py")
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, offenders


def test_the_layout_check_sees_an_import_of_a_test_module(tmp_path):
    module = tmp_path / "test_x.py"
    module.write_text("from tests.integration.test_serve import start_server\nimport tests.unit.test_docs\n")
    assert {name for name in imported_modules(module) if is_test_module(name)} == {
        "tests.integration.test_serve", "tests.unit.test_docs"}
