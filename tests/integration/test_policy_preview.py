"""`org set ORG --retention D --dry-run`: what a new period would make due, equal to what the next sweep deletes."""

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from tests.factories import register_aged, states
from config.errors import BadInput, NotFound
from worker.models import AuditEvent, MediaItem
from worker.catalog.preview import preview_retention


@pytest.fixture
def uploads(tmp_path):
    return tmp_path / "uploads"


def snapshot(catalog):
    """Everything a preview must leave untouched: item expiries and states, org rows, the audit trail."""
    with catalog.db.transaction() as session:
        items = session.execute(select(MediaItem.id, MediaItem.state, MediaItem.expires_at).order_by(MediaItem.id)).all()
        audits = session.scalar(select(func.count()).select_from(AuditEvent))
    return items, audits, catalog.show_org("acme")


def test_the_preview_counts_exactly_what_the_next_sweep_deletes_after_the_change(catalog, uploads):
    """Shortening 30d to 7d: the preview's due items and bytes are what the sweep after `org set` deletes;
    held items and items whose own TTL has not passed are counted apart and survive."""
    catalog.set_org("acme", "30d")
    catalog.set_org("other", "1d")
    old = [register_aged(catalog, "acme", timedelta(days=10), uploads=uploads, content=b"x" * (10 + n)) for n in range(3)]
    register_aged(catalog, "acme", timedelta(days=3), uploads=uploads)
    ttl_kept = register_aged(catalog, "acme", timedelta(days=10), ttl="30d", uploads=uploads)
    ttl_due = register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=uploads, content=b"y" * 7)
    register_aged(catalog, "other", timedelta(days=2), uploads=uploads)  # another org: not in acme's preview
    catalog.set_hold(held=True, reason="legal", ids=[old[0].id], actor="test")
    before = snapshot(catalog)

    preview = preview_retention(catalog.db, "acme", "7d")
    assert snapshot(catalog) == before
    assert (preview.due, preview.newly_due, preview.held, preview.kept_longer, preview.ttl_items) == (3, 2, 1, 0, 2)
    assert preview.due_bytes == 11 + 12 + 7 and preview.newly_due_bytes == 11 + 12

    catalog.set_org("acme", "7d")
    counts = catalog.sweeper.sweep()
    deleted = [media_id for media_id, state in states(catalog, [*(i.id for i in old), ttl_due.id, ttl_kept.id]).items()
               if state == "deleted"]
    other_deleted = 1  # the other org's item was due under its own 1d retention all along
    assert counts.deleted - other_deleted == preview.due == len(deleted)
    assert sorted(deleted) == sorted([old[1].id, old[2].id, ttl_due.id])


def test_lengthening_the_period_shows_the_items_kept_longer_and_no_new_deletions(catalog, uploads):
    """5d to 30d: items 3 days old are kept longer; an item 6 days old expired already and stays due (no change
    revives what expired), as does an expired TTL item."""
    catalog.set_org("acme", "5d")
    for _ in range(2):
        register_aged(catalog, "acme", timedelta(days=3), uploads=uploads)
    register_aged(catalog, "acme", timedelta(days=6), uploads=uploads)
    register_aged(catalog, "acme", timedelta(hours=2), ttl="1h", uploads=uploads)
    preview = preview_retention(catalog.db, "acme", "30d")
    assert (preview.due, preview.newly_due, preview.kept_longer) == (2, 0, 2)
    catalog.set_org("acme", "30d")
    assert catalog.sweeper.sweep().deleted == preview.due


def test_an_org_on_hold_previews_nothing_due_and_everything_held(catalog, uploads):
    """An org hold keeps every item, whatever the period: due 0, and the would-be-due items counted as held."""
    catalog.set_org("acme", "30d")
    register_aged(catalog, "acme", timedelta(days=10), uploads=uploads)
    catalog.set_hold(held=True, reason="litigation", org="acme", actor="test")
    preview = preview_retention(catalog.db, "acme", "1d")
    assert (preview.due, preview.held, preview.org_held) == (0, 1, True)
    catalog.set_org("acme", "1d")
    assert catalog.sweeper.sweep().deleted == 0


def test_a_preview_needs_a_new_period_and_an_existing_org(catalog):
    """--dry-run without --retention is bad input; an unknown org is not found; a bad period is bad input."""
    catalog.set_org("acme", "30d")
    with pytest.raises(BadInput):
        preview_retention(catalog.db, "acme", None)
    with pytest.raises(BadInput):
        preview_retention(catalog.db, "acme", "10m")
    with pytest.raises(NotFound):
        preview_retention(catalog.db, "nobody", "7d")


def test_org_set_dry_run_on_the_command_line_prints_the_preview_and_changes_nothing(cli):
    """The CLI prints the counts (JSON with --json), exits 0, and the org keeps its retention."""
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    text = cli("org", "set", "acme", "--retention", "7d", "--dry-run")
    assert text.code == 0 and "nothing was changed" in text.stdout and "30d -> 1w" in text.stdout
    machine = cli("org", "set", "acme", "--retention", "7d", "--dry-run", "--json")
    assert machine.json["dry_run"] is True and machine.json["due"] == 0
    assert cli("org", "show", "acme", "--json").json["retention"] == "30d"
    assert cli("org", "set", "acme", "--dry-run").code == 2
    assert cli("org", "set", "nobody", "--retention", "7d", "--dry-run").code == 3
    assert cli("org", "show", "nobody").code == 3
