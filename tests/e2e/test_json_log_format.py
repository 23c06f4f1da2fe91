"""The command line's sentences for the operator in JSON log format: one JSON event a line on stderr, the
sentence whole in `message`; on a console the plain sentence, as the contract states it."""

from __future__ import annotations

import json

JSON_LOGS = {"MEDIA_RETENTION_LOG_FORMAT": "json"}


def test_an_error_sentence_is_one_json_error_event_in_json_log_format(shell):
    """`lookup` of an unknown ID exits 3; its sentence on stderr is a `cli.message` event at level error."""
    result = shell("lookup", "never-seen", "--json", env=JSON_LOGS)
    assert result.code == 3 and json.loads(result.stdout)["error"] == "not_found"
    [line] = result.stderr.splitlines()
    event = json.loads(line)
    assert event["event"] == "cli.message" and event["level"] == "error" and event["timestamp"].endswith("Z")
    assert event["message"].startswith("media-retention: ") and "never-seen" in event["message"]


def test_an_error_sentence_stays_a_plain_sentence_on_a_console(shell):
    """Without JSON log format the same failure writes the contract's one sentence."""
    result = shell("lookup", "never-seen", "--json", env={"MEDIA_RETENTION_LOG_FORMAT": "console"})
    assert result.code == 3
    assert result.stderr.startswith("media-retention: ") and "never-seen" in result.stderr and result.stderr.count("\n") == 1


def test_a_hint_is_an_info_event_and_an_error_at_log_level_error_is_still_written(shell):
    """A hint (`apikey list` with no keys) is level info; an operator's sentence is written whatever the log
    level, so a failure is never filtered out of a JSON stream."""
    hint = shell("apikey", "list", env=JSON_LOGS)
    assert [json.loads(line)["level"] for line in hint.stderr.splitlines()] == ["info"]
    failure = shell("lookup", "never-seen", env={**JSON_LOGS, "MEDIA_RETENTION_LOG_LEVEL": "CRITICAL"})
    assert failure.code == 3 and json.loads(failure.stderr)["level"] == "error"
