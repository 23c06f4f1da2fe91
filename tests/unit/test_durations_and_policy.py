from datetime import datetime, timedelta, timezone

import pytest

from config.durations import format_duration, parse_duration
from config.errors import BadInput
from worker.policy import expires_at, parse_retention, parse_ttl


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("7d", 604800), ("2w", 1209600), ("PT1H", 3600), ("P30D", 2592000),
     ("pt90m", 5400), ("P1DT12H", 129600), (" 1H ", 3600)],
)
def test_durations_accept_short_and_iso_8601_forms(text, seconds):
    """Every documented spelling parses to the right number of seconds."""
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "1x", "-1h", "0s", "P1M", "P1Y", "PT0.5S", "1.5h", "PT", "abc", "1h30m"])
def test_malformed_durations_are_bad_input(text):
    """Zero, negative, fractional, calendar (months/years) and junk durations are refused."""
    with pytest.raises(BadInput):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(7776000, "90d"), (1209600, "2w"), (129600, "36h"), (5400, "90m"), (61, "61s")])
def test_durations_format_in_their_shortest_exact_unit(seconds, text):
    """Formatting picks the largest unit that divides evenly, and parses back to the same value."""
    assert format_duration(timedelta(seconds=seconds)) == text
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["1h", "3600s", "30d", "P30D", "720h"])
def test_ttl_bounds_are_inclusive_from_one_hour_to_thirty_days(text):
    """The bounds themselves are valid TTLs."""
    assert timedelta(hours=1) <= parse_ttl(text) <= timedelta(days=30)


@pytest.mark.parametrize("text", ["30m", "3599s", "31d", "721h", "5w"])
def test_ttl_outside_one_hour_to_thirty_days_is_refused(text):
    """A TTL one second short of an hour or past thirty days is bad input."""
    with pytest.raises(BadInput, match="between 1h and 30d"):
        parse_ttl(text)


def test_org_retention_is_at_least_an_hour_and_at_most_what_the_catalog_column_holds():
    """59 minutes is refused, ten years is fine, and 2^31 seconds (one past the integer column) is refused."""
    with pytest.raises(BadInput, match="at least 1h"):
        parse_retention("59m")
    assert parse_retention("520w") == timedelta(weeks=520)
    assert parse_retention(f"{2**31 - 1}s") == timedelta(seconds=2**31 - 1)
    with pytest.raises(BadInput, match="too long"):
        parse_retention(f"{2**31}s")


@pytest.mark.parametrize("text", ["99999999999999999999d", "9" * 5000 + "s", "P99999999999999999D", "PT99999999999999H", "36501d"])
def test_durations_beyond_a_century_are_refused_however_they_are_written(text):
    """Huge numbers are one sentence, not an OverflowError or a ValueError from int()."""
    with pytest.raises(BadInput, match="too long"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("ttl", "retention", "lifetime"),
    [(None, timedelta(days=90), timedelta(days=90)),
     (timedelta(hours=1), timedelta(days=90), timedelta(hours=1)),
     (timedelta(days=30), timedelta(days=1), timedelta(days=30))],
)
def test_a_ttl_overrides_the_org_retention_in_both_directions(ttl, retention, lifetime):
    """With a TTL, expiry is created_at + TTL whether it is shorter or longer than the org period."""
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert expires_at(created, ttl, retention) == created + lifetime
