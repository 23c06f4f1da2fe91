"""Filesystem blob store: a media root on a local disk, NFS or EFS volume.

Every path operation walks from the root one directory at a time with `O_NOFOLLOW`, holding
directory file descriptors, so neither a `..` nor a symlinked directory (planted before or during
the operation) can make it touch anything outside the root.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import math
import os
import secrets
import stat as stat_module
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from config.errors import BadInput, BlobExists, MediaRootMissing, RetentionError, StoreError
from worker.store import MARKER_NAME, BlobDigest, BlobInfo, BlobStore, DeleteResult, PartialUpload, StoredFile, open_source
from worker.store.keys import TEMP_NAME, TEMP_PREFIX, validate_key
from worker.volume.filesystem import filesystem_usage
from worker.volume.levels import Usage

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A batch's deletes go to the threads in runs: about four runs a thread balance a slow disk's stragglers,
# and no run shorter than this, so a small batch is not cut into single keys.
DELETE_RUNS_PER_THREAD = 4
DELETE_RUN_MIN = 16
# Batches of at least this many files are made durable by two syncs of the volume (see put_files); fewer
# are fsynced one by one, which is cheaper than syncing a whole busy volume for a handful.
BATCH_SYNC_MIN = 16
COPY_CHUNK = 1024 * 1024


def _libc_syncfs():
    """libc's syncfs(2) (Linux), or None where there is none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True), "syncfs", None)
    except OSError:
        return None


_SYNCFS = _libc_syncfs()


def _written_at(info: os.stat_result) -> datetime:
    """When a blob was last written, as far as anyone can tell: the later of its modification time,
    which `touch -d` or `cp -p` can set to any moment, and its change time, which nobody can set
    (the kernel stamps it on every write, rename or chmod). Reconcile deletes orphans by this age,
    so a freshly copied file with an old mtime must not look old."""
    return datetime.fromtimestamp(max(info.st_mtime, info.st_ctime), timezone.utc)


def _is_dir(entry: os.DirEntry) -> bool:
    """A real directory (never a symlink to one); an entry gone since it was listed is not one."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except FileNotFoundError:
        return False


def _name_real_path(exc: OSError, directory: Path) -> None:
    """Make `exc` name the real path. A call relative to a directory descriptor (openat, mkdirat, unlinkat) names
    only the entry, so an operator would read "Read-only file system (7f)" instead of the directory's path."""
    for attribute in ("filename", "filename2"):
        name = getattr(exc, attribute)
        if isinstance(name, str) and not os.path.isabs(name):
            setattr(exc, attribute, str(directory / name))
        elif isinstance(name, int):  # the descriptor itself (fstat, scandir): the directory
            setattr(exc, attribute, str(directory))


class _Escape(Exception):
    """A key step is a symlink or not a directory: following it could leave the root."""


# A media root is a directory reconcile may empty of everything no item names, so it must never be
# one that holds the system or everyone's files. These directories themselves are refused...
_SYSTEM_DIRECTORIES = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/cache", "/var/lib",
    "/var/log", "/var/mail", "/var/spool", "/var/tmp",
})
# ...and so is anything below these, which only ever hold the operating system.
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys", "/usr")


def check_media_root(root: Path, protected: dict[str, Path] | None = None) -> Path:
    """The root, resolved, or BadInput when it is a system directory, a home directory, or one that
    holds something the worker must never delete (`protected`: what it is -> where)."""
    real = Path(os.path.realpath(Path(root).expanduser().absolute()))
    text = str(real)
    if text in _SYSTEM_DIRECTORIES or any(text.startswith(tree + "/") for tree in _SYSTEM_TREES):
        raise BadInput(f"refusing media root {text}: it is a system directory; give the media a directory of its own, "
                       f"e.g. /var/lib/media-retention/media.")
    if real.parent == Path("/home") or real == Path(os.path.realpath(Path.home())):
        raise BadInput(f"refusing media root {text}: it is a home directory; give the media a directory of its own.")
    for what, path in (protected or {}).items():
        held = Path(os.path.realpath(path))
        if held == real or real in held.parents:
            raise BadInput(f"refusing media root {text}: it contains {what} {held}, which reconcile would delete; "
                           f"give the media a directory of its own.")
    return real


class FilesystemStore(BlobStore):
    cheap_marker = True

    def __init__(self, root: Path, delete_threads: int = 8, protected: dict[str, Path] | None = None,
                 create: bool = False):
        # Checked before anything else: a refused root is not touched at all. The root itself may be a
        # symlink (e.g. /mnt/wa/media): it is resolved once and trusted from then on. A root that is not
        # there is an error at its first use, never created: a volume that is not mounted would otherwise
        # get its media written to the disk beneath the mount point, and lose it when the volume comes back.
        # Only the embedded default (`<data dir>/media`, which nothing mounts) is created (`create`).
        self.root = check_media_root(root, protected)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()
        self._threads = delete_threads
        self._pool: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def _parent_dir(self, key: str, create: bool = False, root_fd: int | None = None) -> Iterator[tuple[int, str]]:
        """Yield (fd of the key's directory, file name); raises FileNotFoundError or _Escape. `root_fd`, an
        open descriptor of the root, saves opening it again (a batch of deletes shares one); it stays open."""
        *dirs, name = validate_key(key).split("/")
        fd = self._open_root() if root_fd is None else root_fd
        directory = self.root
        try:
            for part in dirs:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Escape(f"storage key {key!r} passes through {part!r}, which is a symlink or a file") from None
                    raise
                if fd != root_fd:
                    os.close(fd)
                fd, directory = child, directory / part
            yield fd, name
        except OSError as exc:  # from the steps and from the caller's calls relative to `fd` alike
            _name_real_path(exc, directory)
            raise
        finally:
            if fd != root_fd:
                os.close(fd)

    def _open_root(self) -> int:
        """A descriptor of the media root; MediaRootMissing when it is not there (an unmounted volume)."""
        try:
            return os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            raise MediaRootMissing(f"the media root {self.root} does not exist: is its volume mounted? It is never created "
                             f"here; create it (or fix MEDIA_RETENTION_STORAGE_URL) and try again.") from None

    def _write_temp(self, key: str, source: Path, *, durable: bool) -> tuple[str, int, str]:
        """Copy `source` to a temporary file beside the key's blob, hashing it on the way; (temp name,
        size, sha256). With `durable`, fsynced before it returns. A failed copy (ENOSPC, EIO) removes it:
        a partial temp file must not fill the volume further. The name (TEMP_NAME: the prefix and 16 random
        hex digits) is one no key can take (worker/store/keys.py), so the file is ours by construction."""
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        hasher = hashlib.sha256()
        with self._parent_dir(key, create=True) as (dir_fd, _name):
            out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
            try:
                with open_source(source) as src, open(out, "wb", closefd=False) as dst:
                    while chunk := src.read(COPY_CHUNK):
                        hasher.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    if durable:
                        os.fsync(out)
                size = os.fstat(out).st_size
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
            finally:
                os.close(out)
        return temp, size, hasher.hexdigest()

    def _link_temp(self, key: str, temp: str) -> bool:
        """Give the temporary file its key's name; False (and the temp file gone) when the key already
        holds a blob. link() never replaces an existing blob, unlike rename()."""
        with self._parent_dir(key) as (dir_fd, name):
            try:
                os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(temp, dir_fd=dir_fd)

    def _discard_temp(self, key: str, temp: str) -> None:
        with contextlib.suppress(OSError, _Escape, StoreError), self._parent_dir(key) as (dir_fd, _name):
            os.unlink(temp, dir_fd=dir_fd)

    def _sync(self) -> None:
        """Everything written on the media volume reaches the disk (syncfs; a full sync where there is none)."""
        fd = self._open_root()
        try:
            if _SYNCFS is None:
                os.sync()
            elif _SYNCFS(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error), str(self.root))
        finally:
            os.close(fd)

    def put_file(self, key: str, source: Path) -> int:
        try:
            temp, size, _sha256 = self._write_temp(key, source, durable=True)
            if not self._link_temp(key, temp):
                raise BlobExists(f"a blob already exists at storage key {key!r}; refusing to overwrite it.")
            return size
        except _Escape as exc:
            raise BadInput(f"{exc}; refusing to follow it out of the media root.") from None

    def put_files(self, files: Sequence[tuple[str, Path]], written: list[str]) -> list[StoredFile]:
        """A batch goes in three steps: every file to a temporary name (not synced), one sync of the volume,
        every temporary file linked to its key, one more sync; an fsync per file instead costs a journal
        commit each (measured here: ~700 files/s against ~10,000). A blob is complete before it has its
        name, so a crash leaves only whole blobs under keys (adopted by a re-run) and temporary files
        (removed by reconcile). Small batches are synced file by file, which costs no more. On an error the
        temporary files go (nobody else can have them); blobs already linked stay, named in `written`."""
        batched = len(files) >= BATCH_SYNC_MIN
        temps: list[tuple[str, str, int, str]] = []
        stored: list[StoredFile] = []
        try:
            for key, source in files:
                temp, size, sha256 = self._write_temp(key, source, durable=not batched)
                temps.append((key, temp, size, sha256))
            if batched:
                self._sync()
            for index, (key, temp, size, sha256) in enumerate(temps):
                linked = self._link_temp(key, temp)
                temps[index] = (key, "", size, sha256)  # linked or removed: nothing left to discard
                if linked:
                    written.append(key)
                stored.append(StoredFile(key, size, sha256, linked))
            if batched:
                self._sync()
        except BaseException as exc:
            for key, temp, _size, _sha256 in temps:
                if temp:
                    self._discard_temp(key, temp)
            if isinstance(exc, _Escape):
                raise BadInput(f"{exc}; refusing to follow it out of the media root.") from None
            raise
        return stored

    def stat_many(self, keys: Sequence[str]) -> list[BlobInfo | None | RetentionError]:
        """Every key's stat from one descriptor of the root, in this thread: a local stat costs less than
        handing it to another. Keys are asked directory by directory in sorted order, keeping the chain of
        open directories from the root, so siblings (`ab/cd/...` and `ab/ce/...`) share their parents'
        descriptors instead of walking from the root again: half the syscalls of a sharded tree."""
        root_fd = self._open_root()
        answers: list[BlobInfo | None | RetentionError] = [None] * len(keys)
        by_directory: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            by_directory.setdefault(key.rpartition("/")[0] if isinstance(key, str) else "", []).append(index)
        chain: list[tuple[str, int]] = []  # open directories below the root: (step, descriptor), deepest last
        try:
            for directory in sorted(by_directory):
                indexes = by_directory[directory]
                try:
                    validate_key(keys[indexes[0]])  # before any of its steps is opened
                    dir_fd = self._descend(chain, root_fd, directory.split("/") if directory else [])
                    for index in indexes:
                        answers[index] = self._stat_in(keys[index], dir_fd)
                except FileNotFoundError:
                    pass  # the directory is not there: none of its keys has a blob
                except (_Escape, RetentionError):
                    for index in indexes:  # each key on its own, so each gets its own answer
                        try:
                            answers[index] = self.stat(keys[index], root_fd=root_fd)
                        except RetentionError as error:
                            answers[index] = error
        finally:
            for _step, fd in chain:
                os.close(fd)
            os.close(root_fd)
        return answers

    def _descend(self, chain: list[tuple[str, int]], root_fd: int, steps: list[str]) -> int:
        """The descriptor of the directory `steps` below the root, reusing the open prefix of `chain` (and
        leaving the chain at that directory). Each step is opened with O_NOFOLLOW relative to its parent."""
        common = 0
        while common < len(chain) and common < len(steps) and chain[common][0] == steps[common]:
            common += 1
        while len(chain) > common:
            os.close(chain.pop()[1])
        for step in steps[common:]:
            try:
                child = os.open(step, _DIR_FLAGS, dir_fd=chain[-1][1] if chain else root_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _Escape(f"a step {step!r} is a symlink or a file") from None
                _name_real_path(exc, self.root.joinpath(*(opened for opened, _fd in chain)))
                raise
            chain.append((step, child))
        return chain[-1][1] if chain else root_fd

    def _stat_in(self, key: str, dir_fd: int) -> BlobInfo | None | RetentionError:
        """The blob of `key` in its open directory; its last step is checked like any key's."""
        try:
            name = validate_key(key).rpartition("/")[2]
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except RetentionError as exc:
            return exc
        if not stat_module.S_ISREG(info.st_mode):
            return BadInput(f"storage key {key!r} is not a regular file (a directory or a symlink).")
        return BlobInfo(key=key, size=info.st_size, modified=_written_at(info))

    def stat(self, key: str, root_fd: int | None = None) -> BlobInfo | None:
        try:
            with self._parent_dir(key, root_fd=root_fd) as (dir_fd, name):
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except _Escape as exc:
            raise BadInput(f"{exc}; refusing to follow it out of the media root.") from None
        if not stat_module.S_ISREG(info.st_mode):
            raise BadInput(f"storage key {key!r} is not a regular file (a directory or a symlink).")
        return BlobInfo(key=key, size=info.st_size, modified=_written_at(info))

    def digest(self, key: str) -> BlobDigest | None:
        try:
            with self._parent_dir(key) as (dir_fd, name):
                # O_NONBLOCK: a FIFO planted at a key must not hang the reader.
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except _Escape as exc:
            raise BadInput(f"{exc}; refusing to follow it out of the media root.") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BadInput(f"storage key {key!r} is a symlink, not a blob.") from None
            raise StoreError(f"cannot read storage key {key!r}: {exc.strerror}") from None
        # Checked on the open descriptor before wrapping it: open() of a directory's descriptor raises
        # IsADirectoryError, and the descriptor must be closed whatever the key turns out to be.
        info = os.fstat(fd)
        if not stat_module.S_ISREG(info.st_mode):
            os.close(fd)
            raise BadInput(f"storage key {key!r} is not a regular file.")
        with open(fd, "rb") as handle:
            return BlobDigest(size=info.st_size, sha256=hashlib.file_digest(handle, "sha256").hexdigest())

    def discard_partial_uploads(self, uploads: list[PartialUpload]) -> list[DeleteResult]:
        results = []
        for upload in uploads:
            if not TEMP_NAME.fullmatch(upload.key.rsplit("/", 1)[-1]):
                results.append(DeleteResult(upload.key, ok=False, error="refused: not a temporary upload file"))
            else:
                results.append(self._delete_one(upload.key))
        return results

    def _delete_one(self, key: str, root_fd: int | None = None) -> DeleteResult:
        try:
            with self._parent_dir(key, root_fd=root_fd) as (dir_fd, name):
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return DeleteResult(key, ok=True, missing=True)
        except (_Escape, BadInput) as exc:
            return DeleteResult(key, ok=False, error=f"refused: {exc}")
        except OSError as exc:
            return DeleteResult(key, ok=False, error=f"{type(exc).__name__}: {exc.strerror or exc}")
        return DeleteResult(key, ok=True)

    def delete_many(self, keys: list[str]) -> list[DeleteResult]:
        """Unlink each key on `delete_threads` threads, a run of keys per task. Unlinks wait on the disk
        (the journal, discards, a network volume), so threads overlap them; a task per run rather than
        per key keeps the threads' bookkeeping off the GIL the waits would otherwise queue on."""
        if len(keys) <= 1 or self._threads == 1:
            return self._delete_run(keys)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="fs-delete")
        size = max(DELETE_RUN_MIN, math.ceil(len(keys) / (self._threads * DELETE_RUNS_PER_THREAD)))
        runs = self._pool.map(self._delete_run, [keys[start : start + size] for start in range(0, len(keys), size)])
        return [result for run in runs for result in run]

    def _delete_run(self, keys: list[str]) -> list[DeleteResult]:
        """Delete `keys` in order, every walk starting from one descriptor of the root."""
        try:
            root_fd = self._open_root()
        except (OSError, StoreError) as exc:
            return [DeleteResult(key, ok=False, error=f"cannot open the media root: {getattr(exc, 'strerror', None) or exc}")
                    for key in keys]
        try:
            return [self._delete_one(key, root_fd) for key in keys]
        finally:
            os.close(root_fd)

    def iter_keys(self, *, ordered: bool = False, partial_uploads: bool = False) -> Iterator[BlobInfo | PartialUpload]:
        """Walk the root holding directory descriptors: each child directory is opened relative to
        its parent's descriptor with O_NOFOLLOW, so a directory swapped for a symlink mid-walk is
        not entered, and a renamed-away directory can only show names (every delete walks from the
        root again). An entry that vanishes mid-walk (a concurrent sweep) is skipped, not an error."""
        root_fd = self._open_root()
        yield from self._walk(root_fd, "", ordered, partial_uploads)

    def _walk(self, dir_fd: int, prefix: str, ordered: bool, partial_uploads: bool) -> Iterator[BlobInfo | PartialUpload]:
        """Blobs under the open directory `dir_fd` (closed when done), lazily unless `ordered`."""
        try:
            try:
                entries = os.scandir(dir_fd)
            except FileNotFoundError:
                return  # removed after we opened it
            except OSError as exc:
                raise StoreError(f"cannot list {prefix or 'the media root'}: {exc.strerror}") from None
            with entries:
                if ordered:
                    # Every key under a directory starts with "name/", so the directory sorts as "name/".
                    # Sorting needs the directory's names at once; the store's own keys keep directories
                    # small (ab/cd/<id>), and an unordered walk streams.
                    entries = sorted(entries, key=lambda e: e.name + "/" if _is_dir(e) else e.name)
                for entry in entries:
                    key = f"{prefix}/{entry.name}" if prefix else entry.name
                    if _is_dir(entry):
                        try:
                            child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
                        except OSError as exc:
                            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                                continue  # vanished, or swapped for a symlink or a file since it was listed
                            raise StoreError(f"cannot list {key}: {exc.strerror}") from None
                        yield from self._walk(child, key, ordered, partial_uploads)
                        continue
                    if not prefix and entry.name == MARKER_NAME:
                        continue  # the binding marker: not a blob
                    temporary = TEMP_NAME.fullmatch(entry.name) is not None
                    if temporary and not partial_uploads:
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not stat_module.S_ISREG(info.st_mode):
                        continue
                    if temporary:
                        yield PartialUpload(key=key, started=_written_at(info), size=info.st_size)
                    else:
                        yield BlobInfo(key=key, size=info.st_size, modified=_written_at(info),
                                       mtime=datetime.fromtimestamp(info.st_mtime, timezone.utc))
        finally:
            os.close(dir_fd)

    def usage(self) -> Usage:
        """Bytes and inodes of the filesystem holding the media root (`statvfs`)."""
        os.close(self._open_root())  # a clear error for a root that is not there
        return filesystem_usage(self.root)

    def read_marker(self) -> bytes | None:
        root_fd = self._open_root()
        try:
            fd = os.open(MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=root_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the binding marker of {self.root}: {exc.strerror}") from None
        finally:
            os.close(root_fd)
        with open(fd, "rb") as handle:
            return handle.read(64 * 1024)

    def write_marker(self, content: bytes) -> bool:
        """Written whole under a temporary name, synced, then linked into place: never half a marker,
        never over another one."""
        root_fd = self._open_root()
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=root_fd)
            try:
                try:
                    os.write(out, content)
                    os.fsync(out)
                finally:
                    os.close(out)
                os.link(temp, MARKER_NAME, src_dir_fd=root_fd, dst_dir_fd=root_fd, follow_symlinks=False)
            except FileExistsError:
                return False
            finally:
                # Linked or not (a full volume), the temporary name goes: it is ours alone.
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=root_fd)
            os.fsync(root_fd)
            return True
        except OSError as exc:
            _name_real_path(exc, self.root)
            raise
        finally:
            os.close(root_fd)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
