"""Variants as a user types them: `register --variant`, `variant add`, `lookup` and `sweep`, in a subprocess."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from tests.e2e.support import snapshot
from tests.factories import plant_blob


def test_register_with_variants_lists_them_in_lookup_and_a_sweep_deletes_them_with_the_item(shell, data_dir):
    """register --key … --variant … --variant … adopts both; lookup lists them; `variant add` adds one; after
    the item's expiry one sweep deletes the item's blob and its three variants."""
    assert shell("org", "set", "acme", "--retention", "30d").code == 0
    media = data_dir / "media"
    for key in ("uploads/a.jpg", "thumbs/a.webp", "previews/a.mp4", "thumbs/a-small.webp"):
        plant_blob(media, key, b"bytes")
    # Live for 10 more seconds (a one-hour TTL), held before it expires: it stays past its expiry, and takes variants.
    created = datetime.now(timezone.utc) - timedelta(hours=1) + timedelta(seconds=10)
    registered = shell("register", "--org", "acme", "--key", "uploads/a.jpg", "--id", "a", "--ttl", "1h",
                       "--created-at", created.isoformat(), "--variant", "thumbs/a.webp", "--variant", "previews/a.mp4", "--json")
    assert registered.code == 0, registered.stderr
    assert registered.json["variants"] == [{"key": "thumbs/a.webp", "size": 5, "mime": "image/webp"},
                                           {"key": "previews/a.mp4", "size": 5, "mime": "video/mp4"}]
    assert shell("hold", "a", "--reason", "checking").code == 0
    added = shell("variant", "add", "a", "--key", "thumbs/a-small.webp", "--json")
    assert (added.code, added.json["added"]) == (0, 1), added.stderr
    looked_up = shell("lookup", "a", "--json")
    assert [variant["key"] for variant in looked_up.json["variants"]] == ["previews/a.mp4", "thumbs/a-small.webp", "thumbs/a.webp"]

    while datetime.now(timezone.utc) <= created + timedelta(hours=1, seconds=1):  # past its expiry, held
        time.sleep(0.2)
    assert shell("lookup", "a", "--json").code == 0
    assert shell("release", "a", "--reason", "done").code == 0
    swept = shell("sweep", "--json")
    assert (swept.code, swept.json["deleted"], swept.json["variants_deleted"]) == (0, 1, 3)
    assert [path for path in media.rglob("*") if path.is_file() and not path.name.startswith(".media-retention")] == []
    gone = shell("variant", "add", "a", "--key", "thumbs/a.webp")
    assert gone.code == 3 and "gone" in gone.stderr


def test_a_bad_variant_key_is_one_sentence_exit_two_and_changes_nothing(shell, data_dir):
    """A reserved name, a key given twice and a variant with no blob are each refused in one line, exit 2,
    catalog and media untouched."""
    assert shell("org", "set", "acme", "--retention", "30d").code == 0
    plant_blob(data_dir / "media", "uploads/b.jpg", b"bytes")
    before = snapshot(data_dir)
    for variant, says in ((".media-retention-x", "invalid storage key"), ("uploads/b.jpg", "given twice"),
                          ("thumbs/none.webp", "no blob at variant key")):
        refused = shell("register", "--org", "acme", "--key", "uploads/b.jpg", "--variant", variant)
        assert refused.code == 2, refused.stderr
        assert says in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert snapshot(data_dir) == before
