"""Legal holds by case (issue #23): several cases at once, holds by query (with --include-future), `hold list`,
the audit, the preview by case, and bad input; on SQLite and on PostgreSQL. The races that need two real
connections run on PostgreSQL."""

import json
import os
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from config.errors import BadInput, NotFound
from tests.factories import blocked_by, db_time, make_file, plant_blob, register_aged, rows_by_id, states
from worker import items as items_sql
from worker.models import AuditEvent, Hold, HoldItem, MediaItem
from worker.verify import Verifier


@pytest.fixture
def uploads(tmp_path):
    return tmp_path / "uploads"


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "90d")
    return "acme"


def lapse(catalog, org="acme"):
    """The org's retention shortened to 30 days: what `expired` made is past it from now on, unless held. Holds are
    placed before (expired is final: a hold never covers an item already gone by its expiry)."""
    catalog.set_org(org, "30d")


def expired(catalog, org, uploads, media_id, *, mime=None, age=timedelta(days=40)):
    """An item of `org` created `age` ago: live under the 90-day retention it is made with, past the 30-day one
    once `lapse` set it, unless held."""
    created = db_time(catalog) - age
    return catalog.register(org=org, file=make_file(uploads, media_id.encode()), media_id=media_id, created_at=created,
                            mime=mime)


def held_ids(catalog, ids):
    rows = rows_by_id(catalog, ids)
    return {media_id for media_id, row in rows.items() if row.held_at is not None or row.org_held}


def catalog_state(catalog):
    """Everything a hold could change: the holds, their items, the items' hold columns, the audit trail."""
    with catalog.db.transaction() as session:
        return (session.execute(select(Hold.id, Hold.released_at).order_by(Hold.id)).all(),
                session.execute(select(HoldItem.hold_id, HoldItem.item_id).order_by(HoldItem.hold_id, HoldItem.item_id)).all(),
                session.execute(select(MediaItem.id, MediaItem.held_at, MediaItem.org_held).order_by(MediaItem.id)).all(),
                session.scalar(select(func.count()).select_from(AuditEvent)))


def test_releasing_one_case_keeps_items_another_case_holds(catalog, acme, uploads):
    """Cases A and B hold item 1, A alone holds item 2: releasing A deletes item 2 at the next sweep, never item 1."""
    one, two = expired(catalog, acme, uploads, "one"), expired(catalog, acme, uploads, "two")
    catalog.set_hold(held=True, reason="a", ids=[one.id, two.id], case="case-a")
    catalog.set_hold(held=True, reason="b", ids=[one.id], case="case-b")
    lapse(catalog)
    assert catalog.sweeper.sweep().claimed == 0
    released = catalog.set_hold(held=False, reason="done with a", ids=[one.id, two.id], case="case-a")
    assert released.changed == (two.id,)
    assert catalog.sweeper.sweep().deleted == 1
    assert states(catalog, [one.id, two.id]) == {one.id: "active", two.id: "deleted"}
    assert catalog.lookup(one.id).state == "active"
    catalog.set_hold(held=False, reason="done with b", case="case-b", release_all=True)
    assert catalog.sweeper.sweep().deleted == 1


def test_an_item_held_by_a_query_case_and_its_orgs_case_stays_held_until_both_release(catalog, acme, uploads):
    """An org case and a query case overlap: either alone keeps the item; it goes only once both released."""
    item = expired(catalog, acme, uploads, "both")
    now = db_time(catalog)
    catalog.set_hold(held=True, reason="org", org=acme, case="org-case")
    catalog.set_hold(held=True, reason="q", org=acme, case="query-case", created_after=now - timedelta(days=60),
                     created_before=now)
    lapse(catalog)
    catalog.set_hold(held=False, reason="r", org=acme, case="org-case")
    assert catalog.sweeper.sweep().claimed == 0 and held_ids(catalog, [item.id]) == {item.id}
    catalog.set_hold(held=True, reason="org again", org=acme, case="org-case")
    catalog.set_hold(held=False, reason="r", org=acme, case="query-case")
    assert catalog.sweeper.sweep().claimed == 0
    catalog.set_hold(held=False, reason="r", org=acme, case="org-case")
    assert catalog.sweeper.sweep().deleted == 1


def test_a_query_hold_holds_items_created_in_its_half_open_window_whose_mime_matches_in_any_case(catalog, acme, uploads):
    """[after, before) on created_at; `image/*` matches IMAGE/PNG and image/JPEG, not video; `image/PNG` matches
    IMAGE/PNG and Image/Png only; items of another org are untouched."""
    catalog.set_org("other", "30d")
    now = db_time(catalog)
    after, before = now - timedelta(days=50), now - timedelta(days=30)
    made = {}
    for media_id, org, age, mime in [("at-after", acme, timedelta(days=50), "IMAGE/PNG"),
                                     ("inside", acme, timedelta(days=40), "image/JPEG"),
                                     ("at-before", acme, timedelta(days=30), "image/png"),
                                     ("video", acme, timedelta(days=40), "video/mp4"),
                                     ("png-params", acme, timedelta(days=45), "Image/Png"),
                                     ("elsewhere", "other", timedelta(days=40), "image/png")]:
        made[media_id] = catalog.register(org=org, file=make_file(uploads, media_id.encode()), media_id=media_id,
                                          created_at=now - age, mime=mime)
    wide = catalog.set_hold(held=True, reason="q", org=acme, case="images", created_after=after, created_before=before,
                            mime="image/*")
    assert wide.items == 3 and held_ids(catalog, made) == {"at-after", "inside", "png-params"}
    narrow = catalog.set_hold(held=True, reason="q", org=acme, case="pngs", created_after=after, created_before=before,
                              mime="image/PNG")
    assert narrow.items == 2  # at-after (IMAGE/PNG) and png-params
    catalog.set_hold(held=False, reason="r", case="images", release_all=True)
    assert held_ids(catalog, made) == {"at-after", "png-params"}
    lapse(catalog)
    catalog.sweeper.sweep()
    assert states(catalog, list(made)) == {"at-after": "active", "inside": "deleted", "at-before": "deleted",
                                           "video": "deleted", "png-params": "active", "elsewhere": "deleted"}


@pytest.mark.parametrize("include_future", [True, False])
def test_include_future_holds_media_registered_later_in_the_window_by_every_insert_path(catalog, acme, uploads, tmp_path, media_root,
                                                                                       include_future):
    """With --include-future, media registered after the placement (register --file, --key, a manifest, adopt)
    inside the window and matching is held from its registration; outside the window or another type it is not.
    Without it, none of them is."""
    now = db_time(catalog)
    catalog.set_hold(held=True, reason="lit", org=acme, case="lit", created_after=now - timedelta(days=60),
                     created_before=now + timedelta(days=1), mime="image/*", include_future=include_future)
    inside = expired(catalog, acme, uploads, "by-file", mime="image/png")
    outside = expired(catalog, acme, uploads, "too-old", mime="image/png", age=timedelta(days=70))
    other_type = expired(catalog, acme, uploads, "a-video", mime="video/mp4")
    plant_blob(media_root, "up/by-key.png")
    catalog.register(org=acme, key="up/by-key.png", media_id="by-key", created_at=now - timedelta(days=40))
    files = [make_file(uploads / "m", f"manifest {n}".encode()) for n in range(2)]
    lines = [{"org": acme, "id": f"manifest-{n}", "file": str(path), "mime": "image/gif",
              "created_at": (now - timedelta(days=40)).isoformat()} for n, path in enumerate(files)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    catalog.register_manifest(tmp_path / "m.jsonl", files_root=uploads / "m")
    planted = plant_blob(media_root, "adopted/pic.jpg")
    two_days_ago = (now - timedelta(days=2)).timestamp()
    os.utime(planted, (two_days_ago, two_days_ago))  # adopt dates it by its modification time, past its grace
    adopted = catalog.adopter().run(org=acme, under="adopted", grace=timedelta(hours=1), actor="ops")
    assert adopted.to_dict()["adopted"] == 1
    with catalog.db.transaction() as session:
        adopted_id = session.scalar(select(MediaItem.id).where(MediaItem.storage_key == "adopted/pic.jpg"))
    later = ["by-file", "by-key", "manifest-0", "manifest-1", adopted_id]
    assert held_ids(catalog, later + [outside.id, other_type.id]) == (set(later) if include_future else set())
    assert catalog.list_holds(case="lit")[0].items_held == (len(later) if include_future else 0)
    catalog.set_hold(held=False, reason="done", case="lit", release_all=True)
    assert held_ids(catalog, later) == set()
    assert inside.id in later


def test_hold_list_shows_each_case_with_who_when_why_scope_and_how_many_it_holds_now(catalog, acme, uploads):
    """Two cases, three placements: each case lists its placements and counts the distinct items it holds now."""
    one = expired(catalog, acme, uploads, "one")
    expired(catalog, acme, uploads, "two")
    now = db_time(catalog)
    catalog.set_hold(held=True, reason="subpoena", ids=[one.id], case="c1", actor="alice")
    catalog.set_hold(held=True, reason="audit", org=acme, case="c2", actor="bob")
    catalog.set_hold(held=True, reason="wider", org=acme, case="c1", created_after=now - timedelta(days=50),
                     created_before=now, actor="alice")
    cases = {view.case: view for view in catalog.list_holds()}
    assert (cases["c1"].items_held, cases["c2"].items_held) == (2, 2)
    assert [(p.scope, p.by, p.reason) for p in cases["c1"].placements] == [("item", "alice", "subpoena"),
                                                                           ("query", "alice", "wider")]
    assert [(p.scope, p.org, p.by) for p in cases["c2"].placements] == [("org", acme, "bob")]
    catalog.set_hold(held=False, reason="r", org=acme, case="c1")
    assert {view.case: view.items_held for view in catalog.list_holds(org=acme)} == {"c1": 1, "c2": 2}
    assert [view.case for view in catalog.list_holds(case="c2")] == ["c2"]
    with pytest.raises(NotFound):
        catalog.list_holds(case="never")


def test_every_placement_and_release_is_audited_with_its_case(catalog, acme, uploads):
    one = expired(catalog, acme, uploads, "one")
    now = db_time(catalog)
    catalog.set_hold(held=True, reason="r1", ids=[one.id], case="c1", actor="alice")
    catalog.set_hold(held=True, reason="r2", org=acme, case="c2", actor="bob")
    catalog.set_hold(held=True, reason="r3", org=acme, case="c3", created_after=now - timedelta(days=41),
                     created_before=now, include_future=True, actor="carol")
    catalog.set_hold(held=False, reason="x1", ids=[one.id], case="c1", actor="alice")
    catalog.set_hold(held=False, reason="x2", org=acme, case="c2", actor="bob")
    catalog.set_hold(held=False, reason="x3", case="c3", release_all=True, actor="carol")
    with catalog.db.transaction() as session:
        events = session.execute(select(AuditEvent.action, AuditEvent.actor, AuditEvent.reason, AuditEvent.details)
                                 .where(AuditEvent.action.like("%hold%") | AuditEvent.action.like("%release%"))
                                 .order_by(AuditEvent.id)).all()
    assert [(action, actor, reason, details["case"]) for action, actor, reason, details in events] == [
        ("hold", "alice", "r1", "c1"), ("org_hold", "bob", "r2", "c2"), ("query_hold", "carol", "r3", "c3"),
        ("release", "alice", "x1", "c1"), ("org_release", "bob", "x2", "c2"), ("query_release", "carol", "x3", "c3"),
        ("case_release", "carol", "x3", "c3")]
    assert events[2].details["include_future"] is True and events[2].details["items"] == 1


def test_the_retention_preview_counts_held_items_by_case(catalog, acme, uploads):
    """`org set --retention 1h --dry-run`: held items that would be due, per case (an item two cases hold counts
    for each), and the total held as before."""
    one, two = expired(catalog, acme, uploads, "one"), expired(catalog, acme, uploads, "two")
    fresh = register_aged(catalog, acme, timedelta(minutes=10), uploads=uploads)
    catalog.set_hold(held=True, reason="a", ids=[one.id, two.id, fresh.id], case="case-a")
    catalog.set_hold(held=True, reason="b", ids=[one.id], case="case-b")
    preview = catalog.preview_retention(acme, "1h")
    assert (preview.held, preview.held_by_case) == (2, {"case-a": 2, "case-b": 1})
    assert preview.to_dict()["held_by_case"] == {"case-a": 2, "case-b": 1}


def test_hold_and_release_without_a_case_use_the_default_case_and_keep_their_meaning(catalog, acme, uploads):
    """`hold ID` / `release ID` and `hold --org` / `release --org` without --case place and release the case
    `default`; releasing it leaves what a named case holds."""
    one = expired(catalog, acme, uploads, "one")
    placed = catalog.set_hold(held=True, reason="old style", ids=[one.id])
    assert (placed.case, placed.changed) == ("default", (one.id,))
    catalog.set_hold(held=True, reason="old style", org=acme)
    catalog.set_hold(held=True, reason="named", ids=[one.id], case="named")
    assert catalog.set_hold(held=False, reason="r", ids=[one.id]).changed == ()
    assert catalog.set_hold(held=False, reason="r", org=acme).changed == (acme,)
    lapse(catalog)
    assert catalog.sweeper.sweep().claimed == 0
    catalog.set_hold(held=False, reason="r", ids=[one.id], case="named")
    assert catalog.sweeper.sweep().deleted == 1
    # Releasing what the default case does not hold changes nothing and is no error, as before cases.
    assert catalog.set_hold(held=False, reason="r", org=acme).changed == ()


@pytest.mark.parametrize("bad", [
    dict(held=True, org="acme", created_after="2026-05-01T00:00:00Z", created_before="2026-03-01T00:00:00Z"),
    dict(held=True, org="acme", created_after="2026-03-01T00:00:00Z", created_before="2026-03-01T00:00:00Z"),
    dict(held=True, org="acme", created_after="2026-03-01T00:00:00Z"),
    dict(held=True, org="acme", created_after="yesterday", created_before="2026-03-01T00:00:00Z"),
    dict(held=True, org="acme", created_after="2026-01-01", created_before="2026-03-01", mime="image"),
    dict(held=True, org="acme", created_after="2026-01-01", created_before="2026-03-01", mime="*/*"),
    dict(held=True, org="acme", created_after="2026-01-01", created_before="2026-03-01", mime="image/%"),
    dict(held=True, org="acme", mime="image/*"),
    dict(held=True, org="acme", include_future=True),
    dict(held=True, ids=["one"], created_after="2026-01-01", created_before="2026-03-01"),
    dict(held=True, ids=["one"], case="bad case"),
    dict(held=True, ids=["one"], case="a" * 129),
    dict(held=True, ids=["one"], case=".."),
    dict(held=False, ids=["one"], case="never-placed"),
    dict(held=False, case="never-placed", release_all=True),
    dict(held=False, release_all=True),
    dict(held=False, org="acme", created_after="2026-01-01", created_before="2026-03-01"),
], ids=lambda bad: ",".join(f"{k}={v}" for k, v in bad.items())[:60])
def test_bad_hold_input_is_refused_with_one_sentence_and_changes_nothing(catalog, acme, uploads, bad):
    one = expired(catalog, acme, uploads, "one")
    catalog.set_hold(held=True, reason="keep", ids=[one.id], case="kept")
    before = catalog_state(catalog)
    with pytest.raises(BadInput) as refused:
        catalog.set_hold(reason="x", **bad)
    assert "\n" not in str(refused.value) and str(refused.value).endswith(".")
    assert catalog_state(catalog) == before


def test_holds_on_the_command_line_with_cases_queries_and_hold_list(cli):
    """The CLI: hold by query with --case, `hold list --json`, release by case; bad input exits 2 with one line."""
    assert cli("org", "set", "acme", "--retention", "30d").code == 0
    placed = cli("hold", "--org", "acme", "--created-after", "2026-01-01T00:00:00Z", "--created-before",
                 "2026-02-01T00:00:00Z", "--mime", "image/*", "--include-future", "--case", "lit-1", "--reason",
                 "subpoena", "--by", "alice", "--json")
    assert placed.code == 0, placed.stderr
    assert (placed.json["case"], placed.json["scope"], placed.json["items"]) == ("lit-1", "query", 0)
    listed = cli("hold", "list", "--json")
    assert listed.code == 0 and [case["case"] for case in listed.json["cases"]] == ["lit-1"]
    assert listed.json["cases"][0]["placements"][0]["include_future"] is True
    assert "case lit-1: open, holds 0 items now" in cli("hold", "list").stdout
    bad = cli("hold", "--org", "acme", "--created-after", "2026-02-01", "--created-before", "2026-01-01", "--case",
              "x", "--reason", "r")
    assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert cli("release", "--case", "nope", "--reason", "r").code == 2
    released = cli("release", "--case", "lit-1", "--reason", "settled", "--json")
    assert released.code == 0 and released.json["holds"] == placed.json["holds"]
    assert cli("hold", "list", "--json").json["cases"][0]["open"] is False


# -- races on PostgreSQL: two real connections -----------------------------------------------------------


class Pause:
    """Pauses the first call of a function taking the session first (after it ran, inside its transaction) until
    `go` is set; `pid` is that transaction's backend, whose locks the other side waits for."""

    def __init__(self, real):
        self.real, self.reached, self.go, self.pid = real, threading.Event(), threading.Event(), None

    def __call__(self, session, *args, **kwargs):
        result = self.real(session, *args, **kwargs)
        if not self.reached.is_set():
            self.pid = session.scalar(text("SELECT pg_backend_pid()"))
            self.reached.set()
            assert self.go.wait(30)
        return result


def blocked_or_done(db, pid: int, other: threading.Thread, timeout: float = 10.0) -> None:
    """Return once `other` waits for a lock of backend `pid`, or has finished without waiting (what a missing lock
    lets it do: the outcome assertions then say what that cost)."""
    deadline = time.monotonic() + timeout
    while other.is_alive() and not blocked_by(db, pid):
        assert time.monotonic() < deadline, f"the other side neither waited for backend {pid} nor finished"
        time.sleep(0.02)


def _paused(monkeypatch, name: str) -> Pause:
    pause = Pause(getattr(items_sql, name))
    monkeypatch.setattr(items_sql, name, pause)
    return pause


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_registration_committing_while_a_query_hold_is_placed_is_held(catalog, acme, uploads, monkeypatch):
    """A registration paused after inserting its row (its org share-locked, no placement seen yet); a query hold
    with --include-future placed meanwhile waits for it, then holds the row: nothing slips through unheld."""
    now = db_time(catalog)
    pause = _paused(monkeypatch, "insert_variants")  # right after insert_rows, in the same transaction
    registered = {}
    thread = threading.Thread(target=lambda: registered.setdefault("item", expired(catalog, acme, uploads, "racer")))
    thread.start()
    assert pause.reached.wait(30)
    placed = {}
    placer = threading.Thread(target=lambda: placed.setdefault("result", catalog.set_hold(
        held=True, reason="lit", org=acme, case="lit", created_after=now - timedelta(days=60), created_before=now,
        include_future=True)))
    placer.start()
    blocked_or_done(catalog.db, pause.pid, placer)
    pause.go.set()
    thread.join(30)
    placer.join(30)
    assert "item" in registered and placed["result"].items == 1
    assert held_ids(catalog, ["racer"]) == {"racer"} and catalog.sweeper.sweep().claimed == 0


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_registration_waiting_on_a_query_hold_being_placed_is_held_by_its_include_future(catalog, acme, uploads,
                                                                                          monkeypatch):
    """The other order: the placement is paused after its query (org locked FOR UPDATE); a registration waits for
    it, then sees the placement and holds its own row."""
    now = db_time(catalog)
    pause = _paused(monkeypatch, "hold_by_query")
    placed = {}
    placer = threading.Thread(target=lambda: placed.setdefault("result", catalog.set_hold(
        held=True, reason="lit", org=acme, case="lit", created_after=now - timedelta(days=60), created_before=now,
        include_future=True)))
    placer.start()
    assert pause.reached.wait(30)
    registered = {}
    thread = threading.Thread(target=lambda: registered.setdefault("item", expired(catalog, acme, uploads, "racer")))
    thread.start()
    blocked_or_done(catalog.db, pause.pid, thread)
    pause.go.set()
    placer.join(30)
    thread.join(30)
    assert placed["result"].items == 0 and "item" in registered
    assert held_ids(catalog, ["racer"]) == {"racer"} and catalog.sweeper.sweep().claimed == 0


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_query_hold_placed_while_a_sweep_holds_expired_rows_neither_waits_nor_holds_them(catalog, acme, uploads,
                                                                                          monkeypatch):
    """A sweep has picked expired rows (locked, its transaction open: on PostgreSQL it deletes their blobs before it
    writes them). A query hold over them placed meanwhile does not wait for them and holds none of them: they are
    gone by their expiry (expired is final). It holds the live item; the sweep deletes the three; verify stays clean."""
    ids = [expired(catalog, acme, uploads, f"old-{n}").id for n in range(3)]
    fresh = register_aged(catalog, acme, timedelta(days=1), uploads=uploads, media_id="fresh")
    lapse(catalog)
    now = db_time(catalog)
    name = "lock_expired" if catalog.db.sql.postgresql else "expired"
    real = getattr(items_sql.Claims, name)
    pause = Pause(None)

    def claim_then_pause(self, session, *args, **kwargs):
        pause.real = lambda inner, *rest, **named: real(self, inner, *rest, **named)
        return pause(session, *args, **kwargs)

    monkeypatch.setattr(items_sql.Claims, name, claim_then_pause)
    swept = {}
    sweeper = threading.Thread(target=lambda: swept.setdefault("counts", catalog.sweeper.sweep()))
    sweeper.start()
    assert pause.reached.wait(30)
    placed = catalog.set_hold(held=True, reason="lit", org=acme, case="lit", created_after=now - timedelta(days=60),
                              created_before=now + timedelta(days=1))
    assert placed.items == 1
    pause.go.set()
    sweeper.join(30)
    assert swept["counts"].deleted == 3
    assert states(catalog, ids + [fresh.id]) == {**{media_id: "deleted" for media_id in ids}, fresh.id: "active"}
    assert held_ids(catalog, ids + [fresh.id]) == {fresh.id}
    report = Verifier(catalog.db, catalog.store).run(grace=timedelta(days=1), stuck_after=timedelta(days=1))
    assert report.breaches["held_deleted"] == 0


def test_the_migration_makes_existing_holds_placements_of_the_default_case(database, tmp_path):
    """A catalog of 0011 with a held item and a held org: after the upgrade both are the case `default`'s, and
    `release` without --case releases them."""
    from worker import schema
    schema.downgrade(database, "base")
    schema.upgrade(database, "0011")
    with database.transaction() as session:
        session.execute(text("INSERT INTO organizations (id, retention_seconds, held_at, hold_reason) "
                             "VALUES ('acme', 3600, CURRENT_TIMESTAMP, 'org reason')"))
        for media_id, held in (("a", True), ("b", False)):
            session.execute(text(
                "INSERT INTO media_items (id, org_id, storage_key, size_bytes, mime_type, created_at, expires_at, state, "
                "held_at, hold_reason, org_held, attempts, has_variants) VALUES (:id, 'acme', :id, 1, 'image/png', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 'active', " + ("CURRENT_TIMESTAMP" if held else "NULL") +
                ", :reason, true, 0, false)"), {"id": media_id, "reason": "item reason" if held else None})
    schema.upgrade(database)
    with database.transaction() as session:
        holds = session.execute(select(Hold.case_name, Hold.scope, Hold.org_id, Hold.reason).order_by(Hold.id)).all()
        members = session.execute(select(HoldItem.item_id)).scalars().all()
        assert items_sql.held_without_case(session) == 0
    assert [tuple(row) for row in holds] == [("default", "org", "acme", "org reason"), ("default", "item", None, "item reason")]
    assert members == ["a"]
