"""Every statement on `media_items`, and the row predicates they share, in one package.

The use cases (the sweep, status, the catalog, reconcile, verify, compaction, the volume monitor) call
these functions with a session (their transaction) and plain values, and keep their own logic: what to
do with the rows. No other module builds a statement on `media_items` (`tests/unit/test_import_floors.py`
holds them to it). What PostgreSQL and SQLite spell differently comes from `worker/dialect.py`; nothing
here asks which database it is.

A package rather than one module: it is some 650 lines of four kinds, each read on its own.
`predicates` holds the row predicates the partial indexes, the claims and the counts share (imported
by `worker/models.py` while it defines the indexes, so it imports nothing else of the package);
`claims` the claim, written once; `reads` and `writes` everything else, in sections by use case.
Callers import the package (`from worker import items as items_sql`, then `items_sql.due_count(session)`);
what it re-exports below is the whole of it, by section.
"""

# ruff: noqa: F401 - re-exports

from worker.items.predicates import (
    CLAIMABLE,
    DELETING,
    HELD,
    TOMBSTONE,
    claimable,
    compactable,
    deleting,
    due,
    held,
    held_expired,
    predicate,
    tombstone,
)
from worker.items.claims import REASON_BY_TTL, Claims, claim_sql
from worker.items.reads import (
    # the sweep
    due_preview, held_expired_count, next_due,
    # fleet status
    deleting_count, due_count, due_totals, locked_deletions, missing_blob_counts, oldest_overdue, recent_deletions, stuck_claims,
    # registration, manifest import, adopt
    existing, first_taken, known_keys,
    # variants
    locked_item, variants_of,
    # one item, a list of items
    by_id_and_now, locked_by_ids, purge_candidates,
    # one org
    active_bytes, live_counts_by_state, governed_by, retention_preview,
    # reconcile and verify
    active_after, has_items, key_owners, live_keys, rows_by_key_order, rows_by_keys,
    # tombstone compaction and the volume
    live_bytes, old_tombstone_count,
)
from worker.items.holds import (
    # holds by case: what placements and releases write on the rows, what `hold list` and the preview count
    active_members, apply_future_holds, held_counts_by_case, held_due_by_case, held_without_case, hold_by_query,
    mark_members, mime_matches, query_matches, unhold_members,
)
from worker.items.writes import (
    # registration
    insert_rows, insert_variants,
    # finalize
    fail_claimed, fail_locked, lock_claimed, tombstone_claimed, tombstone_locked,
    # holds and retention
    mirror_org_hold, rewrite_expiry,
    # reconcile
    clear_missing_since, mark_missing_since, tombstone_missing,
    # tombstone compaction
    compact_tombstones,
)
from worker.items.keyed import (
    # the HTTP lookup's one statement (key, item, variants, clock)
    ItemRow, KeyedRow, keyed_lookup_sql, keyed_row,
)
