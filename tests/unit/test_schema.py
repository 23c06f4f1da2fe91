"""The schema revision every command checks the catalog against."""

from __future__ import annotations

import subprocess
import sys

from worker import schema


def test_the_head_every_command_checks_against_is_alembics_own_head():
    """worker.schema.HEAD names the newest migration script: a new migration without it fails here."""
    assert schema.HEAD == schema.head_revision()


def test_starting_a_command_loads_neither_alembic_nor_the_migrations():
    """Importing the command line leaves Alembic unloaded: only `db upgrade` (and `run`) pay for it."""
    probe = "import sys, worker.cli; print(sorted(m for m in sys.modules if m.startswith(('alembic', 'worker.migrations'))))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
