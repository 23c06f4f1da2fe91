"""Errors the catalog and CLI share; each maps to one exit code of the command line."""


class RetentionError(Exception):
    """Base class: `str(error)` is the one-sentence message shown to the operator."""

    exit_code = 1


class BadInput(RetentionError):
    """The caller asked for something invalid; nothing was changed (exit 2)."""

    exit_code = 2


class BlobExists(BadInput):
    """A write found a blob already at its key (no upload ever replaces one)."""


class NotFound(RetentionError):
    """The media ID or organization was never seen (exit 3)."""

    exit_code = 3


class Gone(RetentionError):
    """The media ID existed but is claimed for deletion or deleted (exit 3)."""

    exit_code = 3

    def __init__(self, message: str, tombstone=None):
        super().__init__(message)
        # The `worker.catalog.Tombstone` a lookup found (None when a hold refused a deleted item):
        # the edges (CLI, HTTP) render their 404 body from it.
        self.tombstone = tombstone


class StoreError(RetentionError):
    """The blob store failed in a way that is not the caller's fault (exit 1)."""


class MediaRootMissing(StoreError):
    """The media root is not there (a volume not mounted, a wrong setting): it is never created, and every
    command that needs it refuses, changing nothing (exit 2, like a bad setting)."""

    exit_code = 2
