"""Retention rules by content type (`org rule set|rm`), on SQLite and PostgreSQL: the most specific rule decides an
item's expiry (a TTL wins over every rule), every writer of `expires_at` honours it, a rule change reschedules
exactly the items whose deciding rule changes, a no-op changes nothing, and a registration racing a rule change
ends with the rules that committed first."""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from config.errors import BadInput, NotFound
from tests.factories import register_aged, states
from worker.catalog import registration as registration_module
from worker.catalog import rules as rules_module
from worker.items import governed_by
from worker.models import AuditEvent, MediaItem, Organization, RetentionRule
from worker.policy import governing_pattern, mime_essence
from worker.verify import Verifier

DAY = timedelta(days=1)


@pytest.fixture
def uploads(tmp_path):
    return tmp_path / "uploads"


@pytest.fixture
def acme(catalog):
    catalog.set_org("acme", "90d")
    return "acme"


def expiries(catalog) -> dict[str, object]:
    with catalog.db.transaction() as session:
        return dict(session.execute(select(MediaItem.id, MediaItem.expires_at)).all())


def audit_count(catalog) -> int:
    with catalog.db.transaction() as session:
        return session.scalar(select(func.count()).select_from(AuditEvent))


def org_stamp(catalog, org: str):
    with catalog.db.transaction() as session:
        return session.scalar(select(Organization.updated_at).where(Organization.id == org))


def lives(catalog, item) -> timedelta:
    """How long the item lives now, by its stored expiry."""
    return expiries(catalog)[item.id] - item.created_at


def test_the_most_specific_rule_decides_exact_over_wildcard_over_the_org_and_a_ttl_over_every_rule(catalog, acme, uploads):
    """image/png 7d, image/* 30d, org 90d: a png lives 7d, a jpeg 30d, a pdf 90d, a png with a 2d TTL 2d; matching
    ignores case and parameters (`Image/PNG`, `audio/OGG; codecs=opus` under audio/*)."""
    catalog.rules.set(acme, "image/png", "7d")
    catalog.rules.set(acme, "IMAGE/*", "30d")  # patterns are lowercased
    catalog.rules.set(acme, "audio/*", "2w")
    png = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/png")
    upper = register_aged(catalog, acme, DAY, uploads=uploads, mime="Image/PNG")
    jpeg = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/jpeg")
    pdf = register_aged(catalog, acme, DAY, uploads=uploads, mime="application/pdf")
    voice = register_aged(catalog, acme, DAY, uploads=uploads, mime="audio/OGG; codecs=opus")
    ttl = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/png", ttl="2d")
    assert [item.expires_at - item.created_at for item in (png, upper, jpeg, pdf, voice, ttl)] == [
        7 * DAY, 7 * DAY, 30 * DAY, 90 * DAY, 14 * DAY, 2 * DAY]
    assert [rule["mime"] for rule in catalog.show_org(acme).to_dict()["rules"]] == ["audio/*", "image/*", "image/png"]


def test_a_rule_change_reschedules_exactly_the_items_whose_deciding_rule_changes(catalog, acme, uploads):
    """Each step rewrites only the items it moves, to the microsecond: image/* over jpeg and png, then image/png over
    png only, then removing image/png hands png back to image/*, removing image/* hands both back to the org."""
    png = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/png")
    jpeg = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/jpeg")
    pdf = register_aged(catalog, acme, DAY, uploads=uploads, mime="application/pdf")
    ttl = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/png", ttl="1d")
    catalog.set_org("other", "90d")
    elsewhere = register_aged(catalog, "other", DAY, uploads=uploads, mime="image/png")

    steps = [
        (lambda: catalog.rules.set(acme, "image/*", "30d"), {png: 30, jpeg: 30}, 2),
        (lambda: catalog.rules.set(acme, "image/png", "7d"), {png: 7}, 1),
        (lambda: catalog.rules.set(acme, "image/png", "3d"), {png: 3}, 1),
        (lambda: catalog.rules.remove(acme, "image/png"), {png: 30}, 1),
        (lambda: catalog.rules.remove(acme, "image/*"), {png: 90, jpeg: 90}, 2),
    ]
    for change, moved, count in steps:
        before = expiries(catalog)
        result = change()
        after = expiries(catalog)
        assert result.items_rescheduled == count
        assert {media_id for media_id in after if after[media_id] != before[media_id]} == {item.id for item in moved}
        for item, days in moved.items():
            assert after[item.id] == item.created_at + timedelta(days=days)
    assert lives(catalog, pdf) == 90 * DAY and lives(catalog, ttl) == DAY and lives(catalog, elsewhere) == 90 * DAY


def test_org_set_reschedules_only_the_items_no_rule_covers(catalog, acme, uploads):
    """With image/* at 30d, `org set --retention 7d` moves the pdf to 7d and leaves the jpeg at 30d."""
    catalog.rules.set(acme, "image/*", "30d")
    jpeg = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/jpeg")
    pdf = register_aged(catalog, acme, DAY, uploads=uploads, mime="application/pdf")
    catalog.set_org(acme, "7d")
    assert (lives(catalog, jpeg), lives(catalog, pdf)) == (30 * DAY, 7 * DAY)


def test_setting_a_rule_to_the_period_it_has_reschedules_stamps_and_audits_nothing(catalog, acme, uploads):
    """`rule set image/png 7d` twice (and as 168h): expiries equal to the microsecond, no audit, no org stamp."""
    catalog.rules.set(acme, "image/png", "7d")
    items = [register_aged(catalog, acme, DAY * n, uploads=uploads, mime="image/png") for n in (1, 2)]
    before, audits, stamp = expiries(catalog), audit_count(catalog), org_stamp(catalog, acme)
    for same in ("7d", "168h", "P7D"):
        result = catalog.rules.set(acme, "Image/PNG", same)
        assert (result.changed, result.items_rescheduled) == (False, 0)
    assert expiries(catalog) == before and [before[item.id] for item in items] == [item.expires_at for item in items]
    assert audit_count(catalog) == audits and org_stamp(catalog, acme) == stamp


def test_a_new_rule_of_the_period_items_already_live_rewrites_no_row(catalog, acme, uploads):
    """image/* at the org's own 90d: the rule is recorded and audited, but no expiry is rewritten."""
    jpeg = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/jpeg")
    result = catalog.rules.set(acme, "image/*", "90d")
    assert (result.changed, result.items_rescheduled) == (True, 0)
    assert expiries(catalog)[jpeg.id] == jpeg.expires_at


def test_a_shorter_rule_applies_to_stored_items_at_the_next_sweep_and_the_audit_records_it(catalog, acme, uploads):
    """10-day-old png and jpeg under 90d; `rule set image/png 7d --by legal`: the sweep deletes the png only."""
    png = register_aged(catalog, acme, 10 * DAY, uploads=uploads, mime="image/png")
    jpeg = register_aged(catalog, acme, 10 * DAY, uploads=uploads, mime="image/jpeg")
    assert catalog.sweeper.sweep().claimed == 0
    catalog.rules.set(acme, "image/png", "7d", actor="legal")
    catalog.sweeper.sweep()
    assert states(catalog, [png.id, jpeg.id]) == {png.id: "deleted", jpeg.id: "active"}
    [entry] = catalog.audit.read(org=acme, action="rule_set").entries
    assert entry.actor == "legal"
    assert entry.details == {"mime": "image/png", "retention": "1w", "previous": None, "items_period": "1w",
                             "items_rescheduled": 1}
    catalog.rules.remove(acme, "image/png", actor="legal")
    assert catalog.audit.read(org=acme, action="rule_rm").entries[0].details["items_period"] == "90d"


@pytest.mark.parametrize("change", ["set", "rm"])
def test_a_rule_dry_run_counts_what_the_next_sweep_deletes_after_the_change_and_changes_nothing(catalog, acme, uploads, change):
    """A preview of `rule set image/png 7d` (or `rule rm` of a 90d->5d png rule back to image/* at 7d) counts the
    10-day-old pngs, not the jpeg; nothing is written; the sweep after the real change deletes what it counted."""
    if change == "rm":
        catalog.rules.set(acme, "image/*", "7d")
        catalog.rules.set(acme, "image/png", "90d")
    pngs = [register_aged(catalog, acme, 10 * DAY, uploads=uploads, mime="image/png", content=b"p" * 10) for _ in range(2)]
    jpeg = register_aged(catalog, acme, 3 * DAY, uploads=uploads, mime="image/jpeg")
    before, audits = expiries(catalog), audit_count(catalog)
    preview = (catalog.rules.set(acme, "image/png", "7d", dry_run=True) if change == "set"
               else catalog.rules.remove(acme, "image/png", dry_run=True))
    assert expiries(catalog) == before and audit_count(catalog) == audits
    assert (preview.due, preview.newly_due, preview.due_bytes, preview.applies_to, preview.mime) == (2, 2, 20, 2, "image/png")
    assert (preview.retention, preview.new_retention) == ("90d", "1w")
    catalog.rules.set(acme, "image/png", "7d") if change == "set" else catalog.rules.remove(acme, "image/png")
    assert catalog.sweeper.sweep().deleted == preview.due
    assert states(catalog, [jpeg.id, *(png.id for png in pngs)])[jpeg.id] == "active"


@pytest.mark.parametrize("pattern", ["*/*", "*/png", "image", "image/", "/png", "image/png; charset=x", "image/png;", "",
                                     "  ", "image/*/x", "image/pn*", "imäge/png", "image/png\n", "image/" + "x" * 300])
def test_a_malformed_pattern_is_bad_input_and_changes_nothing(catalog, acme, pattern):
    with pytest.raises(BadInput):
        catalog.rules.set(acme, pattern, "7d")
    with pytest.raises(BadInput):
        catalog.rules.remove(acme, pattern)
    assert catalog.show_org(acme).rules == ()


def test_a_period_out_of_bounds_an_unknown_org_and_a_missing_rule_change_nothing(catalog, acme):
    """30m and garbage are bad input (org retention's own bounds); an unknown org and a rule that does not exist
    are not found."""
    for period in ("30m", "0s", "soon", "99999999999d"):
        with pytest.raises(BadInput):
            catalog.rules.set(acme, "image/png", period)
    with pytest.raises(NotFound):
        catalog.rules.set("nobody", "image/png", "7d")
    with pytest.raises(NotFound, match="no retention rule"):
        catalog.rules.remove(acme, "image/png")
    catalog.rules.set(acme, "image/*", "7d")
    with pytest.raises(NotFound):
        catalog.rules.remove(acme, "image/png")  # image/* covers png, but there is no image/png rule to remove
    assert [rule["mime"] for rule in catalog.show_org(acme).to_dict()["rules"]] == ["image/*"]


MIMES = ["image/png", "IMAGE/PNG", "image/png; x=y", "image/png ; x=\"a;b\"", "image/jpeg", "image/pngx", "imagex/png",
         "audio/ogg; codecs=opus", "audio/mpeg", "application/pdf", "application/vnd.ms-excel", "text/plain"]
RULE_SETS = [{}, {"image/*": 1}, {"image/png": 1}, {"image/*": 1, "image/png": 2, "audio/ogg": 3},
             {"application/*": 1, "application/pdf": 2, "text/*": 3, "image/pngx": 4}]


def test_the_sql_rewrite_and_registration_agree_on_the_deciding_rule_of_every_item(catalog, acme, uploads):
    """For each set of rules, `governed_by` (what rewrites select) picks exactly the items `governing_pattern` (what
    registration uses) gives each pattern, and the org's period the rest; the SQL essence equals Python's."""
    items = {register_aged(catalog, acme, DAY, uploads=uploads, mime=mime).id: mime for mime in MIMES}
    with catalog.db.transaction() as session:
        essence = dict(session.execute(select(MediaItem.id, catalog.db.sql.mime_essence(MediaItem.mime_type))).all())
        assert essence == {media_id: mime_essence(mime) for media_id, mime in items.items()}
        for rules in RULE_SETS:
            for pattern in [*rules, None]:
                found = set(session.scalars(select(MediaItem.id).where(governed_by(catalog.db.sql, rules, pattern))))
                assert found == {media_id for media_id, mime in items.items() if governing_pattern(rules, mime) == pattern}, (
                    rules, pattern)


def test_manifests_and_adopt_give_items_the_period_of_their_rule(catalog, acme, tmp_path, media_root):
    """A manifest line with mime image/png and an adopted `.png` blob live 7d; a pdf from each lives the org's 90d."""
    catalog.rules.set(acme, "image/png", "7d")
    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "b.pdf").write_bytes(b"pdf")
    lines = [{"org": acme, "id": "m-png", "file": "a.png", "mime": "image/png"}, {"org": acme, "id": "m-pdf", "file": "b.pdf"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    catalog.register_manifest(tmp_path / "m.jsonl", files_root=tmp_path)
    minute_ago = time.time() - 60
    for key in ("old/x.png", "old/y.pdf"):
        (media_root / key).parent.mkdir(parents=True, exist_ok=True)
        (media_root / key).write_bytes(b"blob")
        os.utime(media_root / key, (minute_ago, minute_ago))
    summary = catalog.adopter().run(org=acme, grace=timedelta(seconds=10), actor="ops")
    assert summary.adopted == 2
    with catalog.db.transaction() as session:
        rows = session.execute(select(MediaItem.id, MediaItem.storage_key, MediaItem.created_at, MediaItem.expires_at)).all()
    lived = {row.id if row.id.startswith("m-") else row.storage_key: row.expires_at - row.created_at for row in rows}
    assert lived == {"m-png": 7 * DAY, "m-pdf": 90 * DAY, "old/x.png": 7 * DAY, "old/y.pdf": 90 * DAY}


def test_adopt_counts_as_due_what_the_rules_make_due(catalog, acme, media_root):
    """A 10-day-old .png under image/png 7d is due; a 10-day-old .pdf under the org's 90d is not."""
    catalog.rules.set(acme, "image/png", "7d")
    stamp = time.time() - 10 * 86400
    for key in ("v/a.png", "v/b.pdf"):
        (media_root / key).parent.mkdir(parents=True, exist_ok=True)
        (media_root / key).write_bytes(b"blob")
        os.utime(media_root / key, (stamp, stamp))
    summary = catalog.adopter().run(org=acme, grace=timedelta(minutes=1), actor="ops", dry_run=True)
    assert (summary.adopted, summary.due) == (2, 1)


def test_verify_judges_expiry_by_the_rules_and_reports_one_that_ignores_them(catalog, acme, uploads):
    """Under image/png 7d verify is clean; a png whose expiry says the org's 90d is a wrong_expiry naming the rule."""
    catalog.rules.set(acme, "image/png", "7d")
    png = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/png")
    register_aged(catalog, acme, DAY, uploads=uploads, mime="text/plain")
    verifier = Verifier(catalog.db, catalog.store)
    assert verifier.run(stuck_after=timedelta(hours=1)).breaches["wrong_expiry"] == 0
    with catalog.db.transaction() as session:
        session.execute(update(MediaItem).where(MediaItem.id == png.id).values(expires_at=png.created_at + 90 * DAY))
    report = verifier.run(stuck_after=timedelta(hours=1))
    assert report.breaches["wrong_expiry"] == 1
    assert report.examples["wrong_expiry"][0]["rule"] == "image/png"


def test_verify_sees_a_rule_changed_since_its_last_read(catalog, acme, uploads):
    """verify caches rules by the org's stamp: a rule set between two runs of one verifier is judged by, not
    reported as a breach."""
    png = register_aged(catalog, acme, DAY, uploads=uploads, mime="image/png")
    verifier = Verifier(catalog.db, catalog.store)
    assert verifier.run(stuck_after=timedelta(hours=1)).clean
    catalog.rules.set(acme, "image/png", "7d")
    assert lives(catalog, png) == 7 * DAY
    assert verifier.run(stuck_after=timedelta(hours=1)).clean


# -- a registration racing a rule change, on PostgreSQL (two connections) ------------------------------------------


def paused(monkeypatch, module, name: str):
    """Make `module.name` stop after it ran, inside its caller's transaction, until released; returns the events
    (reached, release)."""
    reached, release, original = threading.Event(), threading.Event(), getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        reached.set()
        assert release.wait(20), "never released"
        return result

    static = isinstance(vars(module).get(name), staticmethod)
    monkeypatch.setattr(module, name, staticmethod(wrapper) if static else wrapper)
    return reached, release


@pytest.mark.postgres
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
@pytest.mark.parametrize("first", ["rule change", "registration"])
def test_a_registration_racing_a_rule_change_ends_with_the_expiry_of_the_rule(catalog, acme, uploads, monkeypatch, first):
    """The rule change (image/png 7d) holds the org row from its read of the rules to its commit; a registration
    reads the org under a share lock and the rules after it, in the transaction of its insert. Whichever goes
    first, the png ends up living 7d: paused inside the rule change (rewrite done, not committed), the registration
    waits and then reads the new rule; paused inside the registration (rules read, row not inserted), the rule
    change waits and then rewrites the new row."""
    if first == "rule change":
        reached, release = paused(monkeypatch, rules_module, "took_effect_at")
    else:
        reached, release = paused(monkeypatch, registration_module.Registration, "_rows")
    outcome: dict = {}
    runs = {
        "rule change": lambda: outcome.setdefault("rule", catalog.rules.set(acme, "image/png", "7d")),
        "registration": lambda: outcome.setdefault("item", register_aged(catalog, acme, DAY, uploads=uploads, mime="image/png")),
    }
    second = "registration" if first == "rule change" else "rule change"
    one = threading.Thread(target=runs[first])
    one.start()
    assert reached.wait(20)
    two = threading.Thread(target=runs[second])
    two.start()
    time.sleep(0.5)
    waited = two.is_alive()
    release.set()
    one.join(20)
    two.join(20)
    item = outcome["item"]
    assert lives(catalog, item) == 7 * DAY
    assert waited, f"the {second} did not wait for the {first}'s lock on the org"
    assert outcome["rule"].items_rescheduled == (1 if first == "registration" else 0)


# -- the command line --------------------------------------------------------------------------------------------


def test_org_rule_commands_on_the_command_line(cli):
    """set, show, dry runs and rm with --json; a bad pattern exits 2 with one line, a missing rule or org exits 3."""
    assert cli("org", "set", "acme", "--retention", "90d").code == 0
    made = cli("org", "rule", "set", "acme", "--mime", "Image/*", "--retention", "30d", "--json")
    assert made.code == 0 and made.json["mime"] == "image/*" and made.json["changed"] is True
    shown = cli("org", "show", "acme", "--json").json["rules"]
    assert shown == [{"mime": "image/*", "retention": "30d", "retention_seconds": 30 * 86400}]
    assert "image/*" in cli("org", "show", "acme").stdout
    preview = cli("org", "rule", "set", "acme", "--mime", "image/png", "--retention", "7d", "--dry-run")
    assert preview.code == 0 and "nothing was changed" in preview.stdout and "for image/png: 30d -> 1w" in preview.stdout
    assert cli("org", "rule", "rm", "acme", "--mime", "image/*", "--dry-run", "--json").json["new_retention"] == "90d"
    bad = cli("org", "rule", "set", "acme", "--mime", "*/*", "--retention", "7d")
    assert bad.code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "MIME pattern" in bad.stderr
    assert cli("org", "rule", "set", "acme", "--mime", "image/png", "--retention", "10m").code == 2
    assert cli("org", "rule", "rm", "acme", "--mime", "image/png").code == 3
    assert cli("org", "rule", "set", "nobody", "--mime", "image/png", "--retention", "7d").code == 3
    assert cli("org", "rule", "rm", "acme", "--mime", "image/*", "--json").json["action"] == "rule_rm"
    assert cli("org", "show", "acme", "--json").json["rules"] == []


def test_rules_table_rows_are_what_the_commands_wrote(catalog, acme):
    """The row keeps the lowercased pattern, the period, who set it and when it last changed."""
    catalog.rules.set(acme, "Audio/OGG", "2w", actor="ops")
    with catalog.db.transaction() as session:
        [rule] = session.scalars(select(RetentionRule)).all()
        assert (rule.org_id, rule.mime_pattern, rule.retention_seconds, rule.actor) == (acme, "audio/ogg", 14 * 86400, "ops")


def test_mime_parameters_are_accepted_at_registration_and_kept_as_given(catalog, acme, uploads):
    """`audio/ogg; codecs=opus` is a valid MIME type (kept verbatim); a dangling `;` is not."""
    item = register_aged(catalog, acme, DAY, uploads=uploads, mime="audio/ogg; codecs=opus")
    assert catalog.lookup(item.id).mime == "audio/ogg; codecs=opus"
    with pytest.raises(BadInput):
        register_aged(catalog, acme, DAY, uploads=uploads, mime="audio/ogg;")


