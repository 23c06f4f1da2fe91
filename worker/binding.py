"""Store binding: a catalog acts only on the store bound to it.

Every catalog has an identity (`catalog_identity`, made by the migration that created it; a catalog
restored from a dump keeps it). A store bound to a catalog carries a marker at its top, `MARKER_NAME`
(`.media-retention.json` in the media root or under the bucket's prefix), naming that identity; no key
may take that name and listings never show it.

Before they act, the commands that delete blobs, and those that write them, look at the marker:
- `reconcile`, `purge` and `verify` need it to name this catalog (`require`): a missing marker or one
  naming another catalog refuses in one sentence (exit 2), with nothing changed;
- sweeps, registrations, `adopt`, `run` and `db upgrade` bind an unmarked store when that is plainly
  right (`ensure`), and refuse as above otherwise. Plainly right is: catalog and store both empty (a new
  deployment); or the catalog has live items and the store holds their blobs (a deployment upgraded to a
  version with markers); or, for `adopt`, a catalog with no live items taking over a store that has blobs.
  An empty catalog facing a store full of blobs is the wrong database (an unset DATABASE_URL makes a new
  SQLite catalog); a catalog whose live items have no blob in the store is an unmounted volume, the wrong
  prefix or the wrong bucket. Neither is ever bound, and nothing acts on it. Nor is any unmarked store
  bound to a catalog that has been bound before: its store lost its marker, or this is not its store (an
  empty mount point whose volume is not mounted looks exactly like a new, empty store). Media moved to
  a new volume or bucket take the marker with them (`cp -a`, `aws s3 sync` copy it).

A verified marker is trusted for RECHECK_SECONDS on a store where reading it is a round trip (S3); on a
filesystem it is read at every check, so a volume unmounted under a running worker (its mount point then
an empty directory) stops registrations and sweeps at once instead of writing beneath the mount point.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice

import structlog
from sqlalchemy import select, update

from config.errors import BadInput
from worker import items as items_sql
from worker.db import Database, db_now
from worker.models import CatalogIdentity
from worker.store import MARKER_NAME, BlobInfo, BlobStore

log = structlog.get_logger("worker.binding")

# How long a verified marker on a remote store is trusted before it is read again: a GET a minute per
# process, while a store cannot change identity under a running process.
RECHECK_SECONDS = 60.0
# Live items whose blobs are looked for in an unmarked store before it is bound to a catalog that has some:
# one found is enough (the store is this catalog's), none of twenty says it is not.
SAMPLE = 20


class Unbound(BadInput):
    """The store is not bound to this catalog (no marker, or another catalog's): nothing was changed."""


@dataclass(frozen=True)
class BindingState:
    catalog: str  # this catalog's identity
    store_url: str
    marker: str | None  # the identity the store's marker names; None without a marker

    @property
    def bound(self) -> bool:
        return self.marker == self.catalog


class StoreBinding:
    def __init__(self, db: Database, store: BlobStore):
        self.db = db
        self.store = store
        self._identity: str | None = None
        self._confirmed: tuple[float, BindingState] | None = None
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------------------

    def identity(self) -> str:
        if self._identity is None:
            with self.db.transaction() as session:
                found = session.scalar(select(CatalogIdentity.id).limit(1))
            if found is None:
                raise Unbound("this catalog has no identity; run `media-retention db upgrade` first.")
            self._identity = found
        return self._identity

    def _marker(self) -> str | None:
        """The identity the store's marker names, None without one; a marker that names nothing readable
        is another catalog's as far as this one can tell."""
        content = self.store.read_marker()
        if content is None:
            return None
        try:
            named = json.loads(content.decode("utf-8")).get("catalog")
        except (UnicodeDecodeError, ValueError, AttributeError):
            named = None
        return named if isinstance(named, str) and named else "(unreadable marker)"

    def state(self) -> BindingState:
        return BindingState(catalog=self.identity(), store_url=self.store.url, marker=self._marker())

    # -- checking ----------------------------------------------------------------------------------

    def require(self) -> BindingState:
        """Refuse (Unbound) unless the store's marker names this catalog."""
        return self._check(bind=False)

    def ensure(self, *, adopting: bool = False, quiet: bool = False) -> BindingState:
        """Refuse (Unbound) unless the store is bound to this catalog, binding an unmarked store when that is
        plainly right (see the module's docstring); `adopting`: taking over a store that has no catalog;
        `quiet`: a new binding is logged at debug level (the embedded defaults' first command)."""
        return self._check(bind=True, adopting=adopting, quiet=quiet)

    def _check(self, *, bind: bool, adopting: bool = False, quiet: bool = False) -> BindingState:
        with self._lock:
            if self._confirmed is not None and not self.store.cheap_marker \
                    and time.monotonic() - self._confirmed[0] < RECHECK_SECONDS:
                return self._confirmed[1]
            state = self.state()
            if state.marker is None and bind:
                state = self._bind(state, adopting=adopting, quiet=quiet)
            if state.marker is None:
                earlier = self._bound_before()
                if earlier is not None:
                    raise Unbound(f"the store {state.store_url} carries no binding marker: {earlier}; nothing was changed.")
                raise Unbound(f"the store {state.store_url} carries no binding marker, so it is not known to be this "
                              f"catalog's; run `media-retention db upgrade` (or `adopt`) with the same settings to bind "
                              f"it; nothing was changed.")
            if not state.bound:
                raise Unbound(f"the store {state.store_url} belongs to another catalog ({state.marker}, this one is "
                              f"{state.catalog}): check MEDIA_RETENTION_DATABASE_URL and MEDIA_RETENTION_STORAGE_URL; "
                              f"nothing was changed.")
            self._confirmed = (time.monotonic(), state)
            return state

    # -- binding -----------------------------------------------------------------------------------

    def _bound_before(self) -> str | None:
        """Why no unmarked store may be bound to this catalog any more, when it has been bound before."""
        with self.db.transaction() as session:
            bound = session.execute(select(CatalogIdentity.store_url, CatalogIdentity.bound_at)).first()
        if bound is None or bound.bound_at is None:
            return None
        return (f"this catalog was bound to {bound.store_url} on {bound.bound_at.isoformat()} and a store it was bound "
                f"to keeps its marker: is its volume mounted, is the prefix right? (Media moved to a new store take their "
                f"marker with them: copy {MARKER_NAME} from the old one.)")

    def refusal(self, *, adopting: bool = False) -> str | None:
        """Why an unmarked store may not be bound to this catalog, or None when it may."""
        earlier = self._bound_before()
        if earlier is not None:
            return earlier
        with self.db.transaction() as session:
            live = items_sql.live_keys(session, SAMPLE)
            has_rows = items_sql.has_items(session)
        store_has_blobs = next(islice((entry for entry in self.store.iter_keys() if isinstance(entry, BlobInfo)), 1), None) is not None
        if not live:
            if not store_has_blobs or adopting:
                return None
            what = "no items" if not has_rows else "no live items"
            return (f"this catalog has {what} but the store {self.store.url} holds blobs: that looks like the wrong "
                    f"database (is MEDIA_RETENTION_DATABASE_URL set?); `adopt` takes over a store that has no catalog")
        if not store_has_blobs:
            return (f"this catalog has live items but the store {self.store.url} is empty: is its volume mounted, "
                    f"is the prefix right?")
        if any(isinstance(found, BlobInfo) for found in self.store.stat_many(live)):
            return None
        return (f"none of this catalog's live items has its blob in the store {self.store.url}: that looks like the "
                f"wrong store or prefix")

    def _bind(self, state: BindingState, *, adopting: bool, quiet: bool) -> BindingState:
        refused = self.refusal(adopting=adopting)
        if refused is not None:
            raise Unbound(f"the store {state.store_url} carries no binding marker and is not bound to this catalog: "
                          f"{refused}; nothing was changed.")
        content = json.dumps({"catalog": state.catalog, "bound_at": datetime.now(timezone.utc).isoformat(),
                              "note": "This store belongs to the media-retention catalog named here. Keep this file; "
                                      "commands that delete media refuse to run on a store without it."},
                             indent=1).encode()
        if self.store.write_marker(content):
            with self.db.transaction() as session:
                session.execute(update(CatalogIdentity).where(CatalogIdentity.id == state.catalog)
                                .values(store_url=self.store.url, bound_at=db_now()))
            (log.debug if quiet else log.info)("binding.bound", store=self.store.url, catalog=state.catalog)
        # Written by us or, a moment earlier, by another process: what is there now decides.
        return self.state()
