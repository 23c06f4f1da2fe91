"""What only the filesystem store has: symlinks and `O_NOFOLLOW` walks raced by swapped and deleted
directories, refused media roots, statvfs usage, the layout on disk. What every store promises (never
overwrite, refused keys, per-key results, listing order, partial uploads) is in the store contract,
tests/integration/test_store_contract.py, run on this store too."""

import os
import shutil

import pytest

from config.errors import BadInput
from worker.store.fs import FilesystemStore


@pytest.fixture
def store(tmp_path):
    (tmp_path / "media").mkdir()
    store = FilesystemStore(tmp_path / "media", delete_threads=4)
    yield store
    store.close()


@pytest.fixture
def outside(tmp_path):
    """A directory beside the media root holding a file that must survive everything."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "victim").write_bytes(b"precious")
    return directory


def test_a_blob_is_a_plain_file_at_its_key_under_the_root_with_no_temporary_file_beside_it(store, tmp_path):
    """A stored blob lands at root/key with the source's bytes, and its directory holds nothing else."""
    source = tmp_path / "in.jpg"
    source.write_bytes(b"\xff\xd8jpeg")
    assert store.put_file("ab/cd/photo", source) == 6
    assert (store.root / "ab/cd/photo").read_bytes() == b"\xff\xd8jpeg"
    assert os.listdir(store.root / "ab/cd") == ["photo"]


def test_delete_refuses_to_reach_through_a_symlinked_directory(store, outside):
    """A directory inside the root that is a symlink to elsewhere is not followed by delete."""
    os.symlink(outside, store.root / "link")
    [result] = store.delete_many(["link/victim"])
    assert not result.ok and "symlink" in result.error
    assert (outside / "victim").exists()


def test_stat_and_put_refuse_to_reach_through_a_symlinked_directory(store, outside, tmp_path):
    """Adopting or writing through a symlinked directory is bad input, and nothing is written outside."""
    os.symlink(outside, store.root / "link")
    source = tmp_path / "in"
    source.write_bytes(b"x")
    with pytest.raises(BadInput, match="symlink"):
        store.stat("link/victim")
    with pytest.raises(BadInput, match="symlink"):
        store.put_file("link/new", source)
    assert sorted(os.listdir(outside)) == ["victim"]


def test_deleting_a_symlink_blob_removes_the_link_not_its_target(store, outside):
    """A blob that is itself a symlink is unlinked; the file it points at survives."""
    os.symlink(outside / "victim", store.root / "blob")
    [result] = store.delete_many(["blob"])
    assert result.ok and not os.path.lexists(store.root / "blob")
    assert (outside / "victim").read_bytes() == b"precious"


def test_a_listing_does_not_follow_a_symlinked_directory(store, outside):
    """Listing walks the root and lists every blob, but never enters a directory that is a symlink to elsewhere."""
    (store.root / "a/b").mkdir(parents=True)
    (store.root / "a/b/one").write_bytes(b"1")
    (store.root / "two").write_bytes(b"22")
    os.symlink(outside, store.root / "link")
    assert sorted((info.key, info.size) for info in store.iter_keys()) == [("a/b/one", 1), ("two", 2)]


def _tree(root, keys):
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.mark.parametrize("ordered", [True, False])
def test_a_directory_swapped_for_a_symlink_during_the_listing_is_not_followed(store, outside, ordered):
    """After the root was read, `b/` becomes a symlink to a directory outside: the walk does not enter it."""
    _tree(store.root, ["a/1", "b/1", "b/2"])
    (outside / "b").mkdir()
    (outside / "b" / "secret").write_bytes(b"outside")
    listing = store.iter_keys(ordered=ordered)
    first = next(listing)
    swapped = "b" if first.key.startswith("a/") else "a"
    shutil.rmtree(store.root / swapped)
    os.symlink(outside / "b", store.root / swapped)
    rest = [blob.key for blob in listing]
    assert not any(key.startswith(f"{swapped}/") or key.endswith("secret") for key in rest)


@pytest.mark.parametrize("ordered", [True, False])
def test_entries_deleted_during_the_listing_are_skipped_not_errors(store, ordered):
    """A concurrent sweep removes blobs and a whole shard directory while the walk is in it."""
    _tree(store.root, [f"aa/{n}" for n in range(50)] + [f"bb/{n}" for n in range(50)])
    listing = store.iter_keys(ordered=ordered)
    first = next(listing)
    here, there = ("aa", "bb") if first.key.startswith("aa/") else ("bb", "aa")
    for n in range(50):
        (store.root / here / str(n)).unlink(missing_ok=True)
    shutil.rmtree(store.root / there)
    rest = [blob.key for blob in listing]
    assert rest == []


def test_a_media_root_that_is_a_symlink_to_a_system_directory_is_refused(tmp_path):
    """The root is judged after resolving symlinks: a link to /etc is /etc."""
    link = tmp_path / "media"
    os.symlink("/etc", link)
    with pytest.raises(BadInput, match="system directory"):
        FilesystemStore(link)


def test_a_media_root_holding_a_protected_file_is_refused_and_not_created(tmp_path):
    """A root above the catalog is refused before the root directory is even made."""
    root = tmp_path / "new-root"
    with pytest.raises(BadInput, match="contains the catalog database"):
        FilesystemStore(root, protected={"the catalog database": root / "data" / "catalog.sqlite3"})
    assert not root.exists()


def test_a_filesystem_store_says_how_full_its_volume_is(store):
    """usage() is the statvfs of the media root's filesystem: bytes and inodes, as the volume check reads them."""
    from worker.volume import filesystem_usage

    usage, direct = store.usage(), filesystem_usage(store.root)
    assert (usage.total_bytes, usage.total_inodes) == (direct.total_bytes, direct.total_inodes)
    assert usage.ratio("bytes") == pytest.approx(direct.ratio("bytes"), abs=0.01)

