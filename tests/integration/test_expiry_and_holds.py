"""The retention contract through the catalog and sweep, on SQLite and on PostgreSQL."""

from datetime import timedelta

import pytest
from sqlalchemy import text

from tests.factories import expiring_in, register_aged, seed_items, states, wait_past
from worker.catalog import Item
from worker.engine import build
from config.errors import BadInput, Gone, NotFound
from worker.responses import not_found_body


@pytest.fixture
def uploads(tmp_path):
    return tmp_path / "uploads"


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "30d")
    return "acme"


def blob_exists(catalog, item):
    return catalog.store.exists(item.key)


def test_ttl_item_is_deleted_once_its_ttl_passed_and_lookups_answer_gone(catalog, acme, uploads):
    """An item with TTL 1h created 2h ago is swept: blob removed, lookup raises Gone with reason ttl."""
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    counts = catalog.sweeper.sweep()
    assert (counts.claimed, counts.deleted, counts.bytes_freed) == (1, 1, item.size)
    assert not blob_exists(catalog, item)
    with pytest.raises(Gone) as gone:
        catalog.lookup(item.id)
    assert not_found_body(item.id, gone.value.tombstone)["status"] == 404 and gone.value.tombstone.reason == "ttl"
    assert gone.value.tombstone.deleted_at is not None


def test_item_is_never_deleted_before_its_expiry(catalog, acme, uploads):
    """An item one minute short of its TTL survives a sweep untouched."""
    item = register_aged(catalog, acme, timedelta(minutes=59), ttl="1h", uploads=uploads)
    assert catalog.sweeper.sweep().claimed == 0
    assert catalog.lookup(item.id).state == "active" and blob_exists(catalog, item)


def test_an_item_past_its_ttl_answers_gone_on_every_lookup_before_any_sweep_claims_it(catalog, acme, uploads):
    """Expired by the database clock and not yet swept: lookup, find and find_for_org answer gone (ttl, expired)."""
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    with pytest.raises(Gone) as gone:
        catalog.lookup(item.id)
    assert not_found_body(item.id, gone.value.tombstone) == {
        "id": item.id, "status": 404, "error": "gone", "reason": "ttl", "deleted_at": item.expires_at.isoformat(),
        "state": "expired"}
    assert catalog.find(item.id) == gone.value.tombstone == catalog.lookups.find_for_org(acme, item.id)
    assert catalog.lookups.find_for_org("other", item.id) is None
    assert states(catalog, [item.id]) == {item.id: "active"} and blob_exists(catalog, item)


def test_an_item_without_ttl_answers_gone_with_reason_retention_once_org_set_shortens_the_retention(catalog, acme, uploads):
    """A 10-day-old TTL-less item is served under 30d; after `org set --retention 7d` it answers gone (retention)
    before any sweep."""
    item = register_aged(catalog, acme, timedelta(days=10), uploads=uploads)
    assert catalog.lookup(item.id).state == "active"
    catalog.set_org(acme, "7d")
    with pytest.raises(Gone) as gone:
        catalog.lookup(item.id)
    tombstone = gone.value.tombstone
    assert (tombstone.state, tombstone.reason) == ("expired", "retention")
    assert tombstone.deleted_at == item.created_at + timedelta(days=7)


@pytest.mark.parametrize("hold", ["item", "org"])
def test_a_held_item_past_its_expiry_is_served_until_the_hold_is_released(catalog, acme, uploads, hold):
    """Held media is kept and served past its expiry (item or org hold placed before it); released, it answers gone
    at once."""
    item = expiring_in(catalog, acme, 3, uploads=uploads)
    scope = {"ids": [item.id]} if hold == "item" else {"org": acme}
    catalog.set_hold(held=True, reason="litigation", **scope)
    wait_past(catalog, item)
    assert catalog.lookup(item.id).state == "active" and isinstance(catalog.find(item.id), Item)
    catalog.set_hold(held=False, reason="case closed", **scope)
    with pytest.raises(Gone) as gone:
        catalog.lookup(item.id)
    assert (gone.value.tombstone.state, gone.value.tombstone.reason) == ("expired", "ttl")


def test_item_without_ttl_follows_its_org_retention(catalog, acme, uploads):
    """Without a TTL an item lives the org's 30 days: 29 days old survives, 31 days old goes with reason retention."""
    young = register_aged(catalog, acme, timedelta(days=29), uploads=uploads)
    old = register_aged(catalog, acme, timedelta(days=31), uploads=uploads)
    catalog.sweeper.sweep()
    assert states(catalog, [young.id, old.id]) == {young.id: "active", old.id: "deleted"}
    with pytest.raises(Gone) as gone:
        catalog.lookup(old.id)
    assert gone.value.tombstone.reason == "retention"


def test_ttl_longer_than_org_retention_keeps_the_item(catalog, uploads):
    """A 7d TTL outlives a 1d org retention: a 3-day-old item stays."""
    catalog.set_org("short", "1d")
    item = register_aged(catalog, "short", timedelta(days=3), ttl="7d", uploads=uploads)
    catalog.sweeper.sweep()
    assert catalog.lookup(item.id).state == "active"


def test_ttl_shorter_than_org_retention_deletes_the_item_early(catalog, acme, uploads):
    """A 1h TTL beats a 30d org retention: a 2-hour-old item goes."""
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    catalog.sweeper.sweep()
    assert states(catalog, [item.id]) == {item.id: "deleted"}


def test_shortening_org_retention_applies_to_stored_items_on_the_next_sweep(catalog, acme, uploads):
    """Items 10 days old survive 30d retention; after `org set --retention 7d` the next sweep deletes them,
    while an item with its own TTL keeps its TTL."""
    aged = register_aged(catalog, acme, timedelta(days=10), uploads=uploads)
    with_ttl = register_aged(catalog, acme, timedelta(days=10), ttl="30d", uploads=uploads)
    assert catalog.sweeper.sweep().claimed == 0
    catalog.set_org(acme, "7d")
    catalog.sweeper.sweep()
    assert states(catalog, [aged.id, with_ttl.id]) == {aged.id: "deleted", with_ttl.id: "active"}


def test_lengthening_org_retention_keeps_items_not_yet_expired_and_revives_none_already_gone(catalog, uploads):
    """Under 5d retention, an item 3 days old is live and one 6 days old expired (404, not swept yet). Raising
    retention to 30d gives the live one the new expiry; the expired one stays gone (expired is final: an expiry
    sweep may have deleted its blob already) and the sweep takes it."""
    catalog.set_org("grow", "5d")
    live = register_aged(catalog, "grow", timedelta(days=3), uploads=uploads)
    expired = register_aged(catalog, "grow", timedelta(days=6), uploads=uploads)
    catalog.set_org("grow", "30d")
    assert catalog.lookup(live.id).expires_at == live.created_at + timedelta(days=30)
    with pytest.raises(Gone):
        catalog.lookup(expired.id)
    counts = catalog.sweeper.sweep()
    assert counts.deleted == 1
    assert isinstance(catalog.lookup(live.id), Item)


def org_audit(catalog, org):
    from sqlalchemy import select

    from worker.models import AuditEvent

    with catalog.db.transaction() as session:
        return session.execute(select(AuditEvent.action, AuditEvent.details).where(AuditEvent.org_id == org).order_by(AuditEvent.id)).all()


def test_org_set_without_a_retention_reschedules_nothing_whatever_the_default(catalog, acme, uploads, settings):
    """The audit's repro: a 30d org, items 2 h old, `org set acme` under a 1 h default retention;
    the org keeps 30d, its items keep their expiry, the sweep deletes nothing, nothing is audited."""
    items = [register_aged(catalog, acme, timedelta(hours=2), uploads=uploads) for _ in range(3)]
    before = org_audit(catalog, acme)
    short_default = build(settings.model_copy(update={"default_retention": timedelta(hours=1)}), database=catalog.db,
                          store=catalog.store).catalog
    assert short_default.set_org(acme).retention == "30d"
    assert [catalog.lookup(item.id).expires_at for item in items] == [item.expires_at for item in items]
    assert catalog.sweeper.sweep().claimed == 0
    assert org_audit(catalog, acme) == before


def test_org_set_to_the_retention_it_already_has_changes_and_audits_nothing(catalog, acme, uploads):
    """`org set acme --retention 30d` on a 30d org: no rescheduling, no audit event."""
    item = register_aged(catalog, acme, timedelta(days=1), uploads=uploads)
    before = org_audit(catalog, acme)
    catalog.set_org(acme, "720h")
    assert catalog.lookup(item.id).expires_at == item.expires_at and org_audit(catalog, acme) == before


def test_a_real_retention_change_is_audited_with_the_old_and_new_value(catalog, acme, uploads):
    """30d -> 7d records previous, new and how many items were rescheduled."""
    register_aged(catalog, acme, timedelta(days=1), uploads=uploads)
    catalog.set_org(acme, "7d")
    action, details = org_audit(catalog, acme)[-1]
    assert (action, details["previous"], details["retention"], details["items_rescheduled"]) == ("org_set", "30d", "1w", 1)


def test_held_item_survives_sweeps_and_purges_until_released(catalog, acme, uploads):
    """A hold placed before the expiry stops both the sweep and a purge past it; after release the next sweep
    deletes it."""
    item = expiring_in(catalog, acme, 3, uploads=uploads)
    catalog.set_hold(held=True, reason="litigation 42", ids=[item.id], actor="legal")
    wait_past(catalog, item)
    counts = catalog.sweeper.sweep()
    assert (counts.claimed, counts.held_skipped) == (0, 1)
    purge = catalog.purge(ids=[item.id])
    assert (purge.held_skipped, purge.counts.deleted) == (1, 0)
    assert blob_exists(catalog, item)
    catalog.set_hold(held=False, reason="case closed", ids=[item.id], actor="legal")
    assert catalog.sweeper.sweep().deleted == 1
    assert not blob_exists(catalog, item)


def test_org_hold_protects_every_item_of_the_org_but_not_other_orgs(catalog, acme, uploads):
    """While an org is held none of its expired items are deleted or purgeable; other orgs are swept."""
    catalog.set_org("other", "30d")
    held = [expiring_in(catalog, acme, 3, uploads=uploads) for _ in range(3)]
    free = expiring_in(catalog, "other", 3, uploads=uploads)
    catalog.set_hold(held=True, reason="audit", org=acme)
    wait_past(catalog, *held, free)
    counts = catalog.sweeper.sweep()
    assert (counts.deleted, counts.held_skipped) == (1, 3)
    with pytest.raises(BadInput, match="on hold"):
        catalog.purge(org=acme)
    assert all(blob_exists(catalog, item) for item in held) and not blob_exists(catalog, free)
    catalog.set_hold(held=False, reason="audit done", org=acme)
    assert catalog.sweeper.sweep().deleted == 3


def test_holds_and_releases_are_recorded_with_who_and_why(catalog, acme, uploads):
    """The audit trail keeps actor and reason of every hold and release."""
    from sqlalchemy import select

    from worker.models import AuditEvent

    item = register_aged(catalog, acme, timedelta(hours=1), uploads=uploads)
    catalog.set_hold(held=True, reason="subpoena", ids=[item.id], actor="alice")
    catalog.set_hold(held=False, reason="withdrawn", ids=[item.id], actor="bob")
    with catalog.db.transaction() as session:
        trail = session.execute(
            select(AuditEvent.action, AuditEvent.actor, AuditEvent.reason).where(AuditEvent.media_id == item.id).order_by(AuditEvent.id)
        ).all()
    assert [tuple(row) for row in trail] == [("hold", "alice", "subpoena"), ("release", "bob", "withdrawn")]


def test_holding_an_item_already_being_deleted_is_refused(catalog, acme, uploads):
    """Once claimed, an item can no longer be held (its ID already answers 404)."""
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    catalog.sweeper.claim_expired(10)
    with pytest.raises(Gone):
        catalog.set_hold(held=True, reason="too late", ids=[item.id])


def test_purge_deletes_unexpired_items_now_with_reason_purge(catalog, acme, uploads):
    """A purge ignores expiry: a fresh item is deleted at once and its tombstone says purge."""
    item = register_aged(catalog, acme, timedelta(minutes=1), uploads=uploads)
    summary = catalog.purge(ids=[item.id], actor="ops")
    assert summary.counts.deleted == 1 and not blob_exists(catalog, item)
    with pytest.raises(Gone) as gone:
        catalog.lookup(item.id)
    assert gone.value.tombstone.reason == "purge"


def test_purge_of_an_org_deletes_all_its_unheld_items_and_nothing_else(catalog, acme, uploads):
    """org purge removes every unheld item of that org (reason org_purge), spares held items and other orgs."""
    catalog.set_org("other", "30d")
    doomed = [register_aged(catalog, acme, timedelta(minutes=5), uploads=uploads) for _ in range(120)]
    kept = register_aged(catalog, acme, timedelta(minutes=5), uploads=uploads)
    catalog.set_hold(held=True, reason="keep", ids=[kept.id])
    bystander = register_aged(catalog, "other", timedelta(minutes=5), uploads=uploads)
    summary = catalog.purge(org=acme)
    assert (summary.counts.deleted, summary.held_skipped) == (120, 1)
    assert set(states(catalog, [d.id for d in doomed]).values()) == {"deleted"}
    assert blob_exists(catalog, kept) and blob_exists(catalog, bystander)
    with pytest.raises(Gone) as gone:
        catalog.lookup(doomed[0].id)
    assert gone.value.tombstone.reason == "org_purge"


@pytest.mark.parametrize("scope", ["ids", "org"])
def test_a_purge_accounts_for_every_eligible_item_when_holds_and_a_sweep_win_some_meanwhile(catalog, acme, media_root,
                                                                                            monkeypatch, scope):
    """Between the purge's count and its first claim another session holds three eligible items and a sweep
    takes the two expired ones: the result reports them held and gone since the count, and adds up."""
    due = seed_items(catalog.db, media_root, acme, 2, prefix="due")
    fresh = seed_items(catalog.db, media_root, acme, 8, prefix="fresh", expired=False)
    name = "claim_org" if scope == "org" else "claim_ids"
    claim = getattr(catalog.sweeper, name)
    meddled: list[bool] = []

    def hold_and_sweep_then_claim(*args):
        if not meddled:
            meddled.append(True)
            catalog.set_hold(held=True, reason="new case", ids=fresh[:3])
            assert catalog.sweeper.sweep().deleted == 2
        return claim(*args)

    monkeypatch.setattr(catalog.sweeper, name, hold_and_sweep_then_claim)
    body = (catalog.purge(org=acme) if scope == "org" else catalog.purge(ids=due + fresh)).to_dict()
    accounted = body["deleted"] + body["failed"] + body.get("held_since_count", 0) + body.get("gone_since_count", 0)
    assert meddled and body["eligible"] == accounted == 10, body
    assert (body["deleted"], body["held_since_count"], body["gone_since_count"], body["held_skipped"]) == (5, 3, 2, 0)
    assert states(catalog, fresh[:3]) == dict.fromkeys(fresh[:3], "active")


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_an_org_purge_waits_for_rows_another_transaction_holds_locked_instead_of_leaving_them(catalog, acme, media_root):
    """Two of the org's items are locked by an open transaction (as a retention rewrite or an item hold
    locks them): the org's claims skip them, then the purge claims them by name once the lock is gone."""
    import threading
    import time

    from tests.factories import blocked_by
    from worker import items as items_sql

    ids = seed_items(catalog.db, media_root, acme, 10, expired=False)
    results = []
    purger = threading.Thread(target=lambda: results.append(catalog.purge(org=acme)))
    with catalog.db.transaction() as session:
        items_sql.locked_by_ids(session, ids[:2])
        pid = session.scalar(text("SELECT pg_backend_pid()"))
        purger.start()
        deadline = time.monotonic() + 10
        while purger.is_alive() and not blocked_by(catalog.db, pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    purger.join(timeout=30)
    [summary] = results
    assert (summary.eligible, summary.counts.deleted, summary.held_since_count, summary.gone_since_count) == (10, 10, 0, 0)
    assert set(states(catalog, ids).values()) == {"deleted"}


def test_purge_dry_run_changes_nothing(catalog, acme, uploads):
    """--dry-run reports what would go and leaves every item active."""
    item = register_aged(catalog, acme, timedelta(minutes=1), uploads=uploads)
    summary = catalog.purge(ids=[item.id], dry_run=True)
    assert summary.would_delete == (item.id,) and catalog.lookup(item.id).state == "active"


def test_sweep_dry_run_lists_due_items_without_claiming_them(catalog, acme, uploads):
    """A dry run names the expired items and their bytes, and a real sweep afterwards still finds them."""
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    register_aged(catalog, acme, timedelta(minutes=5), ttl="1h", uploads=uploads)
    preview = catalog.sweeper.sweep(dry_run=True)
    assert (preview.due, preview.due_bytes, preview.claimed) == (1, item.size, 0)
    assert [entry["id"] for entry in preview.would_delete] == [item.id]
    assert catalog.sweeper.sweep().deleted == 1


def test_sweep_limit_caps_how_many_items_one_sweep_claims(catalog, acme, uploads):
    """With limit 2, one sweep deletes two of five expired items and the next sweep takes the rest."""
    for _ in range(5):
        register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    assert catalog.sweeper.sweep(limit=2).deleted == 2
    assert catalog.sweeper.sweep().deleted == 3


def test_blob_already_missing_counts_as_deleted(catalog, acme, uploads):
    """If the blob vanished before the sweep, the item still becomes a tombstone and counts as deleted."""
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    (catalog.store.root / item.key).unlink()
    counts = catalog.sweeper.sweep()
    assert (counts.deleted, counts.already_missing, counts.bytes_freed) == (1, 1, 0)


def test_lookup_of_an_unknown_id_is_not_found(catalog):
    """An ID never registered raises NotFound, not Gone."""
    with pytest.raises(NotFound):
        catalog.lookup("never-seen")


def test_ids_are_never_reused_even_after_deletion(catalog, acme, uploads):
    """Registering an ID whose item was deleted is refused: the tombstone keeps answering 404."""
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    catalog.sweeper.sweep()
    with pytest.raises(BadInput, match="already exists"):
        register_aged(catalog, acme, timedelta(0), media_id=item.id, uploads=uploads)


def test_media_registered_into_a_held_org_is_held_until_the_org_is_released(catalog, acme, uploads):
    """An item added while its org is on hold is protected like the rest: not swept, not purged by ID,
    counted as held; after release the next sweep deletes it."""
    catalog.set_hold(held=True, reason="audit", org=acme)
    item = register_aged(catalog, acme, timedelta(hours=2), ttl="1h", uploads=uploads)
    assert catalog.sweeper.sweep().held_skipped == 1
    purge = catalog.purge(ids=[item.id])
    assert (purge.eligible, purge.held_skipped) == (0, 1)
    assert catalog.lookup(item.id).state == "active"
    catalog.set_hold(held=False, reason="audit done", org=acme)
    assert catalog.sweeper.sweep().deleted == 1


def test_status_backlog_excludes_held_media_and_counts_it_separately(catalog, acme, uploads):
    """Held expired items are not 'due': status reports them under held_expired."""
    from worker.status import due_count, fleet_status

    catalog.set_org("other", "30d")
    items = [expiring_in(catalog, org, 3, uploads=uploads) for org in (acme, "other")]
    catalog.set_hold(held=True, reason="audit", org=acme)
    wait_past(catalog, *items)
    numbers = fleet_status(catalog.db)
    assert (numbers["backlog"]["due"], numbers["held_expired"], due_count(catalog.db)) == (1, 1, 1)
