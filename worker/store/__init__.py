"""One blob-store interface; each backend is a module (`fs`, `s3`) built by `open_store(url)`."""

from __future__ import annotations

import abc
import errno
import hashlib
import os
import stat as stat_module
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from config.errors import BadInput, BlobExists, RetentionError, StoreError
from config.storage import check_storage_url

if TYPE_CHECKING:
    from worker.volume.levels import Usage


# The file at the top of a store that names the catalog it belongs to (worker/binding.py). Listings never
# show it and no key may take its name (worker/store/keys.py), so nothing registers, adopts or deletes it.
MARKER_NAME = ".media-retention.json"


@dataclass(frozen=True)
class DeleteResult:
    """The outcome for one key. `ok` covers "was already missing" (`missing=True`) as well."""

    key: str
    ok: bool
    missing: bool = False
    error: str | None = None
    # A delete the store refused because the version is locked (S3 Object Lock): 'retention' (until
    # `locked_until`) or 'legal_hold' (no date). Never ok: the bytes are still there.
    lock_reason: str | None = None
    locked_until: datetime | None = None


# What to delete: a key and, on a versioned store, the version the catalog recorded for it (None: every
# version of the key, on a store that keeps versions; just the key elsewhere).
DeleteTarget = tuple[str, "str | None"]


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    # When the blob was last written; reconciliation leaves blobs younger than its grace alone.
    modified: datetime | None = None
    # Its modification time as the store reports it (filesystem st_mtime; S3 LastModified, which is
    # `modified` too): what `adopt` takes for the creation time of media that has no catalog row.
    mtime: datetime | None = None
    # The object store's version ID of the blob (a versioned bucket; "null" on a suspended one), else None.
    version: str | None = None
    # On a versioned bucket, what the key holds besides: `current` is False when its latest entry is a delete
    # marker (the key reads as missing, yet older versions may keep the bytes); `versions` counts the versions
    # that hold bytes (current or not), `delete_markers` the markers.
    current: bool = True
    versions: int = 1
    delete_markers: int = 0

    @property
    def modification_time(self) -> datetime | None:
        return self.mtime or self.modified


@dataclass(frozen=True)
class PartialUpload:
    """What a killed upload leaves behind: a filesystem temporary file (`key` is its path in the
    root) or an S3 multipart upload never completed (`key` is its target, `upload_id` names it)."""

    key: str
    started: datetime | None
    size: int = 0
    upload_id: str | None = None


@dataclass(frozen=True)
class BlobDigest:
    size: int
    sha256: str


@dataclass(frozen=True)
class StoredFile:
    """What `put_files` did with one file: wrote it (`written`), or found the key already holding a blob
    and left that alone (`written=False`: the caller adopts it when its digest is the file's, or refuses)."""

    key: str
    size: int
    sha256: str  # of the file as it was read and copied
    written: bool
    version: str | None = None  # the version the store gave the blob it wrote (a versioned bucket)


# Kernel and virtual filesystems: their "regular" files are views of the running system (/proc/self/environ
# is the reading process's environment, secrets included; /sys and cgroup files are kernel state), never
# media, so no registration reads one.
PSEUDO_FILESYSTEMS = frozenset({
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs",
    "bpf", "pstore", "efivarfs", "fusectl", "mqueue", "binfmt_misc", "autofs", "rpc_pipefs", "nsfs", "selinuxfs",
})
_filesystem_types: dict[int, str | None] = {}  # st_dev -> filesystem type, from /proc/self/mountinfo


def filesystem_type(device: int) -> str | None:
    """The type of the mounted filesystem with this st_dev (Linux's mountinfo), None where unknown. Read again
    only for a device not seen before, so a million files of one volume read mountinfo once."""
    if device not in _filesystem_types:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
                for line in mounts:
                    # "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
                    fields, _, tail = line.partition(" - ")
                    major, _, minor = fields.split()[2].partition(":")
                    _filesystem_types.setdefault(os.makedev(int(major), int(minor)), tail.split()[0] if tail else None)
        except (OSError, ValueError, IndexError):
            pass
        _filesystem_types.setdefault(device, None)
    return _filesystem_types[device]


def open_source(path: Path, what: str = "file"):
    """Open a file to read only if it is a regular file of a real filesystem (no FIFO, device, socket,
    directory, nor a /proc or /sys file). O_NONBLOCK: opening a FIFO without a writer (or a device) must not
    hang; the check on the open descriptor cannot be raced by a swap."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # what opening a Unix socket answers
            raise BadInput(f"{what} {str(path)!r} is not a regular file (a socket).") from None
        raise BadInput(f"cannot read {what} {str(path)!r}: {exc.strerror}.") from None
    info = os.fstat(fd)
    mode = info.st_mode
    if not stat_module.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat_module.S_ISDIR(mode) else "a FIFO" if stat_module.S_ISFIFO(mode) else \
            "a device" if stat_module.S_ISCHR(mode) or stat_module.S_ISBLK(mode) else "not a file"
        raise BadInput(f"{what} {str(path)!r} is not a regular file ({kind}).")
    kind = filesystem_type(info.st_dev)
    if kind in PSEUDO_FILESYSTEMS:
        os.close(fd)
        raise BadInput(f"{what} {str(path)!r} is not a regular file (a file of the kernel's {kind} filesystem, not media).")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_source(path: Path, what: str = "file") -> None:
    """Raise BadInput unless `path` is a regular file of a real filesystem that can be read (`open_source`)."""
    open_source(path, what).close()


def source_digest(path: Path) -> BlobDigest:
    """Size and sha256 of a local file, read once through `open_source`."""
    with open_source(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        return BlobDigest(size=size, sha256=hashlib.file_digest(handle, "sha256").hexdigest())


class BlobStore(abc.ABC):
    """Where media bytes live. Every key is validated; nothing outside the root/prefix is touched."""

    url: str

    @abc.abstractmethod
    def put_file(self, key: str, source: Path) -> int:
        """Copy a local file to `key` (atomically: readers never see half a blob); return its size."""

    def put_files(self, files: Sequence[tuple[str, Path]], written: list[str]) -> list[StoredFile]:
        """Copy each local file to its key (never over an existing blob: that key comes back with
        `written=False`); a result per file, in order. Every key that gets a blob from this call is appended
        to `written` the moment it has it, so after an error the caller knows exactly what this call wrote.
        The store never deletes a blob on its own: whether a blob may go is the catalog's decision (the
        caller removes what it wrote only while its reservation of the key holds, worker/reservations.py),
        since another registration of the same key may already have adopted it. Stores may do it faster than
        one `put_file` at a time (the filesystem makes a whole batch durable with two syncs instead of one per file)."""
        stored: list[StoredFile] = []
        for key, source in files:
            digest = source_digest(source)
            try:
                blob = self.put_blob(key, source)
            except BlobExists:
                stored.append(StoredFile(key, digest.size, digest.sha256, written=False))
            else:
                written.append(key)
                stored.append(StoredFile(key, blob.size, digest.sha256, written=True, version=blob.version))
        return stored

    def put_blob(self, key: str, source: Path) -> BlobInfo:
        """`put_file`, answered with what the store holds now (an object store adds the version it wrote)."""
        return BlobInfo(key=key, size=self.put_file(key, source))

    @abc.abstractmethod
    def stat(self, key: str) -> BlobInfo | None:
        """Size of the blob at `key`, or None when there is none."""

    @abc.abstractmethod
    def delete_many(self, keys: list[str]) -> list[DeleteResult]:
        """Delete each key; a result per key, in order. A missing blob counts as deleted."""

    def delete_targets(self, targets: Sequence[DeleteTarget]) -> list[DeleteResult]:
        """The delete primitive: each (key, version) target; a result per target, in order. A store that keeps
        no versions deletes the keys (`delete_many`); a versioned one deletes exactly the version named, or
        every version and delete marker of the key when none is named, so nothing of the blob stays behind."""
        return self.delete_many([key for key, _ in targets])

    def versioning(self) -> str:
        """Whether the store keeps old versions of a blob: "n/a" (a filesystem), "off" (a bucket that never had
        versioning), "Enabled" or "Suspended" (S3's states), "unknown" (the store would not say)."""
        return "n/a"

    def object_lock(self) -> bool:
        """Whether the store may refuse to delete a version (S3 Object Lock is enabled on the bucket)."""
        return False

    def default_retention(self) -> "timedelta | None":
        """How long the store itself locks each new blob (S3 Object Lock default retention), None if it does not."""
        return None

    def describe(self) -> dict:
        """What `status` and `volume` say about the store's deletion semantics."""
        return {"versioning": self.versioning(), "object_lock": self.object_lock()}

    @abc.abstractmethod
    def iter_keys(self, *, ordered: bool = False, partial_uploads: bool = False) -> Iterator[BlobInfo | PartialUpload]:
        """Every blob under the root/prefix, lazily. With `ordered`, in ascending key order (code
        points, which is UTF-8 byte order: how S3 lists and how the catalog's key index is sorted),
        so `verify` can merge the listing with the catalog instead of looking keys up one by one.
        With `partial_uploads`, the leftovers of killed uploads come too (in no particular order),
        so reconcile finds them in the same walk."""

    def discard_partial_uploads(self, uploads: list[PartialUpload]) -> list[DeleteResult]:
        """Remove leftovers of killed uploads; a result per upload. Never touches a blob."""
        return [DeleteResult(upload.key, ok=False, error="this store leaves no partial uploads") for upload in uploads]

    def remains(self, key: str) -> BlobInfo | None:
        """What is left of `key` in any version, or None when nothing is: on a store without versions, its blob;
        on a versioned bucket also noncurrent versions and delete markers (`verify` asks this of a tombstone)."""
        return self.stat(key)

    def stat_many(self, keys: Sequence[str]) -> "list[BlobInfo | None | RetentionError]":
        """`stat` of each key, in order; a key the store refuses (or cannot read) answers with its error
        instead of raising, so one bad key among thousands is that key's answer. Stores override it to
        do it faster: a filesystem walks from one root descriptor, an object store asks concurrently."""
        answers: list[BlobInfo | None | RetentionError] = []
        for key in keys:
            try:
                answers.append(self.stat(key))
            except RetentionError as exc:
                answers.append(exc)
        return answers

    def digest(self, key: str) -> BlobDigest | None:
        """Size and sha256 of the blob at `key` (reads it whole), or None when there is none."""
        raise StoreError(f"{self.url} cannot read blobs back")

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    # Only object stores can hand out presigned URLs; callers check this before any other work.
    can_presign = False
    # Whether reading the binding marker is as cheap as a local stat (worker/binding.py then reads it at every
    # check, instead of trusting a verified one for a minute).
    cheap_marker = False

    def presigned_url(self, key: str, expires_in: int) -> str:
        """A GET URL for `key`, valid for `expires_in` seconds, that needs no other credentials."""
        raise BadInput(f"presigned URLs need an object store (s3://...); {self.url} cannot hand them out.")

    @abc.abstractmethod
    def read_marker(self) -> bytes | None:
        """The binding marker at the top of the store (MARKER_NAME), or None when there is none."""

    @abc.abstractmethod
    def write_marker(self, content: bytes) -> bool:
        """Write the binding marker unless one is there already (never replaced); False when one was."""

    def usage(self) -> "Usage | None":
        """How full the volume under the store is, when the store can tell (a filesystem: `statvfs`).
        None for an object store, which has no size of its own: the volume monitor then measures the
        catalog's live media against the configured capacity."""
        return None

    def close(self) -> None:
        """Release pools and threads."""


def open_store(url: str, **options) -> BlobStore:
    """Build the store for `file:///abs/path` or `s3://bucket[/prefix]`. `protected` (what -> path)
    names files a filesystem root must not contain: the catalog, the data dir."""
    check_storage_url(url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from worker.store.fs import FilesystemStore

        return FilesystemStore(Path(unquote(parsed.path)), delete_threads=options.get("delete_threads", 8),
                               protected=options.get("protected"), create=options.get("create", False))
    from worker.store.s3 import S3Store

    return S3Store.from_url(url, **options)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
