"""The blob-store contract, run against every backend: the in-memory store unit tests use, the
filesystem and S3 (moto's server on loopback). A behaviour the engine relies on holds on all three.

Where a backend genuinely differs, the difference is written down once, in the tables below, and the
test checks each backend against its own line: no backend is skipped. What only one backend has
(symlinked directories and `O_NOFOLLOW` races, statvfs usage, refused media roots, `DeleteObjects`
batching and per-key errors, multipart, presigned URLs, addressing) is tested in its own module:
tests/unit/test_fs_store.py and tests/integration/test_s3_store.py.
"""

from __future__ import annotations

import os

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from config.errors import BadInput, BlobExists
from tests.factories import plant_blob
from tests.s3 import PREFIX
from worker.store import BlobDigest, BlobInfo, BlobStore, PartialUpload
from worker.store.fs import FilesystemStore
from worker.store.memory import MemoryStore

BACKENDS = ("memory", "filesystem", "s3")

# -- where the backends differ, one line each ------------------------------------------------------

# A delete of a key that holds no blob is a success everywhere; whether it is *marked* missing depends on
# whether the backend can tell. S3's DeleteObjects (and DeleteObject) answer a key it never held exactly
# as one it just deleted.
REPORTS_MISSING = {"memory": True, "filesystem": True, "s3": False}

# Keys with control characters (a newline, a tab) pass `validate_key`, so an odd blob already in a store
# stays addressable and reconcile can remove it. S3 refuses them: XML 1.0 cannot carry them, and one such
# key would turn a whole DeleteObjects request into MalformedXML.
ACCEPTS_CONTROL_CHARACTERS = {"memory": True, "filesystem": True, "s3": False}

# What a killed upload leaves behind: a `.incoming-*` file beside its target (filesystem), a multipart
# upload never completed (S3). A memory store's put is one assignment under a lock: it leaves nothing.
LEAVES_PARTIAL_UPLOADS = {"memory": False, "filesystem": True, "s3": True}

# A key that is only the start of other keys (`a/b` when `a/b/c` is a blob) is a directory on disk: the
# filesystem store refuses to stat it as a blob (BadInput) and its unlink fails (EISDIR). On S3 and in
# memory nothing is stored at that exact key: stat and digest answer None and a delete succeeds.
# Everywhere, the blobs below it are untouched.
A_PREFIX_IS_A_DIRECTORY = {"memory": False, "filesystem": True, "s3": False}

# Keys every backend refuses, for every operation, before touching anything.
INVALID_KEYS = {
    "parent-step": "../outside/victim",
    "parent-step-inside": "a/../../outside/victim",
    "absolute": "/etc/passwd",
    "nul-byte": "victim\x00",
    "empty": "",
    "empty-step": "a//victim",
    "trailing-slash": "a/",
    "dot-step": "./victim",
    "backslash": "a\\..\\victim",
    "step-over-255-bytes": "a/" + "x" * 256,
    "over-1024-bytes": "/".join(["x" * 200] * 6),
}

# Blobs beside the store's root (filesystem: next to the media directory) or prefix (S3: the bucket
# outside `media/`), which no key may reach. A memory store has no outside: it can only reach its dict.
OUTSIDE = {"outside/victim": b"precious", "victim": b"precious", "media-old/a/1": b"precious", "mediax/a/1": b"precious"}


@dataclass
class Backend:
    """A store under test and what the test needs to do behind its back."""

    name: str
    store: BlobStore
    # Write a blob at a key without going through the store (another writer, an upstream service).
    plant: Callable[[str, bytes], None]
    # Leave what a killed upload to this key leaves; None where the backend cannot leave anything.
    leave_partial_upload: Callable[[str], None] | None
    # What lies beside the root or prefix right now: name -> bytes.
    outside: Callable[[], dict[str, bytes]]


def memory_backend() -> Backend:
    store = MemoryStore()
    return Backend("memory", store, plant=store.put_bytes, leave_partial_upload=None, outside=dict)


def filesystem_backend(request, tmp_path: Path) -> Backend:
    beside = tmp_path / "volume"
    for name, content in OUTSIDE.items():
        plant_blob(beside, name, content)
    (beside / "media").mkdir()
    store = FilesystemStore(beside / "media", delete_threads=2)
    request.addfinalizer(store.close)

    def leave_partial_upload(key: str) -> None:
        # put_file writes a `.incoming-*` file in the key's directory and links it into place.
        plant_blob((store.root / key).parent, f".incoming-{secrets.token_hex(8)}", b"half a blob")

    def outside() -> dict[str, bytes]:
        return {path.relative_to(beside).as_posix(): path.read_bytes()
                for path in beside.rglob("*") if path.is_file() and store.root not in path.parents}

    return Backend("filesystem", store, plant=lambda key, content: plant_blob(store.root, key, content),
                   leave_partial_upload=leave_partial_upload, outside=outside)


def s3_backend(request) -> Backend:
    store, objects, bucket = (request.getfixturevalue(name) for name in ("s3_store", "objects", "bucket"))
    for name, content in OUTSIDE.items():
        objects.put(bucket, [name], content)

    def leave_partial_upload(key: str) -> None:
        objects.raw.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/{key}")

    def outside() -> dict[str, bytes]:
        names = {name for name in objects.names(bucket) if not name.startswith(f"{PREFIX}/")}
        return {name: objects.raw.get_object(Bucket=bucket, Key=name)["Body"].read() for name in names}

    return Backend("s3", store, plant=lambda key, content: objects.put(bucket, [f"{PREFIX}/{key}"], content),
                   leave_partial_upload=leave_partial_upload, outside=outside)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path: Path) -> Backend:
    """Each backend in turn, empty, with whatever lies beside it planted."""
    if request.param == "memory":
        return memory_backend()
    if request.param == "filesystem":
        return filesystem_backend(request, tmp_path)
    return s3_backend(request)


@pytest.fixture
def store(backend: Backend) -> BlobStore:
    return backend.store


@pytest.fixture
def upload(tmp_path: Path):
    """A local file with the given bytes, as put_file takes it."""
    directory = tmp_path / "uploads"
    directory.mkdir()

    def make(content: bytes, name: str | None = None) -> Path:
        path = directory / (name or f"upload-{secrets.token_hex(4)}.bin")
        path.write_bytes(content)
        return path

    return make


def listed(store: BlobStore, **options) -> list[str]:
    return [info.key for info in store.iter_keys(**options)]


# -- writing and reading back ----------------------------------------------------------------------


def test_a_stored_blob_has_its_size_and_digest_and_exists(store, upload):
    """put_file returns the size; stat, digest (of the very bytes) and exists answer for the key, and nothing for another."""
    assert store.put_file("ab/cd/item-1", upload(b"jpeg bytes")) == 10
    info = store.stat("ab/cd/item-1")
    assert (info.key, info.size) == ("ab/cd/item-1", 10)
    digest = store.digest("ab/cd/item-1")
    assert (digest.size, digest.sha256) == (10, hashlib.sha256(b"jpeg bytes").hexdigest())
    assert store.exists("ab/cd/item-1") and not store.exists("ab/cd/other")
    assert store.stat("ab/cd/other") is None and store.digest("ab/cd/other") is None


def test_an_empty_file_is_a_blob_of_size_zero(store, upload):
    """A zero-byte upload is stored, stat and listed with size 0, and has the digest of no bytes."""
    assert store.put_file("empty/one", upload(b"")) == 0
    assert store.stat("empty/one").size == 0
    assert store.digest("empty/one").sha256 == hashlib.sha256(b"").hexdigest()
    assert [(info.key, info.size) for info in store.iter_keys()] == [("empty/one", 0)]


def test_a_new_blob_carries_a_timezone_aware_modification_time_of_now(store, upload):
    """stat and the listing give the time the blob was written, timezone-aware (reconcile's grace is measured from it)."""
    before = datetime.now(timezone.utc) - timedelta(seconds=5)  # S3's LastModified has whole seconds
    store.put_file("ab/cd/new", upload(b"x"))
    after = datetime.now(timezone.utc) + timedelta(seconds=5)
    [listing] = store.iter_keys()
    for modified in (store.stat("ab/cd/new").modified, listing.modified):
        assert modified.tzinfo is not None and before <= modified <= after


@pytest.mark.parametrize("first", ["put_file", "planted"])
def test_a_blob_is_never_overwritten(backend, store, upload, first):
    """A put_file at a taken key (taken by this store or by another writer) raises BlobExists and leaves the first bytes."""
    if first == "put_file":
        store.put_file("k/1", upload(b"first"))
    else:
        backend.plant("k/1", b"first")
    with pytest.raises(BlobExists, match="refusing to overwrite"):
        store.put_file("k/1", upload(b"second!"))
    assert store.digest("k/1") == BlobDigest(size=5, sha256=hashlib.sha256(b"first").hexdigest())


def test_a_source_that_cannot_be_read_leaves_no_blob(backend, store, tmp_path):
    """put_file from a missing file is bad input, one sentence naming the file, and leaves nothing, not even a partial upload."""
    with pytest.raises(BadInput, match="no-such-file"):
        store.put_file("ab/cd/never", tmp_path / "no-such-file")
    assert store.stat("ab/cd/never") is None
    assert list(store.iter_keys(partial_uploads=True)) == []


def test_stat_many_answers_each_key_in_order_with_its_blob_none_or_its_error(backend, store):
    """Keys in shared and separate directories, missing ones, a missing directory and refused keys: one
    answer per key, in order; a refused key is that key's error, not an exception for the batch."""
    for key, content in (("d/1", b"a"), ("d/2", b"bb"), ("e/f/3", b"ccc")):
        backend.plant(key, content)
    keys = ["d/2", "d/none", "e/f/3", "../escape", "missing-dir/x", "d/1", "/absolute"]
    answers = store.stat_many(keys)
    assert [answer.size if isinstance(answer, BlobInfo) else answer for answer in answers[:3]] == [2, None, 3]
    assert isinstance(answers[3], BadInput) and isinstance(answers[6], BadInput)
    assert answers[4] is None and answers[5].size == 1 and answers[5].key == "d/1"


# -- writing a batch -------------------------------------------------------------------------------

# 20 files: more than the filesystem's BATCH_SYNC_MIN, so its two-sync path is the one checked.
BATCH = 20


def test_put_files_writes_a_batch_and_answers_each_file_with_its_size_and_sha256(store, upload):
    """Every file of a batch lands at its key with its bytes; the answers come in order with the file's
    size and sha256, and nothing temporary is left behind."""
    contents = [f"blob {n}".encode() * (n + 1) for n in range(BATCH)]
    files = [(f"b/{n:02d}", upload(content)) for n, content in enumerate(contents)]
    written: list[str] = []
    stored = store.put_files(files, written)
    assert written == [key for key, _ in files]
    assert [(blob.key, blob.size, blob.sha256, blob.written) for blob in stored] == [
        (key, len(content), hashlib.sha256(content).hexdigest(), True) for (key, _), content in zip(files, contents)]
    assert {key: store.digest(key).size for key, _ in files} == {key: len(content) for (key, _), content in zip(files, contents)}
    assert list(store.iter_keys(partial_uploads=True, ordered=True)) == list(store.iter_keys(ordered=True))


def test_put_files_leaves_a_blob_already_at_a_key_alone_and_says_so(backend, store, upload):
    """A key already holding a blob comes back `written=False` with the file's own digest; the blob there
    keeps its bytes, and the other files of the batch go in."""
    backend.plant("b/05", b"someone else's")
    files = [(f"b/{n:02d}", upload(f"mine {n}".encode())) for n in range(BATCH)]
    written: list[str] = []
    stored = store.put_files(files, written)
    assert [blob.written for blob in stored] == [n != 5 for n in range(BATCH)]
    assert written == [key for n, (key, _) in enumerate(files) if n != 5]
    assert stored[5].sha256 == hashlib.sha256(b"mine 5").hexdigest()
    assert store.digest("b/05").sha256 == hashlib.sha256(b"someone else's").hexdigest()


@pytest.mark.parametrize("size", [3, BATCH])
def test_put_files_that_fails_part_way_names_every_blob_it_wrote_and_leaves_no_temporary_file(store, upload, tmp_path, size):
    """A source that cannot be read half-way through a batch (small or large): bad input naming it; the
    blobs the call did write are exactly the ones it named in `written` (the store never deletes one on its
    own: the caller decides under its reservation), and no temporary file or partial upload is left."""
    files = [(f"b/{n:02d}", upload(f"blob {n}".encode())) for n in range(size)]
    files[size // 2] = (files[size // 2][0], tmp_path / "vanished.bin")
    written: list[str] = []
    with pytest.raises(BadInput, match="vanished.bin"):
        store.put_files(files, written)
    listed = list(store.iter_keys(partial_uploads=True))
    assert all(isinstance(entry, BlobInfo) for entry in listed)
    assert sorted(entry.key for entry in listed) == sorted(written)
    assert set(written) <= {key for key, _ in files[: size // 2]}


# -- deleting --------------------------------------------------------------------------------------


def test_delete_many_answers_per_key_in_order_and_a_missing_blob_is_a_success(backend, store, upload):
    """Results follow the input order; a key with no blob is ok, marked missing where the backend can tell (not S3)."""
    for key in ("a/1", "a/2"):
        store.put_file(key, upload(b"x"))
    results = store.delete_many(["a/1", "gone/x", "a/2"])
    assert [(r.key, r.ok, r.missing, r.error) for r in results] == [
        ("a/1", True, False, None), ("gone/x", True, REPORTS_MISSING[backend.name], None), ("a/2", True, False, None)]
    assert not store.exists("a/1") and not store.exists("a/2")
    assert store.delete_many([]) == []


def test_a_key_named_twice_in_one_call_gets_a_result_each_time(store, upload):
    """Each occurrence gets its own successful result, in place (which one is marked missing is not promised)."""
    store.put_file("a/1", upload(b"x"))
    store.put_file("b/1", upload(b"y"))
    results = store.delete_many(["a/1", "b/1", "a/1", "gone/x"])
    assert [(r.key, r.ok) for r in results] == [("a/1", True), ("b/1", True), ("a/1", True), ("gone/x", True)]
    assert listed(store) == []


def test_many_keys_are_deleted_with_one_result_each(store, upload):
    """120 keys, half of them without a blob, spread over the delete threads: every key answered ok, in input order."""
    keys = [f"{n % 7:02d}/{n:04d}" for n in range(120)]
    source = upload(b"z")
    for key in keys[::2]:
        store.put_file(key, source)
    results = store.delete_many(keys)
    assert [r.key for r in results] == keys and all(r.ok for r in results)
    assert listed(store) == []


# -- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", INVALID_KEYS.values(), ids=INVALID_KEYS.keys())
def test_an_invalid_key_is_refused_by_every_operation_and_nothing_is_touched(backend, store, upload, key):
    """put_file, stat, digest and exists raise BadInput; delete_many refuses that key alone; nothing in or beside the store changes."""
    store.put_file("keep/me", upload(b"mine"))
    store.put_file("doomed/1", upload(b"gone"))
    outside = backend.outside()
    for operation in (lambda: store.put_file(key, upload(b"intruder")), lambda: store.stat(key),
                      lambda: store.digest(key), lambda: store.exists(key)):
        with pytest.raises(BadInput):
            operation()
    refused, deleted = store.delete_many([key, "doomed/1"])
    assert (refused.key, refused.ok, deleted.ok) == (key, False, True)
    assert refused.error.startswith("refused")
    assert listed(store) == ["keep/me"] and store.digest("keep/me").size == 4
    assert backend.outside() == outside


def test_a_key_with_a_control_character_is_addressable_except_on_s3(backend, store, upload):
    """A newline or tab in a key: memory and filesystem store, stat and delete it; S3 refuses it like an invalid key."""
    keys = ["odd/new\nline", "odd/tab\tbed"]
    if ACCEPTS_CONTROL_CHARACTERS[backend.name]:
        for key in keys:
            assert store.put_file(key, upload(b"odd")) == 3
            assert store.stat(key).size == 3
        assert sorted(listed(store)) == sorted(keys)
        assert [(r.ok, r.missing) for r in store.delete_many(keys)] == [(True, False), (True, False)]
    else:
        for key in keys:
            with pytest.raises(BadInput, match="control characters"):
                store.put_file(key, upload(b"odd"))
            with pytest.raises(BadInput, match="control characters"):
                store.stat(key)
        assert all(not r.ok and r.error.startswith("refused") for r in store.delete_many(keys))
    assert listed(store) == []


def test_a_key_that_only_prefixes_other_blobs_is_no_blob_and_its_blobs_survive(backend, store, upload):
    """`a/b` beside blob `a/b/c`: a directory on a filesystem (stat refuses, delete fails), nothing elsewhere; `a/b/c` stays."""
    store.put_file("a/b/c", upload(b"below"))
    if A_PREFIX_IS_A_DIRECTORY[backend.name]:
        with pytest.raises(BadInput, match="not a regular file"):
            store.stat("a/b")
        [result] = store.delete_many(["a/b"])
        assert not result.ok and "IsADirectoryError" in result.error
    else:
        assert store.stat("a/b") is None
        [result] = store.delete_many(["a/b"])
        assert result.ok
    assert listed(store) == ["a/b/c"] and store.digest("a/b/c").size == 5


def test_the_digest_of_a_key_that_only_prefixes_other_blobs_is_refused_or_none(backend, store, upload):
    """digest(`a/b`) when `a/b/c` is a blob: BadInput on a filesystem, like stat, with no descriptor left
    open; None on S3 and in memory."""
    store.put_file("a/b/c", upload(b"below"))
    if A_PREFIX_IS_A_DIRECTORY[backend.name]:
        open_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(BadInput, match="not a regular file"):
            store.digest("a/b")
        assert len(os.listdir("/proc/self/fd")) == open_before, "digest left the directory's descriptor open"
    else:
        assert store.digest("a/b") is None
    assert store.digest("a/b/c").size == 5


# -- listing ---------------------------------------------------------------------------------------


def test_an_ordered_listing_comes_in_key_byte_order_across_directories(store, upload):
    """ordered=True lists every blob in UTF-8 byte order, as verify merges it with the key index (`a-c` < `a/b`)."""
    keys = ["a/b", "a-c", "a/a/z", "b/2", "a0", "Z/1", "é/x", "a/10", "a/1", "a-b/3", "c"]
    for number, key in enumerate(keys):
        store.put_file(key, upload(b"x" * number))
    ordered = listed(store, ordered=True)
    assert ordered == sorted(keys, key=lambda key: key.encode("utf-8")) == sorted(keys)
    assert ordered.index("a-c") < ordered.index("a/a/z") < ordered.index("a/b") < ordered.index("a0")
    assert ordered.index("Z/1") < ordered.index("a-b/3") and ordered[-1] == "é/x"
    assert {info.key: info.size for info in store.iter_keys()} == {key: number for number, key in enumerate(keys)}


def test_a_listing_names_only_the_stores_own_blobs(backend, store, upload):
    """Nothing beside the root or prefix is listed, not even names that start like it (`media-old/`, `mediax/`)."""
    store.put_file("a/1", upload(b"1"))
    backend.plant("a/2", b"22")
    assert sorted((info.key, info.size) for info in store.iter_keys()) == [("a/1", 1), ("a/2", 2)]
    assert listed(store, ordered=True) == ["a/1", "a/2"]
    assert backend.outside() == ({} if backend.name == "memory" else OUTSIDE)


def test_partial_uploads_are_listed_only_when_asked_and_discarded_without_touching_a_blob(backend, store, upload):
    """A killed upload's leftover is listed only with partial_uploads=True, and discarding it never touches a blob."""
    store.put_file("ab/cd/done", upload(b"whole"))
    if LEAVES_PARTIAL_UPLOADS[backend.name]:
        backend.leave_partial_upload("ab/cd/killed")
    else:
        assert backend.leave_partial_upload is None
    assert listed(store) == listed(store, ordered=True) == ["ab/cd/done"]
    everything = list(store.iter_keys(partial_uploads=True))
    assert [info.key for info in everything if isinstance(info, BlobInfo)] == ["ab/cd/done"]
    partial = [info for info in everything if isinstance(info, PartialUpload)]
    assert len(partial) == (1 if LEAVES_PARTIAL_UPLOADS[backend.name] else 0)
    if partial:
        assert partial[0].key.startswith("ab/cd/")
        assert [(r.ok, r.missing) for r in store.discard_partial_uploads(partial)] == [(True, False)]
        assert [(r.ok, r.missing) for r in store.discard_partial_uploads(partial)] == [(True, True)]
        assert [info.key for info in store.iter_keys(partial_uploads=True)] == ["ab/cd/done"]
    [refused] = store.discard_partial_uploads([PartialUpload(key="ab/cd/done", started=None)])
    assert not refused.ok
    assert store.digest("ab/cd/done").size == 5
