"""The blob-store contract, run against every backend: the in-memory store unit tests use, the
filesystem and S3 (moto's server on loopback). A behaviour the engine relies on holds on all three."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.errors import BlobExists
from worker.store import BlobStore
from worker.store.fs import FilesystemStore
from worker.store.memory import MemoryStore
from worker.store.s3 import S3Store


@pytest.fixture(params=["memory", "filesystem", "s3"])
def store(request, tmp_path: Path) -> BlobStore:
    """Each backend in turn, empty."""
    if request.param == "memory":
        return MemoryStore()
    if request.param == "filesystem":
        root = tmp_path / "media"
        root.mkdir()
        built = FilesystemStore(root, delete_threads=2)
        request.addfinalizer(built.close)
        return built
    return request.getfixturevalue("s3_store")


@pytest.fixture
def upload(tmp_path: Path):
    def make(content: bytes, name: str = "upload.bin") -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return make


def test_a_stored_blob_has_its_size_and_digest_and_exists(store, upload):
    """put_file returns the size; stat, digest and exists answer for the key, and nothing for another."""
    assert store.put_file("ab/cd/item-1", upload(b"jpeg bytes")) == 10
    info = store.stat("ab/cd/item-1")
    assert (info.key, info.size) == ("ab/cd/item-1", 10)
    digest = store.digest("ab/cd/item-1")
    assert (digest.size, len(digest.sha256)) == (10, 64)
    assert store.exists("ab/cd/item-1") and not store.exists("ab/cd/other")
    assert store.stat("ab/cd/other") is None and store.digest("ab/cd/other") is None


def test_a_blob_is_never_overwritten(store, upload):
    """A second put_file at a taken key raises BlobExists and leaves the first bytes."""
    store.put_file("k/1", upload(b"first", "a.bin"))
    with pytest.raises(BlobExists):
        store.put_file("k/1", upload(b"second!", "b.bin"))
    assert store.stat("k/1").size == len(b"first")


def test_delete_many_answers_per_key_in_order_and_a_missing_blob_is_a_success(store, upload):
    """Results follow the input order; a key with no blob is ok (marked missing where the backend can
    tell: S3's DeleteObjects answers the same for a key it never held)."""
    for key in ("a/1", "a/2"):
        store.put_file(key, upload(b"x", key.replace("/", "-")))
    results = store.delete_many(["a/1", "gone/x", "a/2"])
    assert [(r.key, r.ok) for r in results] == [("a/1", True), ("gone/x", True), ("a/2", True)]
    assert not results[0].missing and not results[2].missing
    assert results[1].missing or isinstance(store, S3Store)
    assert not store.exists("a/1") and not store.exists("a/2")


def test_keys_that_escape_are_refused_as_results_not_deleted(store, upload):
    """Traversal keys fail as per-key results, and the store's own blobs stay."""
    store.put_file("keep/me", upload(b"x"))
    [result] = store.delete_many(["../outside/victim"])
    assert not result.ok and "refused" in result.error
    assert store.exists("keep/me")


def test_an_ordered_listing_is_in_key_order(store, upload):
    """iter_keys(ordered=True) yields every blob in ascending key order (what verify merges on)."""
    keys = ["b/2", "a/10", "a/1", "a-b/3", "c"]
    for number, key in enumerate(keys):
        store.put_file(key, upload(b"x" * number, f"u{number}.bin"))
    listed = [info.key for info in store.iter_keys(ordered=True)]
    assert listed == sorted(keys)
    assert {info.key: info.size for info in store.iter_keys()} == {key: number for number, key in enumerate(keys)}
