"""The deploy files run commands that exist, with the app and settings this code has."""

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from config.settings import Settings
from worker.cli import cli

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
