"""The install is reproducible: the field venv (tests/field/conftest.py) installs the runtime lock with its
hashes checked, then the wheel with --no-deps, as the Dockerfile and the README's production install do."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.field.conftest import RUNTIME_LOCK, Installed

ROOT = Path(__file__).resolve().parents[2]
TEST_LOCK = ROOT / "requirements-test.lock"


def pins(lock: Path) -> dict[str, str]:
    """`name==version` of every requirement of a lock, names normalized (PEP 503)."""
    found = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock.read_text(), re.MULTILINE)
    assert found, f"no pins in {lock}"
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in found}


def installed_versions(installed: Installed) -> dict[str, str]:
    listed = subprocess.run([installed.bin("pip"), "list", "--format", "json", "--disable-pip-version-check"],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    return {re.sub(r"[-_.]+", "-", entry["name"]).lower(): entry["version"] for entry in json.loads(listed)}


def test_the_installed_product_has_exactly_the_runtime_locks_versions_and_pip_check_passes(installed):
    """Every package of the field venv but ours and pip's own tools is pinned by requirements.lock at the version
    installed, every pin is installed, and pip finds every requirement of every package satisfied."""
    versions = installed_versions(installed)
    assert versions.pop("media-retention") == "0.1.0"
    for tool in ("pip", "setuptools", "wheel"):
        versions.pop(tool, None)
    assert versions == pins(RUNTIME_LOCK)
    check = subprocess.run([installed.bin("pip"), "check", "--disable-pip-version-check"], check=False, capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_test_lock_pins_every_runtime_package_at_the_runtime_locks_version():
    """The suite (`make install` installs requirements-test.lock) runs on the versions production installs."""
    runtime, test = pins(RUNTIME_LOCK), pins(TEST_LOCK)
    assert {name: test.get(name) for name in runtime} == runtime
    assert len(test) > len(runtime)  # the test extras on top


def test_every_pin_of_both_locks_carries_a_hash():
    """`pip install --require-hashes` refuses a lock with an unhashed requirement; so does this test, earlier."""
    for lock in (RUNTIME_LOCK, TEST_LOCK):
        requirements = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().split("\n", 2)[2])
        unhashed = [entry.split(" ", 1)[0] for entry in requirements if "==" in entry and "--hash=sha256:" not in entry]
        assert unhashed == [], f"{lock.name}: no hash for {unhashed}"


def test_the_dockerfile_installs_the_runtime_lock_with_hashes_then_the_package_without_dependencies():
    """The image installs what this module's venv installs (no Docker here to build it: its RUN line is read)."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"^COPY requirements\.lock .*/src/$", dockerfile, re.MULTILINE)
    [install] = re.findall(r"^RUN (pip install .*)$", dockerfile, re.MULTILINE)
    steps = [step.strip() for step in install.split("&&")]
    assert steps[0] == "pip install --no-cache-dir --require-hashes -r /src/requirements.lock"
    assert steps[1] == "pip install --no-cache-dir --no-deps /src"
