"""Operator commands with --enqueue: what lands on a Redis broker (fakeredis standing in for the server)."""

import base64
import json

import fakeredis
import kombu.transport.redis
import pytest

import worker.app
from config.settings import get_settings


@pytest.fixture
def broker(data_dir, monkeypatch):
    """A fake Redis server behind kombu's real Redis transport, and an app configured for it."""
    server = fakeredis.FakeServer()
    monkeypatch.setattr(kombu.transport.redis.Channel, "_create_client",
                        lambda self, asynchronous=False: fakeredis.FakeRedis(server=server))
    monkeypatch.setenv("MEDIA_RETENTION_BROKER_URL", "redis://broker.invalid:6379/0")
    get_settings.cache_clear()
    monkeypatch.setattr(worker.app, "app", worker.app.create_app(get_settings()))
    return fakeredis.FakeRedis(server=server)


def queued(client) -> list[dict]:
    """Messages waiting on the default queue, decoded: task name, id, content type and kwargs."""
    messages = []
    for raw in client.lrange("celery", 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        messages.append({"task": envelope["headers"]["task"], "id": envelope["headers"]["id"],
                         "content_type": envelope["content-type"], "args": args, "kwargs": kwargs})
    return messages


def test_sweep_enqueue_sends_one_json_message_naming_the_task(cli, broker):
    """`sweep --enqueue --limit 5` queues one JSON message for media_retention.sweep and prints its id."""
    result = cli("sweep", "--enqueue", "--limit", "5", "--json")
    assert result.code == 0, result.stderr
    [message] = queued(broker)
    assert message == {"task": "media_retention.sweep", "id": result.json["task_id"], "content_type": "application/json",
                       "args": [], "kwargs": {"limit": 5}}


def test_purge_enqueue_validates_first_and_sends_who_asked(cli, broker, tmp_path):
    """A purge of an unknown ID sends nothing; a valid one carries the IDs and the actor."""
    upload = tmp_path / "a.jpg"
    upload.write_bytes(b"a")
    cli("org", "set", "acme")
    cli("register", "--org", "acme", "--file", str(upload), "--id", "img-1")
    assert cli("purge", "img-1", "ghost", "--yes", "--enqueue").code == 3
    assert queued(broker) == []
    result = cli("purge", "img-1", "--yes", "--enqueue", "--by", "ops", "--json")
    assert result.code == 0, result.stderr
    [message] = queued(broker)
    assert (message["task"], message["kwargs"]) == ("media_retention.purge", {"ids": ["img-1"], "org": None, "actor": "ops"})
    assert cli("lookup", "img-1").code == 0, "an enqueued purge must not run here"


def test_enqueue_with_dry_run_is_bad_input_and_sends_nothing(cli, broker):
    """--dry-run runs locally by definition; combined with --enqueue it is refused."""
    assert cli("sweep", "--enqueue", "--dry-run").code == 2
    assert queued(broker) == []
