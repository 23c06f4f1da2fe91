"""`sweep --dry-run` reports what the sweep would delete, counted by the database over every due item, however
many: the listing is capped, the counts are not."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from tests.factories import seed_items, seed_org

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DUE = 1500  # more than the listing's 1,000, so a count taken from the listed rows would be wrong


def test_a_dry_run_counts_the_bytes_of_every_item_its_limit_covers_beyond_the_listed_thousand(shell, pg_database):
    """Items 0..1499 due in that order, item n of n+1 bytes: --limit 1200 reports 1200 items of 1+...+1200 bytes,
    no limit all 1500; the listing stops at 1,000 either way."""
    seed_org(pg_database, "acme")
    seed_items(pg_database, None, "acme", DUE, prefix="due")
    with pg_database.engine.begin() as connection:
        connection.execute(text("UPDATE media_items SET size_bytes = CAST(split_part(id, '-', 2) AS bigint) + 1, "
                                "expires_at = expires_at + make_interval(secs => CAST(split_part(id, '-', 2) AS int))"))
    env = {"MEDIA_RETENTION_DATABASE_URL": pg_database.url}
    limited = shell("sweep", "--dry-run", "--limit", "1200", "--json", env=env)
    everything = shell("sweep", "--dry-run", "--json", env=env)
    assert (limited.code, everything.code) == (0, 0), limited.stderr + everything.stderr
    limited, everything = json.loads(limited.stdout), json.loads(everything.stdout)
    assert (limited["due"], limited["due_bytes"]) == (1200, 1200 * 1201 // 2)
    assert (everything["due"], everything["due_bytes"]) == (DUE, DUE * (DUE + 1) // 2)
    assert len(limited["would_delete"]) == len(everything["would_delete"]) == 1000
    assert limited["would_delete"][0]["id"] == "due-0"
    # Nothing was claimed: a second look finds the same.
    again = json.loads(shell("sweep", "--dry-run", "--json", env=env).stdout)
    assert (again["due"], again["due_bytes"]) == (everything["due"], everything["due_bytes"])
