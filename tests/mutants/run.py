"""Plant each bug of tests/mutants/mutations.py in a scratch copy of the tree and run the model test there.

    python -m tests.mutants.run [--only NAME ...] [--examples N] [--target NODE ...] [--timeout S]
                                [--json PATH] [--seed N] [--every-target] [--shrink] [--keep] [--list]

The audit's question is whether the model-based test sees each bug, so a mutation is *killed* when a
target fails with it planted and *survives* when every target passes. The unmutated tree runs first:
if it does not pass, no verdict means anything and the run stops there.

What is copied is the working tree as it is, uncommitted edits included (every file git tracks or would
track, nothing it ignores): whoever is rewriting the model test can ask what the rewrite sees before
committing it. Each run gets a fresh directory of its own, so no Hypothesis database, pytest cache or
basetemp of another run is reused, and the copy is imported through PYTHONPATH (checked before each
run, since the main checkout's editable install would otherwise answer `import worker`).

Targets are expanded to test node IDs once, on the unmutated copy, and each node runs in a pytest
process of its own, SQLite first (the model test's order), stopping at the first node that kills
the mutation unless `--every-target`. Each process gets:
- MEDIA_RETENTION_TEST_MODEL_EXAMPLES=N, the model test's budget (its PostgreSQL test runs N // 3);
- MEDIA_RETENTION_TEST_MODEL_TRACE=<file>, which the model test MAY honour by appending one line per
  example it starts; the line count is reported as `examples_traced`;
- Hypothesis' observability (HYPOTHESIS_EXPERIMENTAL_OBSERVABILITY), written to the run's own storage
  directory: the test cases up to the first failing one are the examples it took (`examples_observed`),
  whether or not the model test keeps a trace;
- `--hypothesis-seed`, the same for the baseline and every mutation (printed; `--seed` replays a run);
- unless `--shrink`, MEDIA_RETENTION_TEST_MODEL_SHRINK=0 and the plugin tests.mutants.noshrink (for a test
  that has no such switch): a failure is reported as found, not shrunk for minutes.

The table is printed as markdown at the end and, with `--json`, written with every detail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.mutants.mutations import BY_NAME, ISSUE_19, ISSUE_21, ISSUE_22, ISSUE_23_RULES, MUTATIONS, Mutation, StaleMutation

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TARGETS = ("tests/integration/test_retention_model.py",)
EXAMPLES_ENV = "MEDIA_RETENTION_TEST_MODEL_EXAMPLES"
TRACE_ENV = "MEDIA_RETENTION_TEST_MODEL_TRACE"
# The model test's own switch for Hypothesis' shrink phase ("0": off); tests.mutants.noshrink does the same
# for any Hypothesis test, this one says it in the model test's terms.
SHRINK_ENV = "MEDIA_RETENTION_TEST_MODEL_SHRINK"
# The model test's own default budget (what `make test` runs), so a plain run answers for the suite as it is.
DEFAULT_EXAMPLES = 120
# Per pytest process: a surviving mutation runs the whole budget, which on SQLite is about a minute per
# hundred examples on the 2-core machine; a run this long is stuck, not slow.
DEFAULT_TIMEOUT_S = 1800
# How long a timed-out pytest gets between SIGTERM and SIGKILL.
TERM_GRACE_S = 10
FAILURE_LINE_MAX = 160


# -- the scratch copy ----------------------------------------------------------------------------------


def tree_files(repo: Path) -> list[str]:
    """The working tree's files as git sees them: tracked (as they are now, edits included) and untracked
    but not ignored; tracked files deleted in the working tree are left out."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sorted({name for name in listed if name and (repo / name).is_file()})


def copy_tree(repo: Path, dest: Path) -> None:
    for name in tree_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target, follow_symlinks=False)


# -- one pytest process ----------------------------------------------------------------------------------


@dataclass
class NodeResult:
    node: str
    outcome: str  # passed, failed, error, skipped, timeout
    seconds: float
    examples_traced: int | None = None
    examples_observed: int | None = None
    failure: str | None = None  # the first line of the failure (or error) message
    log: str | None = None  # pytest's output, kept only with --keep

    @property
    def examples(self) -> int | None:
        """Observed counts are exact (up to the first failure); a trace counts every example started."""
        return self.examples_observed if self.examples_observed is not None else self.examples_traced


def _environment(copy: Path, scratch: Path, examples: int, *, shrink: bool = False) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "HYPOTHESIS_")) and name not in (TRACE_ENV, EXAMPLES_ENV, SHRINK_ENV)}
    if not shrink:
        env[SHRINK_ENV] = "0"
    env.update({
        "PYTHONPATH": str(copy),
        EXAMPLES_ENV: str(examples),
        TRACE_ENV: str(scratch / "trace.txt"),
        "HYPOTHESIS_STORAGE_DIRECTORY": str(scratch / "hypothesis"),
    })
    if sys.version_info < (3, 12):
        # Coverage collection would trace every line on Python < 3.12; turning it off also turns observability on.
        env["HYPOTHESIS_EXPERIMENTAL_OBSERVABILITY_NOCOVER"] = "1"
    else:
        env["HYPOTHESIS_EXPERIMENTAL_OBSERVABILITY"] = "1"
    return env


def check_imports(copy: Path, env: dict[str, str]) -> str | None:
    """None when the project's packages import from the copy; otherwise why not (a mutant that does not even
    import, or an interpreter that prefers another checkout)."""
    packages = ("config", "tasks", "tests", "worker")
    probe = subprocess.run([sys.executable, "-c", f"import {', '.join(packages)}; "
                            + "; ".join(f"print({name}.__file__)" for name in packages)],
                           cwd=copy, env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        return f"import failed: {lines[-1] if lines else probe.returncode}"
    for path in probe.stdout.split():
        if not Path(path).resolve().is_relative_to(copy.resolve()):
            return f"imported {path}, not the copy in {copy}: PYTHONPATH does not win over the installed package"
    return None


def _pytest(copy: Path, scratch: Path, args: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, float]:
    """Run pytest in the copy; (exit code or None on timeout, seconds). Output goes to scratch/pytest.log."""
    started = time.monotonic()
    with open(scratch / "pytest.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=copy, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process)
            code = None
        except BaseException:
            _stop(process)
            raise
    return code, time.monotonic() - started


def _stop(process: subprocess.Popen) -> None:
    """End the pytest this runner started and everything it started (its own process group), nothing else."""
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _first_line(text: str | None) -> str | None:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return None


def _junit_outcome(path: Path) -> tuple[str, str | None]:
    """(outcome, first line of its message) of the single test case in a junit report."""
    try:
        case = ET.parse(path).getroot().find(".//testcase")
    except (ET.ParseError, FileNotFoundError):
        return "error", "no junit report (pytest did not get as far as running the test)"
    if case is None:
        return "error", "pytest collected nothing"
    for tag in ("failure", "error", "skipped"):
        found = case.find(tag)
        if found is not None:
            message = found.get("message") or found.text
            return {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], _first_line(message)
    return "passed", None


def _observed_examples(storage: Path) -> int | None:
    """Valid examples Hypothesis ran, up to and including the first failing one (all of them when none
    failed), from its observability log; None when there is none."""
    files = sorted((storage / "observed").glob("*_testcases.jsonl"))
    if not files:
        return None
    count = 0
    for path in files:
        for line in path.read_text().splitlines():
            try:
                status = json.loads(line).get("status")
            except ValueError:
                continue
            if status in ("passed", "failed"):
                count += 1
            if status == "failed":
                return count
    return count


def run_node(copy: Path, scratch: Path, node: str, *, examples: int, seed: int, timeout: float, shrink: bool,
             keep: bool) -> NodeResult:
    scratch.mkdir(parents=True)
    env = _environment(copy, scratch, examples, shrink=shrink)
    args = [node, "-p", "no:cacheprovider", f"--hypothesis-seed={seed}", f"--basetemp={scratch / 'tmp'}",
            f"--junitxml={scratch / 'junit.xml'}", "-q"]
    if not shrink:
        args += ["-p", "tests.mutants.noshrink"]
    code, seconds = _pytest(copy, scratch, args, env, timeout)
    if code is None:
        outcome, failure = "timeout", f"no answer within {timeout:.0f} s"
    else:
        outcome, failure = _junit_outcome(scratch / "junit.xml")
    trace = scratch / "trace.txt"
    log = scratch / "pytest.log"
    return NodeResult(node=node, outcome=outcome, seconds=round(seconds, 1),
                      examples_traced=len(trace.read_text().splitlines()) if trace.exists() else None,
                      examples_observed=_observed_examples(scratch / "hypothesis"),
                      failure=failure[:FAILURE_LINE_MAX * 4] if failure else None,
                      log=str(log) if keep else None)


def collect(copy: Path, scratch: Path, targets: list[str]) -> list[str]:
    """The node IDs the targets name, in pytest's order (the suite's conftest puts the slowest first)."""
    scratch.mkdir(parents=True)
    env = _environment(copy, scratch, DEFAULT_EXAMPLES)
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *targets],
                            cwd=copy, env=env, capture_output=True, text=True)
    nodes = [line.strip() for line in listed.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if listed.returncode != 0 or not nodes:
        sys.exit(f"mutants: collecting {' '.join(targets)} failed (exit {listed.returncode}):\n"
                 f"{listed.stdout[-3000:]}{listed.stderr[-3000:]}")
    return nodes


# -- one mutation (or the baseline) ----------------------------------------------------------------------


@dataclass
class Verdict:
    name: str  # "baseline" for the unmutated tree
    kind: str
    description: str
    result: str  # killed, survived, stale, broken, inconclusive (a node errored, was skipped or timed out); baseline: passed/failed
    seconds: float
    files: list[str] = field(default_factory=list)
    nodes: list[NodeResult] = field(default_factory=list)
    detail: str | None = None  # why stale, broken or inconclusive

    @property
    def killer(self) -> NodeResult | None:
        """The first node that failed with the mutation planted."""
        if self.result != "killed":
            return None
        return next(node for node in self.nodes if node.outcome == "failed")

    @property
    def trouble(self) -> str | None:
        """Why it is not a plain pass: the detail, or the first node that did not pass and its message."""
        if self.detail:
            return self.detail
        failing = next((node for node in self.nodes if node.outcome != "passed"), None)
        return f"{failing.outcome}: {failing.failure}" if failing else None


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="media-retention-mutants-"))
        self.nodes: list[str] = []

    def close(self) -> None:
        if self.args.keep:
            print(f"mutants: scratch copies kept in {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def _copy(self, name: str) -> tuple[Path, Path]:
        scratch = self.root / name
        copy = scratch / "tree"
        copy_tree(REPO, copy)
        return scratch, copy

    def baseline(self) -> Verdict:
        scratch, copy = self._copy("baseline")
        started = time.monotonic()
        problem = check_imports(copy, _environment(copy, scratch, self.args.examples))
        if problem:
            sys.exit(f"mutants: the unmutated copy does not import from itself: {problem}")
        self.nodes = collect(copy, scratch / "collect", self.args.target)
        verdict = Verdict("baseline", "-", "The tree as it is, nothing planted.", "passed", 0.0)
        for index, node in enumerate(self.nodes):
            result = self._run(copy, scratch / f"node-{index}", node)
            verdict.nodes.append(result)
            if result.outcome != "passed":
                verdict.result = "failed"
                break
        verdict.seconds = round(time.monotonic() - started, 1)
        return verdict

    def mutant(self, mutation: Mutation) -> Verdict:
        started = time.monotonic()
        scratch, copy = self._copy(mutation.name)
        try:
            verdict = self._judge(mutation, scratch, copy)
        finally:
            if not self.args.keep:
                shutil.rmtree(scratch, ignore_errors=True)  # a copy and its catalogs per mutation add up
        verdict.seconds = round(time.monotonic() - started, 1)
        return verdict

    def _judge(self, mutation: Mutation, scratch: Path, copy: Path) -> Verdict:
        verdict = Verdict(mutation.name, mutation.kind, mutation.description, "survived", 0.0, files=mutation.files)
        try:
            mutation.apply(copy)
        except StaleMutation as exc:
            verdict.result, verdict.detail = "stale", str(exc)
            return verdict
        problem = check_imports(copy, _environment(copy, scratch, self.args.examples))
        if problem:
            verdict.result, verdict.detail = "broken", problem
            return verdict
        for index, node in enumerate(self.nodes):
            result = self._run(copy, scratch / f"node-{index}", node)
            verdict.nodes.append(result)
            if result.outcome == "failed":
                verdict.result = "killed"
                if not self.args.every_target:
                    break
            elif result.outcome != "passed" and verdict.result == "survived":
                verdict.result = "inconclusive"
                verdict.detail = f"{short(node, self.nodes) or node}: {result.outcome}: {result.failure}"
        return verdict

    def _run(self, copy: Path, scratch: Path, node: str) -> NodeResult:
        return run_node(copy, scratch, node, examples=self.args.examples, seed=self.args.seed, timeout=self.args.timeout,
                        shrink=self.args.shrink, keep=self.args.keep)


# -- reporting ---------------------------------------------------------------------------------------------


def short(node: str, nodes: list[str]) -> str:
    """A node's name short enough for the table: its last three words when those tell the nodes apart
    (`leaks_on_sqlite`, `leaks_on_postgresql` for the model test), else without what all the names share;
    empty when there is only one node, which needs no name."""
    names = [candidate.rsplit("::", 1)[-1] for candidate in nodes]
    name = node.rsplit("::", 1)[-1]
    if len(set(names)) < 2:
        return ""
    tails = ["_".join(candidate.split("_")[-3:]) for candidate in names]
    if len(set(tails)) == len(set(names)):
        return "_".join(name.split("_")[-3:])
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind("_") + 1 if "_" in prefix else len(prefix)
    return name[cut:] or name


def _cell(text: str | None) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= FAILURE_LINE_MAX else text[: FAILURE_LINE_MAX - 1] + "…"


def table(verdicts: list[Verdict], nodes: list[str]) -> str:
    lines = ["| Mutation | Kind | Result | Examples | Time (s) | First line of the failure |",
             "|---|---|---|---|---|---|"]
    for verdict in verdicts:
        killer = verdict.killer
        if killer is not None:
            label = short(killer.node, nodes)
            result = f"killed ({label})" if label else "killed"
            examples = _count(killer.examples)
            failure = killer.failure
        else:
            result = verdict.result
            examples = " / ".join(f"{short(node.node, nodes)} {_count(node.examples)}".strip() for node in verdict.nodes) or "-"
            failure = verdict.trouble
        kind = {ISSUE_19: "#19", ISSUE_21: "#21", ISSUE_22: "#22", ISSUE_23_RULES: "#23", "-": "-"}.get(verdict.kind, "audit")
        lines.append(f"| {verdict.name} | {kind} | {result} | {examples} | {verdict.seconds:.0f} | {_cell(failure)} |")
    return "\n".join(lines)


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()


def write_json(path: Path, args: argparse.Namespace, nodes: list[str], verdicts: list[Verdict]) -> None:
    document = {
        "repository": str(REPO),
        "head": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "examples": args.examples,
        "seed": args.seed,
        "shrink": args.shrink,
        "timeout_s": args.timeout,
        "targets": args.target,
        "nodes": nodes,
        "results": [
            {**{key: value for key, value in asdict(verdict).items() if key != "nodes"},
             "killed_by": verdict.killer.node if verdict.killer else None,
             "examples_to_failure": verdict.killer.examples if verdict.killer else None,
             "nodes": [{**asdict(node), "examples": node.examples} for node in verdict.nodes]}
            for verdict in verdicts
        ],
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


# -- the command -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(BY_NAME), help="run only these mutations")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=f"{EXAMPLES_ENV} for every run (default {DEFAULT_EXAMPLES}, the suite's)")
    parser.add_argument("--target", nargs="+", metavar="NODE", default=list(DEFAULT_TARGETS),
                        help="pytest files or node IDs to run (default: the model test)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per pytest process")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here as JSON")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed for every run (default: random)")
    parser.add_argument("--every-target", action="store_true", help="run every node even after one killed the mutation")
    parser.add_argument("--shrink", action="store_true", help="let Hypothesis shrink a failure (slow)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies and pytest's logs")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mutations = [BY_NAME[name] for name in args.only] if args.only else list(MUTATIONS)
    if args.list:
        for mutation in mutations:
            print(f"{mutation.name:52} {({ISSUE_19: '#19', ISSUE_21: '#21', ISSUE_22: '#22', ISSUE_23_RULES: '#23'}.get(mutation.kind, 'audit')):6} {mutation.description}")
        return 0
    print(f"mutants: {len(mutations)} mutations, {args.examples} examples, seed {args.seed}, tree {REPO}", file=sys.stderr)
    runner = Runner(args)
    verdicts: list[Verdict] = []
    try:
        baseline = runner.baseline()
        verdicts.append(baseline)
        print(f"mutants: baseline {baseline.result} in {baseline.seconds:.0f} s on {', '.join(runner.nodes)}", file=sys.stderr)
        if baseline.result != "passed":
            failed = baseline.nodes[-1]
            print(table(verdicts, runner.nodes))
            if args.json:
                write_json(args.json, args, runner.nodes, verdicts)
            print(f"mutants: the unmutated tree does not pass ({failed.node}: {failed.outcome}: {failed.failure}); "
                  f"no mutation's result would mean anything, so none was run.", file=sys.stderr)
            return 2
        for number, mutation in enumerate(mutations, 1):
            verdict = runner.mutant(mutation)
            verdicts.append(verdict)
            killer = verdict.killer
            print(f"mutants: [{number}/{len(mutations)}] {mutation.name}: {verdict.result}"
                  + (f" by {short(killer.node, runner.nodes) or 'the target'} after {_count(killer.examples)} examples"
                     if killer else "")
                  + f" ({verdict.seconds:.0f} s)", file=sys.stderr)
    finally:
        runner.close()
    print(table(verdicts, runner.nodes))
    if args.json:
        write_json(args.json, args, runner.nodes, verdicts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
