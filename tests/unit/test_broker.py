"""The embedded broker (worker/broker.py): a consumer never reads a message that is still being written."""

from __future__ import annotations

import threading
import time
from queue import Empty

import pytest
from kombu import Connection
from kombu.transport import filesystem

import worker.broker
from worker.broker import PARTIAL_SUFFIX, Transport

MESSAGES = 10


def channel(transport, directory):
    options = {"data_folder_in": str(directory), "data_folder_out": str(directory),
               "control_folder": str(directory), "store_processed": False}
    return Connection("filesystem://", transport=transport, transport_options=options).default_channel


def race(transport, module, directory, monkeypatch) -> tuple[list, list]:
    """Put MESSAGES messages whose serialisation is slow (a producer descheduled mid-write, as under load)
    while a consumer polls the queue without pause; what the consumer got, and what it raised."""
    serialise = module.dumps

    def slow_dumps(payload):
        time.sleep(0.02)
        return serialise(payload)

    monkeypatch.setattr(module, "dumps", slow_dumps)
    producer, consumer = channel(transport, directory), channel(transport, directory)
    received, errors = [], []

    def consume():
        deadline = time.monotonic() + 10
        while len(received) + len(errors) < MESSAGES and time.monotonic() < deadline:
            try:
                received.append(consumer._get("celery"))
            except Empty:
                pass
            except Exception as exc:  # noqa: BLE001 - what a worker would die of
                errors.append(exc)

    thread = threading.Thread(target=consume)
    thread.start()
    for number in range(MESSAGES):
        producer._put("celery", {"number": number, "body": "x" * 1000})
    thread.join(15)
    return received, errors


def test_a_consumer_polling_while_messages_are_written_gets_each_one_whole(tmp_path, monkeypatch):
    received, errors = race(Transport, worker.broker, tmp_path, monkeypatch)
    assert errors == []
    assert [message["number"] for message in received] == list(range(MESSAGES))
    assert all(message["body"] == "x" * 1000 for message in received)
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))  # nothing left half-written


def test_kombus_own_filesystem_transport_hands_out_a_message_still_being_written(tmp_path, monkeypatch):
    """Why worker/broker.py exists: kombu creates the file, then writes it. When this starts failing, kombu
    writes messages atomically itself and our Channel can go."""
    received, errors = race(filesystem.Transport, filesystem, tmp_path, monkeypatch)
    assert errors, f"kombu's transport delivered all {len(received)} messages whole"
    assert all(type(error).__name__ == "JSONDecodeError" for error in errors)


def test_the_embedded_broker_of_the_app_uses_this_transport(tmp_path):
    from config.settings import load_settings
    from worker.app import create_app

    app = create_app(load_settings(data_dir=tmp_path))
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)


@pytest.mark.parametrize("failing", ["write", "rename"])
def test_a_failed_write_leaves_no_partial_file_and_raises_a_channel_error(tmp_path, monkeypatch, failing):
    from kombu.exceptions import ChannelError

    def no_space(*args):
        raise OSError(28, "No space left on device")

    producer = channel(Transport, tmp_path)
    # The write fails with the partial file open; the rename fails with it written whole.
    monkeypatch.setattr(*((worker.broker, "str_to_bytes") if failing == "write" else (worker.broker.os, "replace")), no_space)
    with pytest.raises(ChannelError):
        producer._put("celery", {"number": 1})
    assert list(tmp_path.iterdir()) == []
