"""Every statement on `media_items`, and the predicates they share, in one package.

The use cases (the sweep, status, the catalog, reconcile, verify, compaction, the volume monitor) call
these functions with a session and plain values and keep their own logic: what to do with the rows.
`tests/unit/test_import_floors.py` holds every other module to it: none builds a statement on
`media_items`. What differs between PostgreSQL and SQLite is in `worker/dialect.py`, nowhere here.

A package rather than one module because it is several hundred lines of four kinds, each read on its
own: `predicates` (the row predicates the partial indexes, the claims and the counts share; imported
by `worker/models.py` while it defines the indexes, so it imports nothing of the package), `claims`
(the claim, written once), `reads` and `writes`. Callers import the package: `from worker import
items`, then `items.tombstone_claimed(...)`.
"""

from worker.items.predicates import (  # noqa: F401 - re-exported
    CLAIMABLE,
    DELETING,
    HELD,
    TOMBSTONE,
    claimable,
    deleted_before,
    deleting,
    due,
    held,
    held_expired,
    predicate,
    tombstone,
)
from worker.items.claims import REASON_BY_TTL, Claims, claim_sql  # noqa: F401 - re-exported
from worker.items.reads import (  # noqa: F401 - re-exported
    deleting_count,
    due_count,
    due_preview,
    due_totals,
    existing,
    first_taken,
    held_expired_count,
    known_keys,
    locked_by_ids,
    missing_blob_counts,
    next_due,
    oldest_overdue,
    recent_deletions,
    stuck_claims,
    by_id,
    counts_by_state,
    active_bytes,
    purge_candidates,
    retention_preview,
    key_owners,
    active_after,
    rows_by_key_order,
    rows_by_keys,
    old_tombstone_count,
    live_bytes,
)
from worker.items.writes import (  # noqa: F401 - re-exported
    fail_claimed,
    insert_rows,
    mirror_org_hold,
    rewrite_expiry,
    set_hold,
    tombstone_claimed,
    mark_missing_since,
    clear_missing_since,
    tombstone_missing,
    compact_tombstones,
)
