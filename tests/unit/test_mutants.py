"""The mutation list stays in step with the code: a refactor that moves a planted bug's snippet fails here,
not silently in a mutation run that no longer plants anything (tests/mutants)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.mutants.mutations import KINDS, MUTATIONS, Edit, Mutation, StaleMutation

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[mutation.name for mutation in MUTATIONS])
def test_every_snippet_of_every_mutation_occurs_exactly_once_and_the_mutant_still_compiles(mutation):
    """Each edit's `old` occurs once in its file on this tree, and the planted bug is still valid Python
    (a mutant that cannot even be imported would be 'killed' for nothing)."""
    texts = {file: (REPO / file).read_text() for file in mutation.files}
    for edit in mutation.edits:
        assert texts[edit.file].count(edit.old) == 1, f"{mutation.name}: not exactly once in {edit.file}: {edit.old[:120]!r}"
        texts[edit.file] = texts[edit.file].replace(edit.old, edit.new)
    for file, text in texts.items():
        assert text != (REPO / file).read_text(), f"{mutation.name} leaves {file} as it was"
        compile(text, file, "exec")


def test_mutations_have_unique_slug_names_a_known_kind_and_a_one_sentence_description():
    """Names are what `--only` takes and the table shows; kinds sort the audit's bugs from issue #19's reverts."""
    names = [mutation.name for mutation in MUTATIONS]
    assert len(names) == len(set(names))
    for mutation in MUTATIONS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", mutation.name), mutation.name
        assert mutation.kind in KINDS, mutation.name
        assert mutation.description.endswith(".") and mutation.description.count(". ") == 0, mutation.name


def test_applying_a_mutation_to_a_copy_changes_exactly_its_file(tmp_path):
    """The harness plants one bug in a scratch copy: only the mutation's file differs from the tree afterwards."""
    mutation = next(mutation for mutation in MUTATIONS if mutation.name == "claim-cutoff-hour-early")
    copy = tmp_path / "tree"
    shutil.copytree(REPO / "worker", copy / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    assert mutation.apply(copy) == [mutation.file]
    changed = sorted(str(path.relative_to(copy)) for path in copy.rglob("*.py")
                     if path.read_bytes() != (REPO / path.relative_to(copy)).read_bytes())
    assert changed == [mutation.file]
    assert mutation.new in (copy / mutation.file).read_text()


def test_a_stale_mutation_refuses_and_changes_nothing(tmp_path):
    """A snippet that no longer occurs once stops the mutation before any file is written, even when an
    earlier edit of the same mutation still applies."""
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\ny = 2\n")
    stale = Mutation(name="stale", description="Nothing.", file="a.py", old="x = 1", new="x = 2", kind=KINDS[0],
                     also=(Edit("b.py", "y = 2", "y = 3"),))
    with pytest.raises(StaleMutation, match="occurs 2 times in b.py"):
        stale.apply(tmp_path)
    assert (tmp_path / "a.py").read_text() == "x = 1\n" and (tmp_path / "b.py").read_text() == "y = 2\ny = 2\n"


FAKE_MODEL_TEST = '''
import os

from hypothesis import Phase, given, settings, strategies as st


@settings(max_examples=int(os.environ["MEDIA_RETENTION_TEST_MODEL_EXAMPLES"]), phases=list(Phase))
@given(st.integers(0, 100))
def test_fake_model(n):
    with open(os.environ["MEDIA_RETENTION_TEST_MODEL_TRACE"], "a") as trace:
        trace.write(f"{n}\\n")
    shrinking = Phase.shrink in settings(phases=list(Phase)).phases
    assert n < 50, f"n is {n}, shrinking {'on' if shrinking else 'off'}"
'''


def test_a_failing_target_is_reported_failed_with_its_message_and_how_many_examples_it_took(tmp_path):
    """One pytest process of the harness on a stand-in model test: the failure's first line, the examples
    Hypothesis ran up to it (observed, and as the test traced them), and shrinking turned off."""
    from tests.mutants.run import run_node

    copy = tmp_path / "tree"
    for name in ("tests/__init__.py", "tests/mutants/__init__.py", "tests/mutants/noshrink.py"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, copy / name)
    (copy / "test_fake_model.py").write_text(FAKE_MODEL_TEST)
    result = run_node(copy, tmp_path / "scratch", "test_fake_model.py::test_fake_model", examples=200, seed=1,
                      timeout=120, shrink=False, keep=False)
    assert result.outcome == "failed", result
    assert result.failure.startswith("AssertionError: n is ") and result.failure.endswith("shrinking off"), result.failure
    assert 1 <= result.examples_observed <= result.examples_traced < 200, result
