"""The one settings object. Read once from `MEDIA_RETENTION_*` environment variables.

Every default is embedded: with nothing set, the worker keeps its database, broker queue and media
under `MEDIA_RETENTION_DATA_DIR` and needs no server.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.durations import check_retention, parse_duration
from config.errors import BadInput
from config.storage import check_storage_url


def _duration(value: object) -> object:
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except BadInput as exc:
            raise ValueError(str(exc)) from None
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]


def _duration_or_off(value: object) -> object:
    if isinstance(value, str) and value.strip().lower() in ("0", "off"):
        return timedelta(0)
    return _duration(value)


# A duration, or `0` / `off` for a feature that can be turned off.
DurationOrOff = Annotated[timedelta, BeforeValidator(_duration_or_off)]


# The databases the catalog speaks (worker/dialect.py holds what differs between them).
SUPPORTED_DATABASES = ("postgresql", "sqlite")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDIA_RETENTION_", frozen=True, extra="ignore")

    data_dir: Path = Path("./media-retention-data")
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    # "single" sends one DeleteObject a key, for endpoints without multi-object delete (GCS XML API).
    s3_delete_mode: Literal["batch", "single"] = "batch"
    # "path" for MinIO and other endpoints reached by IP or by a hostname without per-bucket DNS.
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # `lookup --url` links live this long; at most an hour, so a leaked link dies soon after it is shared.
    presign_ttl: Duration = Field(timedelta(hours=1), gt=timedelta(0), le=timedelta(hours=1))
    default_retention: Duration = timedelta(days=90)
    sweep_interval: Duration = timedelta(seconds=60)
    # How often each worker node's expiry watch asks the database whether anything is due (worker/watch.py):
    # items go within about this long of their expiry, at one index probe per node per interval while
    # nothing is due. `off` (or 0) turns the watch off, leaving deletion to beat's sweeps (up to SWEEP_INTERVAL late).
    watch_interval: DurationOrOff = Field(timedelta(seconds=1), ge=timedelta(0), le=timedelta(minutes=10))
    claim_lease: Duration = timedelta(minutes=5)
    # Tombstones of items deleted longer ago than this are removed once a day (worker/tombstones.py): the
    # catalog then grows with live media, not with history. A compacted ID answers 404 not_found instead
    # of gone and may be registered again. Off by default: every tombstone is kept.
    tombstone_retention: DurationOrOff = Field(timedelta(0), ge=timedelta(0))
    # 1000 rows a claim: exactly one full S3 DeleteObjects request (its maximum), and still a
    # transaction of milliseconds.
    sweep_batch_size: int = Field(1000, ge=1, le=10_000)
    # Threads unlinking files in parallel; filesystem deletes are latency-bound on network volumes (EFS).
    delete_threads: int = Field(8, ge=1, le=64)
    # Most extra drain tasks one scheduled sweep sends for a large backlog: one per worker process
    # you run is the useful number; more only queue up behind them and exit at once.
    sweep_fanout_max: int = Field(8, ge=0, le=256)
    # Port of the Prometheus endpoint each `celery worker` serves from its main process; 0 = none.
    metrics_port: int = Field(0, ge=0, le=65535)
    volume_warn: float = Field(0.80, gt=0, lt=1)
    volume_critical: float = Field(0.90, gt=0, le=1)
    # A raised level clears only this far below its threshold (0.05 = 5 points): deletions and uploads
    # move a busy volume by a point or two between checks, and without a margin it would page each time.
    volume_hysteresis: float = Field(0.05, ge=0, lt=1)
    # Five minutes: a volume fills over hours, and a statvfs plus one small insert per check is free.
    volume_check_interval: Duration = timedelta(minutes=5)
    # Six hours of samples for the slope, warning when full within a day: node_exporter's standard
    # "filesystem will fill within 24 hours" alert uses the same window and horizon.
    volume_projection_window: Duration = timedelta(hours=6)
    volume_projection_horizon: Duration = timedelta(hours=24)
    # Four hours between reminders while an alert holds: Alertmanager's default repeat_interval.
    volume_alert_reminder: Duration = timedelta(hours=4)
    # Object stores have no "full": operators give the quota (or budget) live media is measured against.
    s3_capacity_bytes: int | None = Field(None, ge=1)
    # A generic JSON webhook (Alertmanager's webhook-receiver shape) for receivers other than Alertmanager.
    alert_webhook_url: str | None = None
    # Alertmanager base URLs (http://alertmanager:9093), comma-separated for an HA pair: each is
    # posted every alert through its own API, as Prometheus posts to each of its alertmanagers.
    alertmanager_url: str | None = None
    # Per attempt; attempts x timeout bounds what a hung endpoint can cost the volume task.
    alert_webhook_timeout: Duration = timedelta(seconds=5)
    alert_webhook_attempts: int = Field(3, ge=1, le=10)
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"

    # URL checks never repeat the value: a URL may carry a password.
    @field_validator("database_url")
    @classmethod
    def _database_url_parses(cls, value: str) -> str:
        if value:
            from sqlalchemy.engine import make_url

            try:
                url = make_url(value)
            except Exception:  # noqa: BLE001 - whatever SQLAlchemy objects to, the answer is the same
                raise ValueError("not a database URL SQLAlchemy can read; use e.g. postgresql+psycopg://user@host:5432/db") from None
            # Checked here, not at the first connection: a driver that is missing would surface there as an
            # unexpected ModuleNotFoundError, and the catalog speaks only these two databases (worker/dialect.py).
            if url.get_backend_name() not in SUPPORTED_DATABASES:
                raise ValueError(f"{url.get_backend_name()} is not supported; use postgresql+psycopg://user@host:5432/db "
                                 "or sqlite:///path")
            try:
                url.get_dialect().import_dbapi()
            except Exception:  # noqa: BLE001 - an unknown driver name or a driver that is not installed
                raise ValueError(f"the database driver {url.drivername} is not installed; use postgresql+psycopg://"
                                 "user@host:5432/db or sqlite:///path") from None
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url_is_usable(cls, value: str) -> str:
        if value:
            try:
                check_storage_url(value)
            except BadInput as exc:
                raise ValueError(str(exc).rstrip(".")) from None
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir_is_a_directory(cls, value: Path) -> Path:
        if "\x00" in str(value):
            raise ValueError("contains a NUL byte")
        if value.exists() and not value.is_dir():
            raise ValueError(f"{str(value)!r} exists and is not a directory")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_is_known(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()

    @field_validator("default_retention")
    @classmethod
    def _default_retention_fits(cls, value: timedelta) -> timedelta:
        try:
            return check_retention(value, f"{int(value.total_seconds())}s")
        except BadInput as exc:
            raise ValueError(str(exc).rstrip(".")) from None

    @field_validator("tombstone_retention")
    @classmethod
    def _tombstones_kept_a_day(cls, value: timedelta) -> timedelta:
        if timedelta(0) < value < timedelta(days=1):
            raise ValueError("use at least 1d, or off to keep every tombstone")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url_parses(cls, value: str) -> str:
        if value:
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError:
                raise ValueError("not a URL; use e.g. redis://host:6379/0") from None
            if not parts.scheme:
                raise ValueError("not a URL; use e.g. redis://host:6379/0")
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> "Settings":
        data_dir = self.data_dir.expanduser().absolute()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'catalog.sqlite3'}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", "filesystem://")
        if not self.storage_url:
            object.__setattr__(self, "storage_url", (data_dir / "media").as_uri())
        if self.volume_warn >= self.volume_critical:
            raise ValueError("VOLUME_WARN must be below VOLUME_CRITICAL")
        if self.volume_hysteresis >= self.volume_warn:
            raise ValueError("VOLUME_HYSTERESIS must be below VOLUME_WARN")
        if self.alert_webhook_url and not self.alert_webhook_url.startswith(("http://", "https://")):
            raise ValueError("ALERT_WEBHOOK_URL must be an http:// or https:// URL")
        if self.alert_webhook_timeout > timedelta(minutes=1):
            raise ValueError("ALERT_WEBHOOK_TIMEOUT must be at most 1m")
        return self

    @field_validator("alertmanager_url")
    @classmethod
    def _alertmanager_urls(cls, value: str | None) -> str | None:
        urls = [url.strip().rstrip("/") for url in (value or "").split(",") if url.strip()]
        for url in urls:
            # The message never repeats the URL: a token may live in its path or query.
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("ALERTMANAGER_URL must be http:// or https:// URLs, separated by commas")
        return ",".join(urls) or None

    @property
    def alertmanager_urls(self) -> list[str]:
        return self.alertmanager_url.split(",") if self.alertmanager_url else []

    @property
    def embedded_store(self) -> bool:
        """Whether the media live in the data dir's own `media` directory (the embedded default), the one
        media root this worker creates: any other root is a volume someone mounts, never recreated."""
        return self.storage_url == (self.data_dir / "media").as_uri()

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (plus overrides), turning validation errors into BadInput."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        name = f"MEDIA_RETENTION_{field.upper()}" if field != "settings" else "settings"
        message = first["msg"].removeprefix("Value error, ")
        raise BadInput(f"invalid setting {name}: {message}") from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
