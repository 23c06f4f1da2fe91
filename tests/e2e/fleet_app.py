"""`worker.app` as deployed, plus a journaling store: the fleet tests start real `celery worker`
and `celery beat` processes with `-A tests.e2e.fleet_app`.

Every blob a worker process really deletes (not "already missing") is appended to a file of its
own in FLEET_TEST_JOURNAL, so a test can prove no blob was deleted twice across the fleet.
FLEET_TEST_PAUSE_AFTER_DELETE holds each batch between delete and finalize, so a test can kill
a worker in exactly that window (`<pid>.paused` in the journal directory says a batch is held).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

# worker.app first, as `celery -A worker.app` does: it prepares prometheus-client's multiprocess
# mode, which only works before anything imports prometheus-client.
from worker.app import app  # noqa: F401, I001 - the Celery app this module exposes
from worker import runtime  # noqa: I001
from worker.engine import store_options
from worker.store import open_store
from worker.store.fs import FilesystemStore


class JournalingStore(FilesystemStore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held = threading.Lock()

    def delete_many(self, keys):
        pause = float(os.environ.get("FLEET_TEST_PAUSE_AFTER_DELETE", "0"))
        if not pause:
            return self._journaled(keys)
        # A sweep keeps two batches' deletes in flight. While one batch is held, the other waits here
        # before deleting anything: a worker SIGKILLed in the hold must not be halfway through another
        # batch, whose deleted blobs would be missing from the journal (a flake: 529 of 600 journaled).
        with self._held:
            results = self._journaled(keys)
            (Path(os.environ["FLEET_TEST_JOURNAL"]) / f"{os.getpid()}.paused").touch()
            time.sleep(pause)
        return results

    def _journaled(self, keys):
        results = super().delete_many(keys)
        journal = Path(os.environ["FLEET_TEST_JOURNAL"]) / f"{os.getpid()}.log"
        with open(journal, "a") as handle:
            handle.write("".join(f"{r.key}\n" for r in results if r.ok and not r.missing))
        return results


def _journaling_store(settings):
    store = open_store(settings.storage_url, **store_options(settings))
    return JournalingStore(store.root, delete_threads=2) if isinstance(store, FilesystemStore) else store


runtime.use_store(_journaling_store)
