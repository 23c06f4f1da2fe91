"""Beat's schedule: what it sends, how often, and how long a message may wait for a worker."""

from config.schedule import MIN_EXPIRES_S, SCHEDULED_SWEEP_TASK, beat_schedule, expires_after
from config.settings import load_settings


def test_a_one_second_sweep_lives_long_enough_to_cross_a_broker_polled_once_a_second(tmp_path):
    """At a 1 s interval the sweep message must outlive the embedded broker's 1 s poll, or a loaded
    worker receives every sweep just after it expired and Celery drops them all without a word."""
    entry = beat_schedule(load_settings(data_dir=tmp_path, sweep_interval="1s"))["sweep-expired-media"]
    assert entry["task"] == SCHEDULED_SWEEP_TASK and entry["schedule"] == 1.0
    assert entry["options"]["expires"] == MIN_EXPIRES_S


def test_a_long_interval_expires_its_sweep_when_the_next_one_is_due(tmp_path):
    """A sweep that waited a whole interval while workers were down is superseded by the next one."""
    entry = beat_schedule(load_settings(data_dir=tmp_path, sweep_interval="5m"))["sweep-expired-media"]
    assert entry["options"]["expires"] == 300.0
    assert expires_after(3600.0) == 3600.0 and expires_after(0.5) == MIN_EXPIRES_S
