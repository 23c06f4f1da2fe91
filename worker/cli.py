"""`media-retention`: the operator's command line. Exit 0 ok, 1 failure, 2 bad input, 3 not found/gone.

Every command takes `--json`; results go to stdout, logs and errors to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import structlog
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from config.logging import configure_logging, operator_line
from config.settings import Settings, get_settings
from config.schedule import PURGE_TASK, RECONCILE_TASK, SWEEP_TASK
from worker import runtime, schema, status, validation
from worker.catalog import ManifestError, default_actor
from config.durations import parse_duration
from config.errors import BadInput, Gone, NotFound, RetentionError
from worker.reconcile import DEFAULT_MAX_MISSING, DEFAULT_MAX_ORPHANS
from worker.engine import Engine
from config.redact import redact_text, redact_url, remember_settings
from worker.responses import not_found_body
from worker.verify import DEFAULT_EXAMPLES, default_stuck_after

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_NOT_FOUND = 0, 1, 2, 3
# The largest number a database column or LIMIT takes (a signed 64-bit integer): a larger one is bad input, not a crash.
DB_INT_MAX = 2**63 - 1

log = structlog.get_logger("worker.cli")


class Output:
    """Prints a result as JSON (`--json`) or as readable `name: value` lines."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.line_open = False

    def result(self, data: dict, title: str | None = None, keep: tuple[str, ...] = ()) -> None:
        """`keep`: values printed whole, unredacted (see `echo`)."""
        self.end_progress()
        if self.as_json:
            echo(json.dumps(data, default=str, sort_keys=True), keep=keep)
            return
        if title:
            echo(title)
        for name, value in data.items():
            if isinstance(value, list):
                echo(f"{name}: {len(value)}")
                for entry in value:
                    echo(f"  - {json.dumps(entry, default=str) if isinstance(entry, dict) else entry}")
            elif isinstance(value, dict):
                echo(f"{name}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
            else:
                echo(f"{name}: {value}", keep=keep)

    def progress(self, message: str) -> None:
        """Where a long command is: one line rewritten in place on a terminal, a log event otherwise
        (a log collector gets periodic counts, not carriage returns)."""
        if sys.stderr.isatty():
            click.echo("\r\033[K" + redact_text(message), err=True, nl=False)
            self.line_open = True
        else:
            log.info("cli.progress", progress=message)

    def end_progress(self) -> None:
        """Finish a progress line on a terminal, so what follows starts on a line of its own."""
        if self.line_open:
            click.echo("", err=True)
            self.line_open = False

    def notice(self, message: str) -> None:
        """A sentence for the operator on stderr (not a result, not progress)."""
        echo(message, err=True)


class ProgressBar:
    """click's progress bar on a terminal, for work whose total is known; periodic log events otherwise."""

    def __init__(self, event: str, total: int, label: str):
        self.event, self.total, self.done = event, total, 0
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) if sys.stderr.isatty() else None
        if self.bar is not None:
            self.bar.__enter__()

    def update(self, done: int, **counts) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
        else:
            log.info(self.event, done=done, total=self.total, **counts)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def echo(message: str, err: bool = False, keep: tuple[str, ...] = ()) -> None:
    """Print a line with every secret we know of masked (see config.redact): the one way the CLI prints.
    `keep`: values the user asked to see, printed whole (a presigned URL's signature is its query, an API
    token is shown once); as JSON strings too. Everything around them is still redacted.
    Undecodable bytes from argv (surrogate escapes) are shown as \\udcXX rather than failing the write. With
    LOG_FORMAT=json a line for stderr goes out as a JSON event (config.logging.operator_line)."""
    keep = tuple(keep) + tuple(json.dumps(value)[1:-1] for value in keep)
    line = redact_text(message, keep=keep).encode("utf-8", "backslashreplace").decode("utf-8")
    click.echo(operator_line(line) if err else line, err=err)


def json_option(command: Callable) -> Callable:
    """Add `--json` and hand the command an `out: Output`."""

    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
    @functools.wraps(command)
    def wrapper(*args, as_json: bool, **kwargs):
        return command(*args, out=Output(as_json), **kwargs)

    return wrapper


def settings() -> Settings:
    return get_settings()


def open_engine() -> Engine:
    """This process's engine on a current schema; the embedded SQLite catalog is created on first use."""
    current = settings()
    current.data_dir.mkdir(parents=True, exist_ok=True)
    engine = runtime.engine()
    if not schema.is_current(engine.db):
        if engine.db.dialect == "sqlite":
            created = schema.current_revision(engine.db) is None
            schema.upgrade(engine.db)
            if created:
                _new_embedded_catalog(engine, current)
        else:
            runtime.close()
            raise RetentionError("the database schema is not current; run `media-retention db upgrade` first.")
    return engine


def _new_embedded_catalog(engine: Engine, current: Settings) -> None:
    """A SQLite catalog was just created. On the embedded defaults that is a new deployment: its empty store is
    bound to it at once. Facing a configured store it is more likely a DATABASE_URL left unset: said loudly,
    and the store is bound only where that is plainly right (worker/binding.py), so nothing acts on a store full
    of another catalog's media."""
    embedded = current.embedded_store
    (log.debug if embedded else log.warning)(
        "catalog.created", database=redact_url(engine.db.url), store=redact_url(engine.store.url),
        hint=None if embedded else "MEDIA_RETENTION_DATABASE_URL is not set: this is a new, empty catalog")
    with contextlib.suppress(RetentionError):  # the commands that act on the store say why, in their sentence
        engine.binding.ensure(quiet=embedded)


def with_engine(command: Callable) -> Callable:
    """Hand the command this process's engine (`engine: Engine`), closed when the command is done."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        engine = open_engine()
        try:
            return command(engine, *args, **kwargs)
        finally:
            runtime.close()

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Enforce media retention: expire media by TTL or org retention, on a filesystem or S3."""
    current = settings()
    remember_settings(current)
    configure_logging(current.log_format, current.log_level, redact=redact_text)


# -- run and schema ----------------------------------------------------------------------------


def _bind_store(engine: Engine, out: Output) -> dict:
    """Bind the configured store to this catalog where that is plainly right (worker/binding.py) and say how it
    stands. Never fails the command that asks: a schema upgrade is about the database, and may run where the
    media volume is not mounted (an init container); what refuses is every command that would act on the store."""
    try:
        state = engine.binding.ensure()
        return {"url": redact_url(engine.store.url), "bound": True, "catalog": state.catalog}
    except RetentionError as exc:
        out.notice(f"media-retention: {_sentence(str(exc))}")
        return {"url": redact_url(engine.store.url), "bound": False, "error": str(exc)}


@cli.command()
@click.option("--loglevel", default=None, help="Celery log level (default: MEDIA_RETENTION_LOG_LEVEL).")
@json_option
def run(loglevel: str | None, out: Output) -> None:
    """Run worker and beat in one foreground process (creates the data dir and schema)."""
    current = settings()
    current.data_dir.mkdir(parents=True, exist_ok=True)
    revision = schema.upgrade(runtime.engine().db)
    # The worker deletes media: it starts only on a store bound to this catalog (one sentence, exit 2, if not).
    runtime.engine().binding.ensure()
    out.notice(
        f"media-retention: data dir {current.data_dir}, schema {revision}, store {redact_url(current.storage_url)}, "
        f"sweeping every {int(current.sweep_interval.total_seconds())}s"
    )
    from worker.app import app

    # solo pool: on the embedded SQLite catalog one process is the right size; fleets use `celery worker`.
    app.worker_main(["worker", "--beat", "--pool=solo", f"--loglevel={loglevel or current.log_level}",
                     "--hostname=media-retention@%h"])


@cli.group()
def db() -> None:
    """Database schema."""


# How often `db upgrade --wait` tries an unreachable database again: a fleet starts within seconds of
# the database, and the log gets one line per try.
DATABASE_RETRY_S = 5.0


def _wait_for_database(db) -> None:
    """Return once the database answers. The systemd units start only after the migration succeeded, and
    a failed dependency is never retried: so at boot, with the database down, the migration waits."""
    for attempt in itertools.count(1):
        try:
            with db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return
        except OperationalError as exc:
            log.warning("db.unreachable", attempt=attempt, retry_in_s=DATABASE_RETRY_S, database=redact_url(db.url),
                        error=redact_text(str(exc.orig or exc).strip()))
            time.sleep(DATABASE_RETRY_S)


@db.command()
@click.option("--wait", is_flag=True,
              help="Wait for the database to answer (trying every 5 s) before migrating; a failing migration still fails.")
@json_option
def upgrade(out: Output, wait: bool) -> None:
    """Create or migrate the schema to the newest revision."""
    current = settings()
    current.data_dir.mkdir(parents=True, exist_ok=True)
    engine = runtime.engine()
    db = engine.db
    try:
        if wait:
            _wait_for_database(db)
        before, after = schema.migrate(db)  # `before` read under the migration lock: what this upgrade found
        binding = _bind_store(engine, out)
    finally:
        runtime.close()
    out.result({"from": before, "to": after, "database": redact_url(db.url), "store": binding})


# -- organizations -------------------------------------------------------------------------------


@cli.group()
def org() -> None:
    """Organizations and their retention."""


@org.command("set")
@click.argument("org_id", metavar="ORG")
@click.option("--retention", help="Retention period, e.g. 90d, 2w, P30D (at least 1h).")
@click.option("--by", "actor", help="Who makes the change (recorded; default: the OS user).")
@click.option("--dry-run", is_flag=True, help="Only show what the new --retention would make due at the next sweep.")
@json_option
@with_engine
def org_set(engine: Engine, org_id: str, retention: str | None, actor: str | None, dry_run: bool, out: Output) -> None:
    """Create ORG or change its retention (applies to stored items from the next sweep)."""
    if dry_run:
        _print_preview(engine.catalog.preview_retention(org_id, retention), out)
        return
    out.result(engine.catalog.set_org(org_id, retention, actor=actor).to_dict())


def _print_preview(preview, out: Output) -> None:
    """A retention preview (`org set --dry-run`, `org rule set|rm --dry-run`): JSON, or a few lines."""
    if out.as_json:
        out.result(preview.to_dict())
        return
    scope = f"Retention of {preview.org}" + (f" for {preview.mime}" if preview.mime else "")
    echo(f"dry run: nothing was changed. {scope}: {preview.retention} -> {preview.new_retention}")
    echo(f"would be rescheduled:   {preview.applies_to} items (the period applies to them)")
    echo(f"due at the next sweep:  {preview.due} items ({preview.due_bytes} bytes), "
         f"{preview.newly_due} of them ({preview.newly_due_bytes} bytes) because of this change")
    echo(f"kept longer:            {preview.kept_longer} items")
    echo(f"held (not deleted):     {preview.held} items that would be due" + (" (the org is on hold)" if preview.org_held else ""))
    for case_held, count in sorted(preview.held_by_case.items()):
        echo(f"  held by case {case_held}: {count} items")
    echo(f"with their own TTL:     {preview.ttl_items} items (the retention does not apply to them)")


@org.group("rule")
def org_rule() -> None:
    """Retention by content type: the most specific MIME pattern wins over the org's period; a TTL over both."""


@org_rule.command("set")
@click.argument("org_id", metavar="ORG")
@click.option("--mime", "mime", required=True, help="type/subtype or type/*, e.g. image/png or image/* (case-insensitive).")
@click.option("--retention", required=True, help="Retention period for that content type, e.g. 30d, 2w, P30D (at least 1h).")
@click.option("--by", "actor", help="Who makes the change (recorded; default: the OS user).")
@click.option("--dry-run", is_flag=True, help="Only show what the rule would make due at the next sweep.")
@json_option
@with_engine
def org_rule_set(engine: Engine, org_id: str, mime: str, retention: str, actor: str | None, dry_run: bool, out: Output) -> None:
    """Give ORG's media of a content type its own retention (applies to stored items from the next sweep)."""
    result = engine.catalog.rules.set(org_id, mime, retention, actor=actor, dry_run=dry_run)
    if dry_run:
        _print_preview(result, out)
        return
    out.result(result.to_dict())


@org_rule.command("rm")
@click.argument("org_id", metavar="ORG")
@click.option("--mime", "mime", required=True, help="The pattern of the rule to remove, as it was set.")
@click.option("--by", "actor", help="Who makes the change (recorded; default: the OS user).")
@click.option("--dry-run", is_flag=True, help="Only show what removing the rule would make due at the next sweep.")
@json_option
@with_engine
def org_rule_rm(engine: Engine, org_id: str, mime: str, actor: str | None, dry_run: bool, out: Output) -> None:
    """Remove a retention rule of ORG: its media falls back to type/* or the org's period (exit 3 if no such rule)."""
    result = engine.catalog.rules.remove(org_id, mime, actor=actor, dry_run=dry_run)
    if dry_run:
        _print_preview(result, out)
        return
    out.result(result.to_dict())


@org.command("show")
@click.argument("org_id", metavar="ORG")
@json_option
@with_engine
def org_show(engine: Engine, org_id: str, out: Output) -> None:
    """Show ORG's retention, hold and item counts."""
    out.result(engine.catalog.show_org(org_id).to_dict())


# -- media ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--org", "org_id", help="Owning organization (must exist).")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), help="Copy this file into the store.")
@click.option("--key", help="Adopt a blob already in the store at this key.")
@click.option("--id", "media_id", help="Media ID (default: a new random one).")
@click.option("--ttl", help="Per-item TTL, 1h to 30d; overrides the org retention.")
@click.option("--created-at", help="ISO-8601 creation time (default: now, by the database clock).")
@click.option("--mime", help="MIME type (default: guessed from the name).")
@click.option("--variant", "variants", multiple=True,
              help="Adopt a derived blob already in the store at this key (thumbnail, preview); it goes with the item. Repeatable.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), help="Register every line of a JSON-lines file.")
@click.option("--files-root", type=click.Path(path_type=Path),
              help="With --manifest: the directory its 'file' lines may read from, relative paths too (default: the manifest's own directory).")
@json_option
@with_engine
def register(engine: Engine, org_id, file, key, media_id, ttl, created_at, mime, variants, manifest, files_root,
             out: Output) -> None:
    """Register media: one item (--file or --key, with any --variant) or a whole --manifest."""
    if files_root is not None and manifest is None:
        raise BadInput("--files-root goes with --manifest; --file takes the path as given.")
    if manifest is not None:
        if any(v is not None for v in (org_id, file, key, media_id, ttl, created_at, mime)) or variants:
            raise BadInput("--manifest takes every field from the file; give no other register options with it.")
        try:
            summary = engine.catalog.register_manifest(manifest, files_root=files_root,
                                                       progress=lambda n: out.progress(f"imported {n} items"))
        except ManifestError as exc:
            out.end_progress()
            for error in exc.errors[:100]:
                echo(f"media-retention: {manifest}: line {error.line}: {error.message}", err=True)
            if exc.bad_lines > 100:
                echo(f"media-retention: ... {exc.bad_lines - 100} more bad lines", err=True)
            raise
        out.result(summary.to_dict())
        return
    if org_id is None:
        raise BadInput("--org is required (or use --manifest).")
    item = engine.catalog.register(org=org_id, file=file, key=key, media_id=media_id, ttl=ttl, created_at=created_at, mime=mime,
                                   variants=list(variants))
    out.result(item.to_dict())


@cli.group()
def variant() -> None:
    """Derived files (thumbnails, previews, transcodes) of an item: they live and go with it."""


@variant.command("add")
@click.argument("media_id", metavar="ID")
@click.option("--key", "keys", multiple=True, required=True,
              help="Adopt the blob already in the store at this key as a variant of ID. Repeatable.")
@json_option
@with_engine
def variant_add(engine: Engine, media_id: str, keys: tuple[str, ...], out: Output) -> None:
    """Add derived blobs already in the store to the active item ID (refused, exit 3, once it is gone)."""
    added = engine.catalog.add_variants(media_id, list(keys))
    out.result({"id": media_id, "added": len(added), "variants": [found.to_dict() for found in added]})


@cli.command()
@click.argument("media_id", metavar="ID")
@click.option("--url", "presign", is_flag=True,
              help="Print a presigned GET URL instead (object store only; valid MEDIA_RETENTION_PRESIGN_TTL, at most 1h, "
                   "never past the item's expiry).")
@json_option
@with_engine
def lookup(engine: Engine, media_id: str, presign: bool, out: Output) -> None:
    """Show an active item; exit 3 with a 404 body from its expiry (unless held), once it is claimed or deleted,
    or if it was never seen."""
    try:
        found = engine.catalog.presigned_url(media_id) if presign else engine.catalog.lookup(media_id)
    except Gone as exc:
        echo(json.dumps(not_found_body(media_id, exc.tombstone), sort_keys=True))
        raise
    except NotFound:
        echo(json.dumps(not_found_body(media_id, None), sort_keys=True))
        raise
    # The URL the user asked for is printed whole: redacting its query (the signature) would make it useless.
    out.result(found.to_dict(), keep=found.urls if presign else ())


def send_to_fleet(task_name: str, out: Output, **kwargs) -> None:
    """Send a task to the fleet and print its id (the work runs on whichever worker takes it)."""
    from kombu.exceptions import OperationalError as BrokerError

    from worker.app import app

    try:
        # A few quick retries: an operator should hear about a dead broker in seconds, not minutes.
        result = app.send_task(task_name, kwargs=kwargs, retry=True,
                               retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
    except BrokerError as exc:
        raise RetentionError(f"cannot reach the broker at {redact_url(settings().broker_url)}: {exc}") from None
    out.result({"enqueued": task_name, "task_id": result.id, **{k: v for k, v in kwargs.items() if v is not None}})


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--limit", type=click.IntRange(1, DB_INT_MAX), help="Claim at most N items.")
@click.option("--enqueue", is_flag=True, help="Send the sweep to the workers instead of running it here.")
@json_option
@with_engine
def sweep(engine: Engine, dry_run: bool, limit: int | None, enqueue: bool, out: Output) -> None:
    """Run one sweep now, inline (or on the fleet with --enqueue), and print its counts."""
    if enqueue:
        if dry_run:
            raise BadInput("--dry-run runs here and changes nothing; there is nothing to --enqueue.")
        send_to_fleet(SWEEP_TASK, out, limit=limit)
        return
    if dry_run:
        preview = engine.sweeper.sweep(limit=limit, dry_run=True).to_dict()
        if out.as_json:
            out.result(preview)
        else:
            # A person wants what is due, not a row of zero counts from a sweep that did not run.
            out.result({name: preview[name] for name in ("due", "due_bytes", "held_skipped", "would_delete")},
                       title="dry run: nothing was deleted")
        return
    counts = engine.runs.manual(worker=f"{socket.gethostname()} (cli)", limit=limit)
    out.result(counts.to_dict())
    if counts.failed:
        raise click.exceptions.Exit(EXIT_FAILURE)


@cli.command("status")
@json_option
@with_engine
def status_command(engine: Engine, out: Output) -> None:
    """Last sweep, backlog, the oldest overdue item and stuck deletions, fleet-wide."""
    numbers = status.fleet_status(engine.db)
    numbers["store"] = store_facts(engine)
    if out.as_json:
        out.result(numbers)
        return
    last = numbers["last_sweep"]
    echo(f"now:            {numbers['now']}")
    if last:
        echo(f"last sweep:     #{last['id']} {last['kind']} on {last['worker']}, started {last['started_at']}, "
                   f"finished {last['finished_at'] or '(running)'}")
        echo(f"                claimed {last['claimed']}, deleted {last['deleted']}, failed {last['failed']}, "
                   f"freed {last['bytes_freed']} bytes, held {last['held_skipped']}, fan-out {last['fanout']}")
    else:
        echo("last sweep:     never")
    backlog = numbers["backlog"]
    echo(f"backlog:        {backlog['due']} due ({backlog['due_bytes']} bytes), {backlog['deleting']} being deleted")
    oldest = numbers["oldest_overdue"]
    echo(f"oldest overdue: {oldest['id']} expired {oldest['expires_at']} ({oldest['overdue_seconds']:.0f}s ago)" if oldest else "oldest overdue: none")
    echo(f"held expired:   {numbers['held_expired']}")
    store = numbers["store"]
    echo(f"store:          versioning {store['versioning']}, object lock {'on' if store['object_lock'] else 'off'}")
    locked = numbers["locked_deletions"]
    if locked["count"]:
        echo(f"locked:         {locked['count']} deletions refused by the store's object lock "
             f"({locked['by_reason']['retention']} retention, {locked['by_reason']['legal_hold']} legal hold), "
             f"earliest retain-until {locked['earliest_until'] or 'none (legal holds only)'}")
        for item in locked["items"]:
            echo(f"                {item['id']} ({item['key']}): {item['reason']} until {item['locked_until'] or 'released'}")
    else:
        echo("locked:         none")
    late = numbers["lateness"]
    minutes = late["window_s"] // 60
    echo(f"lateness:       p50 {late['p50_s']}s, p99 {late['p99_s']}s, max {late['max_s']}s after expiry "
         f"({late['items']} deletions by expiry in the last {minutes} min)" if late["items"] else
         f"lateness:       no deletions by expiry in the last {minutes} min")
    missing = numbers["missing_blob_items"]
    echo(f"missing blobs:  {missing['count']} active items ({missing['held']} held, never tombstoned); see `reconcile`")
    echo(f"stuck:          {numbers['stuck']['count']}")
    for item in numbers["stuck"]["items"]:
        echo(f"  - {item['id']}: {item['attempts']} attempts, lease until {item['lease_until']}, last error: {item['last_error']}")


def _scope(ids: tuple[str, ...], org_id: str | None) -> None:
    if bool(ids) == (org_id is not None):
        raise BadInput("give media IDs or --org ORG, not both and not neither.")


@cli.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--org", "org_id", help="Purge every unheld item of this organization.")
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--enqueue", "enqueue_it", is_flag=True, help="Send the purge to the workers instead of running it here.")
@click.option("--by", "actor", help="Who purges (recorded; default: the OS user).")
@json_option
@with_engine
def purge(engine: Engine, ids, org_id, dry_run, yes, enqueue_it, actor, out: Output) -> None:
    """Delete media now regardless of expiry (never held media)."""
    _scope(ids, org_id)
    if actor is not None:
        validation.actor(actor)
    if dry_run and enqueue_it:
        raise BadInput("--dry-run runs here and changes nothing; there is nothing to --enqueue.")
    if enqueue_it or (not dry_run and not yes):
        # The preview validates IDs, org and holds, so nothing is asked or sent for bad input.
        preview = engine.catalog.purge(ids=ids, org=org_id, dry_run=True)
        what = f"{preview.eligible} items ({preview.eligible_bytes} bytes)"
        if not yes and not sys.stdin.isatty():
            raise BadInput(f"purge would delete {what} now; pass --yes to confirm or --dry-run to preview.")
        if not yes and not click.confirm(f"Delete {what} now?", err=True):
            raise click.Abort()
    if enqueue_it:
        send_to_fleet(PURGE_TASK, out, ids=list(ids) or None, org=org_id, actor=actor or default_actor())
        return
    summary = engine.catalog.purge(ids=ids, org=org_id, dry_run=dry_run, actor=actor)
    out.result(summary.to_dict())
    if summary.failed:
        raise click.exceptions.Exit(EXIT_FAILURE)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only report what would change.")
@click.option("--grace", default="1d", show_default=True,
              help="Leave blobs younger than this alone (uploads in flight, imports not yet registered).")
@click.option("--max-orphans", type=click.IntRange(min=0), default=DEFAULT_MAX_ORPHANS, show_default=True,
              help="Abort, changing nothing, if more orphan blobs than this are found.")
@click.option("--max-missing", type=click.IntRange(min=0), default=DEFAULT_MAX_MISSING, show_default=True,
              help="Abort, changing nothing, if more active items than this have no blob.")
@click.option("--allow-mass-drift", is_flag=True,
              help="Go on although nearly every blob is an orphan or every item is missing its blob (or the catalog is "
                   "empty): only when you know the catalog and the store are the right ones.")
@click.option("--enqueue", "enqueue_it", is_flag=True, help="Send the reconcile to the workers instead of running it here.")
@click.option("--by", "actor", help="Who reconciles (recorded; default: the OS user).")
@json_option
@with_engine
def reconcile(engine: Engine, dry_run, grace, max_orphans, max_missing, allow_mass_drift, enqueue_it, actor, out: Output) -> None:
    """Delete orphan blobs (no live item, older than --grace); tombstone items whose blob is missing."""
    grace_value = parse_duration(grace)
    actor = validation.actor(actor or default_actor())
    if enqueue_it:
        send_to_fleet(RECONCILE_TASK, out, grace_seconds=int(grace_value.total_seconds()), max_orphans=max_orphans,
                      max_missing=max_missing, actor=actor, dry_run=dry_run, allow_mass_drift=allow_mass_drift or None)
        return
    report = engine.reconciler.run(grace=grace_value, dry_run=dry_run, max_orphans=max_orphans, max_missing=max_missing,
                                   allow_mass_drift=allow_mass_drift, actor=actor, progress=out.progress)
    out.result(report.to_dict(), title=None if out.as_json or not dry_run else "dry run: nothing was changed")
    if dry_run and report.refused:
        out.notice(f"media-retention: a real run would refuse and change nothing: {report.refused} "
                   f"(--allow-mass-drift if it is real).")
    if report.orphan_delete_failures:
        raise click.exceptions.Exit(EXIT_FAILURE)


@cli.command()
@click.option("--older-than", help="Remove tombstones of items deleted longer ago than this, at least 1d "
              "(default: MEDIA_RETENTION_TOMBSTONE_RETENTION).")
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.option("--by", "actor", help="Who compacts (recorded; default: the OS user).")
@json_option
@with_engine
def compact(engine: Engine, older_than: str | None, dry_run: bool, actor: str | None, out: Output) -> None:
    """Remove old tombstones: their IDs then answer 404 not_found instead of gone (see docs/scale.md)."""
    from worker.tombstones import MINIMUM_AGE

    if older_than is None and not settings().tombstone_retention:
        raise BadInput("give --older-than, or set MEDIA_RETENTION_TOMBSTONE_RETENTION; tombstones are kept forever by default.")
    age = parse_duration(older_than) if older_than is not None else settings().tombstone_retention
    if age < MINIMUM_AGE:
        raise BadInput(f"--older-than {older_than} is too short: tombstones younger than 1d are never compacted.")
    report = engine.tombstones.compact(older_than=age, dry_run=dry_run, actor=validation.actor(actor or default_actor()),
                                       progress=out.progress)
    out.result(report.to_dict(), title="dry run: nothing was removed" if dry_run and not out.as_json else None)


@cli.command()
@click.option("--grace", default="1d", show_default=True,
              help="Blobs with no item that are younger than this are uploads in flight, not orphans.")
@click.option("--stuck-after", help="A deletion whose lease ran out longer ago than this is stuck "
              "(default: two sweep intervals plus a minute).")
@click.option("--examples", type=click.IntRange(min=0, max=1000), default=DEFAULT_EXAMPLES, show_default=True,
              help="How many breaches of each kind to name (the counts cover all of them).")
@json_option
@with_engine
def verify(engine: Engine, grace: str, stuck_after: str | None, examples: int, out: Output) -> None:
    """Check the catalog against the store; exit 1 on any breach of the invariants. Changes nothing."""
    grace_value = parse_duration(grace)
    stuck_value = parse_duration(stuck_after) if stuck_after is not None else default_stuck_after(settings().sweep_interval)
    report = engine.verifier.run(grace=grace_value, stuck_after=stuck_value, max_examples=examples, progress=out.progress)
    out.end_progress()
    if out.as_json:
        out.result(report.to_dict())
    else:
        echo(f"checked {report.items_checked} items and {report.blobs_listed} blobs in {engine.store.url} "
                   f"at {report.checked_at}")
        for kind, count in report.breaches.items():
            echo(f"{kind}: {count}")
            for example in report.examples[kind]:
                echo(f"  - {json.dumps(example, default=str, sort_keys=True)}")
        echo("notices: " + ", ".join(f"{kind} {count}" for kind, count in report.notices.items()))
        if report.check_errors:
            echo(f"check errors: {report.check_errors}")
            for example in report.error_examples:
                echo(f"  - {example['key']}: {example['error']}")
        echo("verify: clean" if report.clean else
                   f"verify: {report.total_breaches} breaches, {report.check_errors} keys not checked")
    if not report.clean:
        raise click.exceptions.Exit(EXIT_FAILURE)


class _WithList(click.Command):
    """`hold` takes media IDs, and `hold list` lists the cases: a first argument `list` runs the listing (an item
    whose ID is `list` is held with `hold -- list`)."""

    def __init__(self, *args, listing: click.Command, **kwargs):
        super().__init__(*args, **kwargs)
        self.listing = listing

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "list":
            return self.listing.make_context(f"{info_name} list", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("list")
@click.option("--org", "org_id", help="Only holds on this organization.")
@click.option("--case", "case", help="Only this case.")
@json_option
@with_engine
def hold_list(engine: Engine, org_id: str | None, case: str | None, out: Output) -> None:
    """Each case: who placed what, when and why, its scope, and how many active items it holds now."""
    cases = engine.catalog.list_holds(org=org_id, case=case)
    if out.as_json:
        out.result({"cases": [view.to_dict() for view in cases]})
        return
    if not cases:
        echo("no holds.")
    for view in cases:
        echo(f"case {view.case}: {'open' if view.open else 'released'}, holds {view.items_held} items now")
        for p in view.placements:
            scope = {"item": "items", "org": f"org {p.org}"}.get(p.scope) or (
                f"org {p.org} created in [{p.created_after.isoformat()}, {p.created_before.isoformat()})"
                + (f" mime {p.mime}" if p.mime else "") + (" and future media" if p.include_future else ""))
            state = f"released {p.released_at.isoformat()} by {p.released_by}" if p.released_at else "open"
            echo(f"  #{p.id} {scope}: by {p.by} at {p.placed_at.isoformat()}, {p.reason!r}; {state}")


def _hold_command(held: bool) -> Callable:
    verb = "hold" if held else "release"

    @click.argument("ids", nargs=-1, metavar="[ID]...")
    @click.option("--org", "org_id", help=f"{verb.capitalize()} a whole organization" + (
        " (with --created-after/--created-before: only its items matching the query)." if held else
        " (the case's org and query holds on it)."))
    @click.option("--case", "case", help="The case (1-128 of A-Za-z0-9._-; default: 'default')." + (
        "" if held else " With --case alone, every hold of the case is released."))
    @click.option("--reason", required=True, help="Why (recorded in the audit trail).")
    @click.option("--by", "actor", help="Who (recorded; default: the OS user).")
    @json_option
    @with_engine
    def command(engine: Engine, ids, org_id, case, reason, actor, out: Output, **query) -> None:
        release_all = not held and not ids and org_id is None and case is not None
        if not held and not ids and org_id is None and case is None:
            raise BadInput("give media IDs, --org ORG, or --case CASE alone (to release every hold of the case).")
        if not release_all:
            _scope(ids, org_id)
        out.result(engine.catalog.set_hold(held=held, reason=reason, ids=ids, org=org_id, actor=actor, case=case,
                                           release_all=release_all, **query).to_dict())

    if held:
        command = click.option("--include-future", is_flag=True,
                               help="Also hold media registered later that matches the query.")(command)
        command = click.option("--mime", help="Query: only MIME types matching type/subtype or type/* (any case).")(command)
        command = click.option("--created-before", help="Query: items created before this ISO-8601 time.")(command)
        command = click.option("--created-after", help="Query: items created at or after this ISO-8601 time.")(command)
    command.__doc__ = (
        "Put media, an org, or an org's media matching a query on hold for a case: held media is never deleted "
        "while any case holds it. `hold list` lists the cases." if held else
        "Release a case's hold on media, on an org, or (--case alone) everywhere; media another case holds stays held."
    )
    if held:
        return cli.command(verb, cls=_WithList, listing=hold_list)(command)
    return cli.command(verb)(command)


hold = _hold_command(True)
release = _hold_command(False)


# -- volume --------------------------------------------------------------------------------------


@cli.command()
@json_option
@with_engine
def volume(engine: Engine, out: Output) -> None:
    """Show used/total bytes and inodes, projected time to full and the alert state (exit 0 at any level)."""
    report = engine.volume_monitor().status()
    if report.message:
        out.notice(f"media-retention: {_sentence(report.message)}")
    out.result({**report.to_dict(), "store": store_facts(engine)})


def store_facts(engine: Engine) -> dict:
    """How deleting works on the configured store (versioning, Object Lock), as `status` and `volume` say it."""
    try:
        return engine.store.describe()
    except RetentionError as exc:
        return {"versioning": "unknown", "object_lock": False, "error": str(exc)}


# -- adopting a store without a catalog -------------------------------------------------------------


@cli.command()
@click.option("--org", "org_id", required=True, help="The organization the adopted media belongs to (must exist).")
@click.option("--ttl", help="Give every adopted item this TTL (1h to 30d) instead of the org's retention.")
@click.option("--under", help="Only blobs under this key prefix (a directory of the volume, a prefix of the bucket).")
@click.option("--grace", default="10m", show_default=True,
              help="Leave blobs modified more recently than this alone: an upstream service may still be writing them.")
@click.option("--dry-run", is_flag=True, help="Only count what would be adopted and what the next sweep would then delete.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--by", "actor", help="Who adopts (recorded; default: the OS user).")
@json_option
@with_engine
def adopt(engine: Engine, org_id, ttl, under, grace, dry_run, yes, actor, out: Output) -> None:
    """Register every blob in the store the catalog does not know, created_at from its modification time."""
    from worker.policy import parse_ttl

    ttl_value = parse_ttl(ttl) if ttl is not None else None
    grace_value = parse_duration(grace)
    actor = validation.actor(actor or default_actor())

    def report(summary) -> None:
        out.progress(f"adopt: listed {summary.listed} blobs, {summary.known} known, "
                     f"{summary.adopted} {'to adopt' if summary.dry_run else 'adopted'} ({summary.adopted_bytes} bytes)")

    adopter = engine.catalog.adopter(progress=report)
    options = dict(org=org_id, ttl=ttl_value, under=under, grace=grace_value, actor=actor)
    if dry_run or not yes:
        preview = adopter.run(**options, dry_run=True)
        out.end_progress()
        if dry_run:
            out.result(preview.to_dict(), title=None if out.as_json else "dry run: nothing was registered")
            return
        what = (f"adopt {preview.adopted} blobs ({preview.adopted_bytes} bytes) into {org_id}; "
                f"{preview.due} of them ({preview.due_bytes} bytes) are already past their retention and the next sweep deletes them")
        if not sys.stdin.isatty():
            raise BadInput(f"this would {what}; pass --yes to confirm or --dry-run to preview.")
        if not click.confirm(f"This will {what}. Continue?", err=True):
            raise click.Abort()
        # The counting pass gave the total: the real pass shows a bar of it.
        bar = ProgressBar("adopt.progress", preview.listed, "adopting")
        adopter.progress = lambda summary: bar.update(summary.listed, adopted=summary.adopted, known=summary.known)
        adopter.progress_every = 0 if bar.bar is not None else adopter.progress_every
        try:
            summary = adopter.run(**options)
        finally:
            bar.close()
        out.result(summary.to_dict())
        return
    out.result(adopter.run(**options).to_dict())


# -- the audit trail ------------------------------------------------------------------------------


@cli.command()
@click.option("--org", "org_id", help="Only this organization's entries.")
@click.option("--since", help="Only entries from this time on: ISO-8601, or a duration back from now (7d).")
@click.option("--action", help="Only this action (deleted, purge, hold, release, org_set, reconcile, import, adopt, ...).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Entries per page.")
@click.option("--before", type=click.IntRange(1, DB_INT_MAX), help="Page on: only entries older than this entry id.")
@json_option
@with_engine
def audit(engine: Engine, org_id, since, action, limit, before, out: Output) -> None:
    """The audit trail, newest first: deletions, purges, holds, policy changes, reconciles, imports."""
    page = engine.catalog.audit.read(org=org_id, since=since, action=action, limit=limit, before=before)
    for entry in page.entries:
        if out.as_json:
            echo(json.dumps(entry.to_dict(), default=str, sort_keys=True))
            continue
        details = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in (entry.details or {}).items())
        echo(f"#{entry.id} {entry.at.isoformat()} {entry.action} by {entry.actor}"
             + (f" org={entry.org}" if entry.org else "") + (f" media={entry.media_id}" if entry.media_id else "")
             + (f" reason={json.dumps(entry.reason)}" if entry.reason else "") + (f" {details}" if details else ""))
    if page.more:
        echo(f"more entries: add --before {page.next_before}", err=True)


# -- the HTTP lookup service and its keys ---------------------------------------------------------


@cli.group()
def apikey() -> None:
    """Org-scoped API keys of the HTTP lookup service (`serve`)."""


@apikey.command("create")
@click.option("--org", "org_id", required=True, help="The organization whose media the key may look up.")
@click.option("--name", help="What the key is for (shown in listings).")
@click.option("--by", "actor", help="Who creates it (recorded; default: the OS user).")
@json_option
@with_engine
def apikey_create(engine: Engine, org_id: str, name: str | None, actor: str | None, out: Output) -> None:
    """Create a key for ORG and print its token: the only time it is shown."""
    created = engine.catalog.api_keys.create(org_id, name=name, actor=actor or default_actor())
    # The token is kept whole: this is the one line that must show one (everything else is redacted as ever).
    if out.as_json:
        echo(json.dumps(created.to_dict(), default=str, sort_keys=True), keep=(created.token,))
        return
    echo(f"id: {created.key.id}\norg: {created.key.org}\nname: {created.key.name or ''}\ntoken: {created.token}",
         keep=(created.token,))
    echo("Store the token now: it is not shown again (only its hash is kept).", err=True)


@apikey.command("list")
@click.option("--org", "org_id", help="Only this organization's keys.")
@json_option
@with_engine
def apikey_list(engine: Engine, org_id: str | None, out: Output) -> None:
    """List keys (never their secrets), revoked ones included."""
    keys = engine.catalog.api_keys.list(org_id)
    if out.as_json:
        for key in keys:
            echo(json.dumps(key.to_dict(), sort_keys=True))
        return
    for key in keys:
        state = f"revoked {key.revoked_at.isoformat()}" if key.revoked_at else "active"
        echo(f"{key.id}  org={key.org}  name={key.name or '-'}  created={key.created_at.isoformat()} by {key.created_by}  {state}")
    if not keys:
        echo("no API keys", err=True)


@apikey.command("revoke")
@click.argument("key_id", metavar="KEY_ID")
@click.option("--by", "actor", help="Who revokes it (recorded; default: the OS user).")
@json_option
@with_engine
def apikey_revoke(engine: Engine, key_id: str, actor: str | None, out: Output) -> None:
    """Revoke a key: the next request presenting it gets 401."""
    out.result(engine.catalog.api_keys.revoke(key_id, actor=actor or default_actor()).to_dict())


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 in a container).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Port to listen on.")
@json_option
def serve(host: str, port: int, out: Output) -> None:
    """Serve GET /v1/media/{id} over HTTP (org API keys), with /healthz, /readyz, /metrics and /openapi.json."""
    from worker.catalog.keyed_lookup import KeyedLookup
    from worker.http.app import create_app, database_ping
    from worker.http.server import run as run_server

    current = settings()
    engine = open_engine()
    try:
        app = create_app(lookups=KeyedLookup.on(engine.db, engine.catalog.lookups), ping=database_ping(engine.db))
        listener = _listen(host, port)
        log.info("serve.starting", host=host, port=port, store=redact_url(current.storage_url))
        # Every command takes --json (the contract); a server's only output is its log, JSON with LOG_FORMAT=json,
        # where serve.starting above is the line that says so.
        address = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        if current.log_format != "json":
            out.notice(json.dumps({"serving": address}) if out.as_json else f"media-retention: serving {address}")
        run_server(app, host=host, port=port, listener=listener)
    finally:
        runtime.close()


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything claims to serve: a busy port or an address this machine does not
    have is a usage error said in one sentence (uvicorn would log it and exit 3, our not-found code)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        return socket.create_server(infos[0][4][:2], family=infos[0][0])
    except OSError as exc:
        reason = os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else (exc.strerror or str(exc))
        raise BadInput(f"cannot listen on {host} port {port}: {reason}; choose another --host or --port.") from None


# -- entry point ---------------------------------------------------------------------------------


def _sentence(message: str) -> str:
    message = " ".join(message.split())
    return message if message.endswith((".", "?", "!")) else message + "."


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map every failure to one sentence on stderr and the contract's exit code."""
    try:
        result = cli.main(args=argv, prog_name="media-retention", standalone_mode=False)
        return result if isinstance(result, int) else EXIT_OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        echo("media-retention: aborted; nothing was changed.", err=True)
        return EXIT_FAILURE
    except click.UsageError as exc:
        command = exc.ctx.command_path.replace("media-retention", "", 1).strip() if exc.ctx else ""
        hint = f" (see `media-retention {command + ' ' if command else ''}--help`)"
        echo(f"media-retention: {_sentence(exc.format_message())}{hint}", err=True)
        return EXIT_BAD_INPUT
    except click.ClickException as exc:
        echo(f"media-retention: {_sentence(exc.format_message())}", err=True)
        return EXIT_BAD_INPUT
    except RetentionError as exc:
        echo(f"media-retention: {_sentence(str(exc))}", err=True)
        return exc.exit_code
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
        echo(f"media-retention: database error: {_sentence(detail[0])}", err=True)
        return EXIT_FAILURE
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        echo(f"media-retention: {_sentence((exc.strerror or str(exc) or type(exc).__name__) + where)}", err=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        echo("media-retention: interrupted.", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - no traceback ever reaches an operator; it goes to the debug log
        log.debug("cli.unexpected_error", error_type=type(exc).__name__, exc_info=True)
        echo(f"media-retention: unexpected error ({type(exc).__name__}); nothing was reported as done. "
             f"Run with MEDIA_RETENTION_LOG_LEVEL=DEBUG to log the traceback.", err=True)
        return EXIT_FAILURE


def entry_point() -> None:
    sys.exit(main())
