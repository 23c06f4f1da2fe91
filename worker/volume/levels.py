"""How full the media volume is, how soon it will be full, and which alert level that means.

Pure functions over `Usage` samples, so levels, hysteresis and projection are table-tested without
a disk or a database. Measuring is `filesystem.py` and `measure.py`; where samples and alert state are
kept is `state.py`, and who is notified `notifiers.py`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

# A projection from fewer points, or from points closer together than this, extrapolates noise
# (two samples a second apart say nothing about a day). Ten minutes is two checks at the default
# five-minute interval; three points is the fewest for which a least-squares line is a fit at all.
PROJECTION_MIN_SAMPLES = 3
PROJECTION_MIN_SPAN_SECONDS = 600
# A warning raised by the projection clears only once the volume is projected to last this many
# horizons: the slope of a few hours of samples wobbles around the horizon as deletions come and go,
# and without a margin that wobble would page on every other check.
PROJECTION_CLEAR_FACTOR = 2.0
# The fit over the whole window remembers growth from before space was freed: a volume that grew for
# hours, then dropped and stayed flat, still has a rising line (a false "full in 8 h" with 20 s checks).
# So the trend of the newest quarter of the window (at least PROJECTION_MIN_SPAN_SECONDS) must rise too,
# the slower of the two rates is used, and the room left is counted from the newest sample when that is
# below the fitted line.
PROJECTION_RECENT_FRACTION = 0.25

RESOURCES = ("bytes", "inodes")


class Level(str, enum.Enum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0, 1, 2: the value of the alert-level gauge, and the order of severity."""
        return _RANKS[self]


_RANKS = {Level.OK: 0, Level.WARNING: 1, Level.CRITICAL: 2}


@dataclass(frozen=True)
class Usage:
    """One sample of the media volume. Totals are None when unknown (no S3 capacity, no inode counts)."""

    used_bytes: int
    total_bytes: int | None
    used_inodes: int | None = None
    total_inodes: int | None = None
    taken_at: datetime | None = None

    def used(self, resource: str) -> int | None:
        return self.used_bytes if resource == "bytes" else self.used_inodes

    def total(self, resource: str) -> int | None:
        return self.total_bytes if resource == "bytes" else self.total_inodes

    def ratio(self, resource: str) -> float | None:
        used, total = self.used(resource), self.total(resource)
        if used is None or not total:
            return None
        return used / total

    def ratios(self) -> dict[str, float]:
        """Used fraction of each resource whose total is known."""
        return {r: ratio for r in RESOURCES if (ratio := self.ratio(r)) is not None}

    def to_dict(self) -> dict:
        return {
            resource: {"used": self.used(resource), "total": self.total(resource), "ratio": self.ratio(resource)}
            for resource in RESOURCES
        }


# -- projection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """When the volume is full if it keeps growing as it did over the window.

    `status`: `filling` (seconds_to_full is set), `full`, `not_filling` (flat or shrinking), or
    `insufficient_data` (too few samples, or spanning too short a time).
    """

    status: str
    seconds_to_full: float | None = None
    resource: str | None = None
    rate_per_second: float | None = None
    samples: int = 0

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "seconds_to_full": None if self.seconds_to_full is None else round(self.seconds_to_full),
            "full_in": describe_seconds(self.seconds_to_full),
            "resource": self.resource,
            "rate_per_second": self.rate_per_second,
            "samples": self.samples,
        }


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (slope, value fitted at the last point's x) — Prometheus' `predict_linear` fit.

    x is centred on its mean before multiplying, so byte counts near 1e13 times seconds near 1e5
    stay well inside float precision.
    """
    n = len(points)
    if n < 2:
        return None
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    last_x = max(x for x, _ in points)
    return slope, mean_y + slope * (last_x - mean_x)


def time_to_full(points: Sequence[tuple[float, float]], capacity: float) -> Projection:
    """Project one resource: `points` are (seconds, used) pairs, `capacity` the total to fill."""
    xs = [x for x, _ in points]
    if len(points) < PROJECTION_MIN_SAMPLES or max(xs) - min(xs) < PROJECTION_MIN_SPAN_SECONDS:
        return Projection("insufficient_data", samples=len(points))
    fit = fit_line(points)
    if fit is None:
        return Projection("insufficient_data", samples=len(points))
    slope, fitted_now = fit
    newest_x, newest_used = max(points)
    recent_span = max((newest_x - min(xs)) * PROJECTION_RECENT_FRACTION, PROJECTION_MIN_SPAN_SECONDS)
    recent = fit_line([(x, y) for x, y in points if x >= newest_x - recent_span])
    if recent is not None:
        slope = min(slope, recent[0])
    if slope <= 0:
        return Projection("not_filling", rate_per_second=slope, samples=len(points))
    fitted_now = min(fitted_now, newest_used)
    if fitted_now >= capacity:
        return Projection("full", seconds_to_full=0.0, rate_per_second=slope, samples=len(points))
    return Projection("filling", seconds_to_full=(capacity - fitted_now) / slope, rate_per_second=slope,
                      samples=len(points))


def project(samples: Sequence[Usage]) -> Projection:
    """The soonest time-to-full over bytes and inodes, from samples with `taken_at` set.

    The capacity is the newest sample's total: a volume that was grown meanwhile is judged by its new size.
    """
    dated = sorted((s for s in samples if s.taken_at is not None), key=lambda s: s.taken_at)
    if not dated:
        return Projection("insufficient_data")
    origin = dated[-1].taken_at
    results = []
    for resource in RESOURCES:
        capacity = dated[-1].total(resource)
        if not capacity:
            continue
        points = [((s.taken_at - origin).total_seconds(), float(s.used(resource)))
                  for s in dated if s.used(resource) is not None and s.total(resource)]
        projection = time_to_full(points, capacity)
        results.append(Projection(projection.status, projection.seconds_to_full, resource,
                                  projection.rate_per_second, projection.samples))
    timed = [p for p in results if p.seconds_to_full is not None]
    if timed:
        return min(timed, key=lambda p: p.seconds_to_full)
    not_filling = [p for p in results if p.status == "not_filling"]
    if not_filling:
        return not_filling[0]
    return Projection("insufficient_data", samples=len(dated))


# -- levels --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    warn: float
    critical: float
    # A raised level clears only this many points (as a fraction) below its threshold.
    hysteresis: float
    # Warn when the projection says full within this many seconds, even below `warn`.
    horizon_seconds: float


@dataclass(frozen=True)
class Evaluation:
    """The level a sample means, and why: `bytes`, `inodes`, `projection`, or None when ok."""

    level: Level
    reason: str | None
    ratio: float | None  # the fullest resource's used fraction


def evaluate(usage: Usage, projection: Projection, previous: Level, thresholds: Thresholds) -> Evaluation:
    """The level for `usage`, given the level currently raised (`previous`), with hysteresis.

    A level is raised when the fullest resource reaches its threshold, and held until that resource
    drops `hysteresis` below it: a volume hovering at 80 % notifies once, not on every check.
    A projected fill within the horizon raises a warning even below the threshold.
    """
    ratios = usage.ratios()
    if not ratios:
        raise ValueError("no resource with a known total; cannot evaluate a level")
    resource, ratio = max(ratios.items(), key=lambda item: item[1])
    held_critical = previous is Level.CRITICAL
    held_warning = previous in (Level.WARNING, Level.CRITICAL)
    critical_line = thresholds.critical - thresholds.hysteresis if held_critical else thresholds.critical
    warn_line = thresholds.warn - thresholds.hysteresis if held_warning else thresholds.warn
    horizon = thresholds.horizon_seconds * (PROJECTION_CLEAR_FACTOR if held_warning else 1.0)
    if ratio >= critical_line:
        return Evaluation(Level.CRITICAL, resource, ratio)
    if ratio >= warn_line:
        return Evaluation(Level.WARNING, resource, ratio)
    if projection.seconds_to_full is not None and projection.seconds_to_full <= horizon:
        return Evaluation(Level.WARNING, "projection", ratio)
    return Evaluation(Level.OK, None, ratio)


def describe_seconds(seconds: float | None) -> str | None:
    """A time to full as people say it: `3d 4h`, `5h 12m`, `7m`, `now`."""
    if seconds is None:
        return None
    seconds = int(seconds)
    if seconds < 60:
        return "now" if seconds <= 0 else f"{seconds}s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m"
