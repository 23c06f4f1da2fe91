"""The audit trail: every deletion, purge, hold, policy change, reconcile and import recorded, read with `audit`."""

import json
from datetime import timedelta

import pytest
from sqlalchemy import update

from tests.factories import register_aged
from worker.catalog.audit import AuditTrail
from config.errors import BadInput
from worker.models import MediaItem


@pytest.fixture
def uploads(tmp_path):
    return tmp_path / "uploads"


@pytest.fixture
def trail(catalog):
    catalog.set_org("acme", "30d")
    catalog.set_org("globex", "1d")
    return AuditTrail(catalog.db)


def entries(trail, **filters):
    return [entry.to_dict() for entry in trail.read(limit=10_000, **filters).entries]


def test_sweep_deletions_are_recorded_per_batch_as_counts_by_org_and_reason(catalog, trail, uploads):
    """One `deleted` entry per org and reason per batch, its counts summing to what the sweep deleted."""
    for _ in range(3):
        register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=uploads, content=b"a" * 5)
    for _ in range(2):
        register_aged(catalog, "globex", timedelta(days=2), uploads=uploads, content=b"g" * 7)
    register_aged(catalog, "acme", timedelta(days=2), uploads=uploads)  # not due under 30d
    counts = catalog.sweeper.sweep()
    assert counts.deleted == 5
    deleted = entries(trail, action="deleted")
    assert sorted((e["org"], e["reason"], e["details"]["count"], e["details"]["bytes"]) for e in deleted) == [
        ("acme", "ttl", 3, 15), ("globex", "retention", 2, 14)]
    assert all(e["actor"].startswith("sweeper@") for e in deleted)


def test_a_finalize_that_tombstones_nothing_records_nothing(catalog, trail, uploads):
    """Rows taken over by another sweeper before our finalize are not ours to record: no deletion is audited
    that did not happen here (the taker records its own)."""
    register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=uploads)
    claimed = catalog.sweeper.claim_expired(10)
    table = MediaItem.__table__
    with catalog.db.transaction() as session:
        session.execute(update(table).values(claim_token="someone-else"))
    counts = catalog.sweeper.process(claimed)
    assert counts.deleted == 0
    assert entries(trail, action="deleted") == []


def test_a_purge_by_ids_across_orgs_records_each_orgs_ids_under_that_org_only(catalog, trail, uploads):
    """Purging an acme and a globex item at once: acme's trail names only acme's ID, and globex's only its own."""
    a = register_aged(catalog, "acme", timedelta(hours=1), uploads=uploads)
    g = register_aged(catalog, "globex", timedelta(hours=1), uploads=uploads)
    catalog.purge(ids=[a.id, g.id], actor="alice", reason="GDPR request 42")
    acme_purges = entries(trail, org="acme", action="purge")
    globex_purges = entries(trail, org="globex", action="purge")
    assert [e["details"]["ids"] for e in acme_purges] == [[a.id]]
    assert [e["details"]["ids"] for e in globex_purges] == [[g.id]]
    assert acme_purges[0]["actor"] == "alice" and acme_purges[0]["reason"] == "GDPR request 42"
    assert {(e["org"], e["reason"]) for e in entries(trail, action="deleted")} == {("acme", "purge"), ("globex", "purge")}
    assert g.id not in json.dumps(entries(trail, org="acme"))


def test_holds_releases_and_policy_changes_appear_under_their_own_org_only(catalog, trail, uploads):
    """An org hold and an item hold of acme are in acme's trail with who and why, and not in globex's."""
    item = register_aged(catalog, "acme", timedelta(hours=1), uploads=uploads)
    catalog.set_hold(held=True, reason="litigation", org="acme", actor="legal")
    catalog.set_hold(held=True, reason="ticket 7", ids=[item.id], actor="bob")
    catalog.set_hold(held=False, reason="settled", org="acme", actor="legal")
    catalog.set_org("acme", "7d", actor="carol")
    acme = entries(trail, org="acme")
    assert [e["action"] for e in acme] == ["org_set", "org_release", "hold", "org_hold", "org_create"]  # newest first
    assert (acme[0]["actor"], acme[0]["details"]["retention"], acme[0]["details"]["previous"]) == ("carol", "1w", "30d")
    assert (acme[3]["actor"], acme[3]["reason"]) == ("legal", "litigation")
    assert [e["action"] for e in entries(trail, org="globex")] == ["org_create"]


def test_a_manifest_import_is_recorded_per_org_with_counts(catalog, trail, tmp_path):
    """Each org of an import gets an `import` entry counting its items and bytes."""
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / name).write_bytes(b"x" * 4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in [
        {"org": "acme", "id": "i1", "file": "a.bin"}, {"org": "acme", "id": "i2", "file": "b.bin"},
        {"org": "globex", "id": "i3", "file": "c.bin"}]) + "\n")
    catalog.register_manifest(manifest, files_root=tmp_path)
    imports = {e["org"]: e["details"] for e in entries(trail, action="import")}
    assert imports == {"acme": {"manifest": "m.jsonl", "count": 2, "bytes": 8},
                       "globex": {"manifest": "m.jsonl", "count": 1, "bytes": 4}}


def test_reading_pages_newest_first_and_filters_by_time(catalog, trail):
    """A page of N, then the next with --before; --since in the future finds nothing; bad filters are bad input."""
    for number in range(5):
        catalog.set_org(f"org-{number}")
    first = trail.read(limit=3)
    assert first.more and len(first.entries) == 3
    ids = [e.id for e in first.entries]
    assert ids == sorted(ids, reverse=True)
    second = trail.read(limit=3, before=first.next_before)
    assert [e.id for e in second.entries] == sorted([e.id for e in second.entries], reverse=True)
    assert max(e.id for e in second.entries) < min(ids)
    assert len(first.entries) + len(second.entries) + (0 if not second.more else 1) >= 6
    assert trail.read(since="1h").entries and not trail.read(since="2999-01-01T00:00:00Z").entries
    for bad in ({"action": "launch"}, {"since": "yesterday"}, {"org": "../x"}):
        with pytest.raises(BadInput):
            trail.read(**bad)


def test_the_audit_command_prints_json_lines_and_text(cli):
    """`audit --json` prints one JSON object a line, newest first; a bad --action exits 2 with one sentence."""
    cli("org", "set", "acme", "--retention", "30d")
    cli("org", "set", "acme", "--retention", "7d", "--by", "dana")
    machine = cli("audit", "--org", "acme", "--json")
    lines = [json.loads(line) for line in machine.stdout.splitlines()]
    assert machine.code == 0 and [line["action"] for line in lines] == ["org_set", "org_create"]
    assert lines[0]["actor"] == "dana"
    text = cli("audit", "--limit", "1")
    assert text.code == 0 and "org_set by dana org=acme" in text.stdout and "--before" in text.stderr
    bad = cli("audit", "--action", "launch")
    assert bad.code == 2 and "unknown --action" in bad.stderr
