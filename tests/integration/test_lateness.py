"""How late expired media went: the lateness histogram and a sweep's `late_max_s` are the rows' own
`deleted_at - expires_at`, for items deleted by expiry only (purges are early on purpose)."""

from datetime import timedelta

import pytest
from prometheus_client import REGISTRY

from tests.factories import register_aged, rows_by_id

HISTOGRAM = "media_retention_deletion_lateness_seconds"


def histogram() -> tuple[float, float, float]:
    """(count, sum, observations at or under an hour) of the lateness histogram in this process."""
    value = lambda suffix, **labels: REGISTRY.get_sample_value(f"{HISTOGRAM}{suffix}", labels) or 0.0  # noqa: E731
    return value("_count"), value("_sum"), value("_bucket", le="3600.0")


def test_lateness_is_observed_for_each_expired_item_by_org_and_reason_and_never_for_a_purge(catalog, tmp_path):
    """Two orgs, TTL and retention expiry in one batch, and a purge beside them: the histogram gains one
    observation per expired item whose values sum to the rows' lateness, the bucket split matches, and the
    sweep reports the largest."""
    uploads = tmp_path / "uploads"
    catalog.set_org("acme", "30d")
    catalog.set_org("globex", "1d")
    expired = [register_aged(catalog, "acme", timedelta(minutes=90), ttl="1h", uploads=uploads).id for _ in range(3)]
    expired += [register_aged(catalog, "globex", timedelta(days=2), uploads=uploads).id for _ in range(2)]
    purged = register_aged(catalog, "acme", timedelta(hours=1), uploads=uploads).id
    before = histogram()
    assert catalog.purge(ids=[purged], actor="ops").counts.deleted == 1
    counts = catalog.sweeper.sweep()
    after = histogram()

    rows = rows_by_id(catalog, expired)
    lateness = sorted((row.deleted_at - row.expires_at).total_seconds() for row in rows.values())
    assert counts.deleted == 5 and after[0] - before[0] == 5
    assert after[1] - before[1] == pytest.approx(sum(lateness), abs=0.01)
    assert after[2] - before[2] == sum(1 for late in lateness if late <= 3600.0) == 3  # the TTL items, ~30 min late
    assert counts.late_max_s == pytest.approx(lateness[-1], abs=0.01) and lateness[-1] > 86_000  # globex: ~1 day
