"""The planted bugs the model-based test must catch, written against the code as it is.

An outside audit found that the model test (tests/integration/test_retention_model.py) passed with
deliberate safety bugs planted. Each entry here is one such bug, or one fix of issue #19 undone, as a
textual edit small enough to read at a glance: an exact snippet of a module and what replaces it.
`python -m tests.mutants.run` plants them one at a time in a scratch copy of the tree and runs the model
test there; tests/unit/test_mutants.py fails as soon as a refactor moves a snippet, so a mutation can
never silently stop applying.

A snippet must occur exactly once in its file. A bug that needs several edits (the revert of a fix that
touched three places) lists the others in `also`; each of them must occur exactly once as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUDIT = "safety bug from the audit"
ISSUE_19 = "reverted fix of issue #19"
ISSUE_21 = "reverted part of issue #21 (variants)"
ISSUE_23_RULES = "reverted part of issue #23 (retention rules)"
ISSUE_22 = "reverted part of issue #22 (one transaction a batch, expired is final)"
KINDS = (AUDIT, ISSUE_19, ISSUE_21, ISSUE_22, ISSUE_23_RULES)


class StaleMutation(Exception):
    """A snippet no longer occurs exactly once: the code moved and the mutation must be rewritten."""


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository
    old: str  # must occur exactly once in the file
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    file: str
    old: str
    new: str
    kind: str
    # Further edits the same bug needs, applied after the first, in order.
    also: tuple[Edit, ...] = ()

    @property
    def edits(self) -> tuple[Edit, ...]:
        return (Edit(self.file, self.old, self.new), *self.also)

    @property
    def files(self) -> list[str]:
        return sorted({edit.file for edit in self.edits})

    def apply(self, root: Path) -> list[str]:
        """Plant the bug in the tree at `root`; returns the files changed. Every snippet is checked before
        anything is written, so a stale mutation leaves the tree as it was."""
        texts = {file: (root / file).read_text() for file in self.files}
        for edit in self.edits:
            found = texts[edit.file].count(edit.old)
            if found != 1:
                raise StaleMutation(f"{self.name}: the snippet occurs {found} times in {edit.file}, not once: "
                                    f"{edit.old.strip().splitlines()[0][:100]!r}")
            texts[edit.file] = texts[edit.file].replace(edit.old, edit.new)
        for file, text in texts.items():
            (root / file).write_text(text)
        return self.files


_CLAIMS = "worker/items/claims.py"
_PREDICATES = "worker/items/predicates.py"
_SWEEP = "worker/sweep.py"
_RECONCILE = "worker/reconcile.py"
_VERIFY = "worker/verify.py"

# The expired claim's predicate as written in Claims.__init__: `{{now}}` becomes the database's now.
_EXPIRED_WHERE = """f"{predicate(CLAIMABLE, 'c')} AND c.expires_at <= {{now}}","""

MUTATIONS: tuple[Mutation, ...] = (
    # -- safety bugs from the audit -----------------------------------------------------------------
    Mutation(
        name="claim-cutoff-hour-early",
        description="The sweep's expired claim takes items whose expiry is up to an hour in the future.",
        file=_CLAIMS,
        old=_EXPIRED_WHERE,
        new="""f"{predicate(CLAIMABLE, 'c')} AND c.expires_at <= {dialect.compile(db_now(3600))}",""",
        kind=AUDIT,
    ),
    Mutation(
        name="claim-cutoff-ten-minutes-early",
        description="The sweep's expired claim takes items whose expiry is up to ten minutes in the future.",
        file=_CLAIMS,
        old=_EXPIRED_WHERE,
        new="""f"{predicate(CLAIMABLE, 'c')} AND c.expires_at <= {dialect.compile(db_now(600))}",""",
        kind=AUDIT,
    ),
    Mutation(
        name="claim-cutoff-worker-clock",
        description="The sweep's expired claim compares expiries with the worker's clock (a bound parameter "
                    "computed in Python) instead of the database's.",
        file=_CLAIMS,
        old='''        """Claimable items expired by the database clock, by expiry, skipping locked rows."""
        return session.execute(self.expired_statement, {"token": token, "limit": limit}).all()
''',
        new='''        """Claimable items expired by the database clock, by expiry, skipping locked rows."""
        from datetime import datetime, timezone
        from worker.db import UTCDateTime
        statement = self._statement(f"{predicate(CLAIMABLE, 'c')} AND c.expires_at <= :worker_now", "c.expires_at",
                                    REASON_BY_TTL).bindparams(bindparam("worker_now", type_=UTCDateTime()))
        return session.execute(statement, {"token": token, "limit": limit, "worker_now": datetime.now(timezone.utc)}).all()
''',
        # The one-transaction sweep's pick (PostgreSQL) makes the same mistake.
        also=(Edit(
            _CLAIMS,
            '''        return session.execute(self.expired_lock_statement, {"limit": limit}).all()
''',
            '''        from datetime import datetime, timezone
        from worker.db import UTCDateTime
        statement = self._lock_statement(f"{predicate(CLAIMABLE, 'c')} AND c.expires_at <= :worker_now", "c.expires_at"
                                         ).bindparams(bindparam("worker_now", type_=UTCDateTime()))
        return session.execute(statement, {"limit": limit, "worker_now": datetime.now(timezone.utc)}).all()
''',
        ),),
        kind=AUDIT,
    ),
    Mutation(
        name="blob-deleted-before-claim-commits",
        description="A sweep deletes the blobs of the rows it claimed inside the claim's transaction, before "
                    "the claim commits (a crash or rollback leaves active items without blobs).",
        file=_SWEEP,
        old="""                rows += self._claims.expired(session, token, limit - len(rows))
            return self._claimed(session, rows, token)
""",
        new="""                rows += self._claims.expired(session, token, limit - len(rows))
            if rows:
                self.store.delete_many([row.storage_key for row in rows])
            return self._claimed(session, rows, token)
""",
        kind=AUDIT,
    ),
    Mutation(
        name="failed-deletes-tombstoned",
        description="Finalize treats every delete result as a success, so blobs that failed to delete are "
                    "tombstoned and never retried.",
        file=_SWEEP,
        old="""        done = [(item, result) for item, result in zip(claimed, results, strict=True) if result.ok]
        failed = [(item, result) for item, result in zip(claimed, results, strict=True) if not result.ok]
""",
        new="""        done = list(zip(claimed, results, strict=True))
        failed = []
""",
        kind=AUDIT,
    ),
    Mutation(
        name="stale-takeover-ignores-lease",
        description="The stale-claim takeover drops its lease check, so a sweep takes over claims whose "
                    "lease is still running.",
        file=_CLAIMS,
        old="""f"{predicate(DELETING, 'c')} AND c.lease_until <= {{now}}",""",
        new="""f"{predicate(DELETING, 'c')}",""",
        kind=AUDIT,
    ),
    Mutation(
        name="reconcile-orphans-ignore-grace",
        description="Reconcile deletes orphan blobs however young, ignoring the grace that protects "
                    "registrations in flight.",
        file=_RECONCILE,
        old="""            if blob.modified is None or blob.modified > cutoff:
                report.young_blobs_skipped += 1""",
        new="""            if blob.modified is None:
                report.young_blobs_skipped += 1""",
        kind=AUDIT,
    ),
    Mutation(
        name="reconcile-without-recheck",
        description="Reconcile deletes what its listing found without reserving the keys and re-reading "
                    "their rows, so a row registered or changed since the listing does not save its blob.",
        file=_RECONCILE,
        old="""        token = secrets.token_hex(16)
        for batch in chunked(doomed, BATCH):
            with self.db.transaction() as session:
                held = reservations.reserve(""",
        new="""        for batch in chunked(doomed, BATCH):
            self._discard(report, [entry for entry in batch if isinstance(entry, PartialUpload)])
            self._delete(report, [entry for entry in batch if isinstance(entry, _Doomed)])
        return
        token = secrets.token_hex(16)
        for batch in chunked(doomed, BATCH):
            with self.db.transaction() as session:
                held = reservations.reserve(""",
        kind=AUDIT,
    ),
    Mutation(
        name="reconcile-deletes-returned-blob-early",
        description="Reconcile treats the blob of a missing_blob tombstone as a leak at once, deleting a "
                    "returned blob before its item expired.",
        file=_RECONCILE,
        old="""        return row.deletion_reason in _PURGED or row.expires_at <= now""",
        new="""        return row.deletion_reason in (*_PURGED, Reason.MISSING_BLOB.value) or row.expires_at <= now""",
        kind=AUDIT,
    ),
    Mutation(
        name="claim-ignores-org-hold",
        description="The CLAIMABLE predicate forgets org holds, so sweeps and purges claim items of held orgs "
                    "(the item-level hold and reconcile's own check remain).",
        file=_PREDICATES,
        old="""CLAIMABLE = "{c}state = 'active' AND {c}held_at IS NULL AND NOT {c}org_held\"""",
        new="""CLAIMABLE = "{c}state = 'active' AND {c}held_at IS NULL\"""",
        kind=AUDIT,
    ),
    Mutation(
        name="reconcile-plan-ignores-org-hold",
        description="Reconcile's plan for missing blobs forgets org holds (the tombstoning statement's own "
                    "CLAIMABLE re-check remains).",
        file=_RECONCILE,
        old="""        if row.held_at is not None or row.org_held:
            report.missing_held += 1""",
        new="""        if row.held_at is not None:
            report.missing_held += 1""",
        kind=AUDIT,
    ),
    Mutation(
        name="verify-blind-to-held-deletions",
        description="verify no longer reports items deleted while held (held_deleted).",
        file=_VERIFY,
        old="""            if row.held_at is not None or row.org_held:
                report.breach("held_deleted", self._example(row, held_at=_iso(row.held_at), org_held=bool(row.org_held),
                                                            reason=row.deletion_reason, claimed_at=_iso(claimed)))
            elif (row.org_held_at is not None and claimed is not None and claimed >= row.org_held_at
                  and row.expires_at > row.org_held_at):
                # (An item that expired before the org's hold took effect was gone already: the hold never covered it.)
                report.breach("held_deleted", self._example(row, org_held_at=_iso(row.org_held_at), reason=row.deletion_reason,
                                                            claimed_at=_iso(claimed)))
""",
        new="",
        kind=AUDIT,
    ),
    Mutation(
        name="verify-blind-to-early-deletions",
        description="verify no longer reports items claimed before their expiry (early_deletion).",
        file=_VERIFY,
        old="""            if row.deletion_reason in (Reason.TTL.value, Reason.RETENTION.value) and claimed is not None:
                due = self._earliest_legitimate_claim(row)
                if claimed < due:
                    report.breach("early_deletion", self._example(
                        row, reason=row.deletion_reason, claimed_at=_iso(claimed), expired_at=_iso(due),
                        early_by_seconds=round((due - claimed).total_seconds(), 3)))
""",
        new="",
        kind=AUDIT,
    ),
    # -- the fixes of issue #19, each undone alone ----------------------------------------------------
    Mutation(
        name="release-ignores-reservations",
        description="A failed registration's cleanup deletes every blob it wrote, even under keys another "
                    "registration has taken over since.",
        file="worker/reservations.py",
        old="""        ours = [key for key in dict.fromkeys(written) if key in held]""",
        new="""        ours = list(dict.fromkeys(written))""",
        kind=ISSUE_19,
    ),
    Mutation(
        name="registrations-never-reserve",
        description="Registrations write blobs and insert rows without reserving their keys, so nothing "
                    "arbitrates them against reconcile or a racing registration.",
        file="worker/catalog/registration.py",
        old="""            reservations.reserve(session, self.db.sql, token, purpose,
                                 {key: item.id for item in new_items for key in item.keys}, take_over="any")
""",
        new="",
        also=(Edit(
            "worker/catalog/registration.py",
            """            held = reservations.consume(session, self.db.sql, token, [key for item in new_items for key in item.keys])
            lost = sorted({key for item in new_items for key in item.keys} - held)""",
            """            lost = []""",
        ),),
        kind=ISSUE_19,
    ),
    Mutation(
        name="reconcile-deletes-without-reserving",
        description="Reconcile deletes without taking the keys: it re-reads the rows but trusts its listing "
                    "about reservations, so a registration that reserved a key since is not waited for.",
        file=_RECONCILE,
        old="""                held = reservations.reserve(session, self.db.sql, token, "reconcile", dict.fromkeys(entry.key for entry in batch),
                                            take_over=cutoff)
""",
        new="""                held = {entry.key for entry in batch}
""",
        kind=ISSUE_19,
    ),
    Mutation(
        name="temp-files-judged-by-prefix",
        description="Any file named '.incoming-*' counts as a temporary upload again (listing and discard), "
                    "and new IDs and keys may take such names.",
        file="worker/store/fs.py",
        old="""                    temporary = TEMP_NAME.fullmatch(entry.name) is not None""",
        new="""                    temporary = entry.name.startswith(TEMP_PREFIX)""",
        also=(
            Edit("worker/store/fs.py",
                 """            if not TEMP_NAME.fullmatch(upload.key.rsplit("/", 1)[-1]):""",
                 """            if not upload.key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):"""),
            Edit("worker/store/keys.py",
                 """    if value.startswith(TEMP_PREFIX):
        raise BadInput(f"invalid {what} {value!r}: IDs starting with {TEMP_PREFIX!r} are reserved for the store's own temporary files.")
""",
                 ""),
            Edit("worker/store/keys.py",
                 """    if any(step.startswith(TEMP_PREFIX) for step in steps):
        raise BadInput(f"invalid storage key {key!r}: steps starting with {TEMP_PREFIX!r} are reserved for the store's own temporary files.")
""",
                 ""),
        ),
        kind=ISSUE_19,
    ),
    Mutation(
        name="binding-never-checked",
        description="StoreBinding.require and ensure answer 'bound' at once without reading the store's marker.",
        file="worker/binding.py",
        old="""    def _check(self, *, bind: bool, adopting: bool = False, quiet: bool = False) -> BindingState:
        with self._lock:""",
        new="""    def _check(self, *, bind: bool, adopting: bool = False, quiet: bool = False) -> BindingState:
        return BindingState(catalog=self.identity(), store_url=self.store.url, marker=self.identity())
        with self._lock:""",
        kind=ISSUE_19,
    ),
    Mutation(
        name="mass-drift-never-refused",
        description="Reconcile never refuses drift of nearly everything (an empty catalog facing blobs, "
                    "nearly all blobs orphans or nearly all items missing).",
        file=_RECONCILE,
        old="""    its blob, however few they are.\"\"\"
    if catalog_empty and report.blobs_listed:""",
        new="""    its blob, however few they are.\"\"\"
    return None
    if catalog_empty and report.blobs_listed:""",
        kind=ISSUE_19,
    ),
    Mutation(
        name="missing-media-root-recreated",
        description="A filesystem store creates its media root when it is missing (an unmounted volume gets "
                    "its media written beneath the mount point).",
        file="worker/store/fs.py",
        old="""        if create:
            self.root.mkdir(parents=True, exist_ok=True)""",
        new="""        self.root.mkdir(parents=True, exist_ok=True)""",
        kind=ISSUE_19,
    ),
    Mutation(
        name="lookups-ignore-expiry",
        description="A lookup (every path: the CLI's, the catalog API's, the HTTP lookup's one statement) answers an "
                    "expired, unheld item that no sweep has claimed yet as active.",
        file="worker/catalog/lookup.py",
        old="""    if item.expires_at <= now and not item.kept_by_hold:
        # No sweep has claimed it yet (a backlog, workers down): it is gone from its expiry all the same.
        return _expired(item)
""",
        new="",
        kind=ISSUE_19,
    ),
    Mutation(
        name="effect-stamped-at-transaction-start",
        description="Holds and retention changes are stamped with their transaction's start (now()) rather "
                    "than the moment they locked their rows, so claims they waited for look later than them.",
        file="worker/catalog/_shared.py",
        old="""    return session.scalar(select(db_clock()))""",
        new="""    from worker.db import db_now
    return session.scalar(select(db_now()))""",
        kind=ISSUE_19,
    ),
    Mutation(
        name="compaction-drops-unexpired-missing-blob-tombstones",
        description="Tombstone compaction removes missing_blob tombstones of items that have not expired, "
                    "so a blob that comes back is an orphan reconcile deletes early.",
        file=_PREDICATES,
        old="""    return and_(tombstone(), items.c.deleted_at < cutoff,
                or_(items.c.deletion_reason != "missing_blob", items.c.expires_at <= now))""",
        new="""    return and_(tombstone(), items.c.deleted_at < cutoff)""",
        kind=ISSUE_19,
    ),
    Mutation(
        name="sweep-leaves-variants-behind",
        description="A sweep deletes only the items' own blobs: their variants stay behind the tombstones.",
        file=_SWEEP,
        old="""    return [target for item in claimed for target in ((item.storage_key, item.blob_version), *item.variants)]""",
        new="""    return [(item.storage_key, item.blob_version) for item in claimed]""",
        also=(Edit(
            _SWEEP,
            """        mine = results[position:position + 1 + len(item.variants)]""",
            """        mine = results[position:position + 1]""",
        ),),
        kind=ISSUE_21,
    ),
    Mutation(
        name="reconcile-takes-variants-for-orphans",
        description="Reconcile looks keys up among items only, so a live item's variants are orphans it deletes.",
        file="worker/items/reads.py",
        old="""    return session.execute(union_all(own, derived)).all()""",
        new="""    return session.execute(own).all()""",
        kind=ISSUE_21,
    ),
    Mutation(
        name="registration-ignores-retention-rules",
        description="A registration computes the expiry from the org's period alone, whatever rule covers its MIME type.",
        file="worker/catalog/registration.py",
        old="""        rules = rules_of(session, found) if lock else {}""",
        new="""        rules = {}""",
        kind=ISSUE_23_RULES,
    ),
    Mutation(
        name="rule-change-reschedules-nothing",
        description="`org rule set|rm` records the rule but leaves the stored items' expiry as it was.",
        file="worker/catalog/rules.py",
        old="""                rewritten = items_sql.rewrite_expiry(session, org_id, target, governed)""",
        new="""                rewritten = 0""",
        kind=ISSUE_23_RULES,
    ),
    Mutation(
        name="org-set-reschedules-items-a-rule-covers",
        description="`org set --retention` rewrites every TTL-less item of the org, those a rule decides too.",
        file="worker/catalog/orgs.py",
        old="""                governed = items_sql.governed_by(self.db.sql, rules, None) if rules else None""",
        new="""                governed = None""",
        kind=ISSUE_23_RULES,
    ),
    Mutation(
        name="wildcard-rule-overrides-exact-rule",
        description="A type/* rule's rewrite also takes the items an exact type/subtype rule decides.",
        file="worker/items/reads.py",
        old="""    return and_(of_type(prefix), essence.not_in(same_type)) if same_type else of_type(prefix)""",
        new="""    return of_type(prefix)""",
        kind=ISSUE_23_RULES,
    ),
    Mutation(
        name="policy-changes-revive-expired-items",
        description="A hold, a longer retention or a rule reaches items already gone by their expiry, whose blobs an "
                    "expiry sweep (one transaction a batch) may have deleted already: they come back without a byte.",
        file=_PREDICATES,
        old="""    return or_(items.c.expires_at > clock, items.c.held_at.is_not(None), items.c.org_held)""",
        new="""    return or_(items.c.expires_at > clock, items.c.expires_at <= clock)""",
        kind=ISSUE_22,
    ),
    Mutation(
        name="item-hold-revives-an-expired-item",
        description="`hold ID` holds an item already past its expiry (and maybe without its blob) instead of answering gone.",
        file="worker/catalog/holds.py",
        old="""                if expired:
                    raise Gone(""",
        new="""                if False:
                    raise Gone(""",
        kind=ISSUE_22,
    ),
)

BY_NAME = {mutation.name: mutation for mutation in MUTATIONS}
