"""The beat schedule. Tasks are named by string so `config/` never imports `tasks/`."""

from __future__ import annotations

from config.settings import Settings

# Beat sends the scheduled sweep: one per schedule slot fleet-wide, fanning out drains for a backlog.
SCHEDULED_SWEEP_TASK = "media_retention.scheduled_sweep"
# An extra worker process's share of a large backlog, sent by the scheduled sweep.
DRAIN_TASK = "media_retention.drain"
# One sweep now, no slot: `sweep --enqueue` and the critical-volume alert send this.
SWEEP_TASK = "media_retention.sweep"
PURGE_TASK = "media_retention.purge"
RECONCILE_TASK = "media_retention.reconcile"
# Samples the media volume and raises, reminds or resolves the fleet's volume alert.
VOLUME_TASK = "media_retention.check_volume"
# Removes tombstones older than MEDIA_RETENTION_TOMBSTONE_RETENTION, when that is set.
COMPACT_TASK = "media_retention.compact_tombstones"
# Once a day: tombstones are compacted by age in days, and a daily pass keeps each one short.
COMPACT_INTERVAL_S = 86400
# A scheduled message lives at least this long. Expiring a sweep after one interval keeps a queue that
# backed up while workers were down from running a sweep per missed slot, but a 1-second interval
# would then expire messages still in transit: the embedded filesystem broker is polled once a second,
# so under load every sweep arrived a little over 1 s after beat sent it and was dropped unannounced
# (Celery discards expired messages without a log line). A late sweep is harmless: it takes the slot
# that is current when it runs, and the one beat sends for that slot finds it taken.
MIN_EXPIRES_S = 30.0


def expires_after(interval_s: float) -> float:
    """How long a message sent every `interval_s` may wait for a worker before it is dropped."""
    return max(interval_s, MIN_EXPIRES_S)


def beat_schedule(settings: Settings) -> dict:
    interval = settings.sweep_interval.total_seconds()
    schedule = {
        "sweep-expired-media": {
            "task": SCHEDULED_SWEEP_TASK,
            "schedule": interval,
            # A sweep nobody picked up within one interval is superseded by the next one: expiring
            # it keeps a queue that backed up while workers were down from running N sweeps in a row.
            "options": {"expires": expires_after(interval)},
        },
        "check-media-volume": {
            "task": VOLUME_TASK,
            "schedule": settings.volume_check_interval.total_seconds(),
            # A stale check is worth nothing once the next one is due: the volume has moved on.
            "options": {"expires": expires_after(settings.volume_check_interval.total_seconds())},
        },
    }
    if settings.tombstone_retention:
        schedule["compact-tombstones"] = {
            "task": COMPACT_TASK,
            "schedule": COMPACT_INTERVAL_S,
            # A day's pass that waited a day is superseded by the next.
            "options": {"expires": COMPACT_INTERVAL_S},
        }
    return schedule
