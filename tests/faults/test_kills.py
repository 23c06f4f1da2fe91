"""SIGKILL at random moments of a sweep, of `register --manifest` and of reconcile; then one clean run,
`verify` finds nothing and the test's own record agrees."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import pytest

from worker.store.keys import key_for_id

from tests.faults.conftest import KILLS, kill_after_work_starts, measure_work, record, seed
from worker.models import State

pytestmark = pytest.mark.slow


def kill_delay(rng, work: float) -> float:
    """A kill time spread over the command's measured work, from its first visible step on. The window
    stops short of the measured end: a later run often finishes sooner than the measuring one, and a run
    that exits before its kill is wasted (up to 1.05 x, half the runs of a suite finished first)."""
    return rng.uniform(0, work * 0.8)


def rows_in(world, state: str) -> int:
    from sqlalchemy import func, select

    from worker.models import MediaItem

    with world.db.transaction() as session:
        return session.scalar(select(func.count()).where(MediaItem.state == state))



def kill_sweeps(world, rng, seed_round: Callable[[int], None], after_kill: Callable[[dict, dict], str]) -> tuple[int, int, Counter]:
    """SIGKILL `sweep` at random moments until KILLS runs were killed: before each run `seed_round(attempt)` adds
    fresh expired work; after each kill `after_kill(before, after)` (the item states around the run) checks what
    it must and names the phase the kill landed in. Returns (kills, attempts, phases)."""
    deleted_so_far = [0]

    def claimed_something() -> bool:
        return rows_in(world, State.DELETED.value) + rows_in(world, State.DELETING.value) > deleted_so_far[0]

    work = measure_work(world, claimed_something, "sweep", "--json")
    phases: Counter = Counter()
    kills = attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < KILLS * 4, f"only {kills} of {attempts} runs were killed before they finished (seed {seed()})"
        seed_round(attempts)
        before = world.states()
        deleted_so_far[0] = sum(1 for s in before.values() if s != State.ACTIVE.value)
        if not kill_after_work_starts(world.start("sweep", "--json"), claimed_something, kill_delay(rng, work)):
            phases["finished first"] += 1
            continue
        kills += 1
        phases[after_kill(before, world.states())] += 1
    return kills, attempts, phases


def blobs_gone_under_active_rows(world, after: dict) -> set[str]:
    """Items whose row is still `active` but whose blob (or a variant's) is gone: a one-transaction batch killed
    during or after its store call, before its commit. Only doomed items (expired, unheld: 404 already) may be
    in that state; the test asserts it."""
    variants = world.record.variants
    gone = {m for m, state in after.items() if state == State.ACTIVE.value and m in world.record.keys
            and any(not world.exists(key) for key in (world.record.keys[m], *variants.get(m, ())))}
    assert gone <= world.record.doomed, f"blobs of kept items gone: {sorted(gone - world.record.doomed)[:5]} (seed {seed()})"
    return gone


@pytest.mark.critical_path(seconds=20)
def test_a_sweep_killed_at_random_moments_loses_nothing_and_deletes_nothing_early(world_factory, rng):
    """≥ KILLS SIGKILLs of `sweep` (one item a batch, so kills land in every step of a batch's one transaction:
    the pick with its row locks, the store's deletes under them, the tombstone, the commit), each on fresh expired
    work among unexpired and held items; after each kill only doomed items miss a blob; then one clean sweep
    deletes exactly the rest, without waiting for any lease (the killed batches committed nothing)."""
    world = world_factory(sweep_batch_size="1", claim_lease="1h")
    world.seed("base", expired=40, unexpired=150, held=60)

    def phase(before: dict, after: dict) -> str:
        changed = {m for m, s in after.items() if before.get(m) != s}
        claimed = {m for m in changed if after[m] == State.DELETING.value}
        if blobs_gone_under_active_rows(world, after):
            return "store deleted, commit not reached (rows active, 404)"
        if any(not (world.media / world.record.keys[m]).exists() for m in claimed):
            return "between delete and finalize (two-phase)"
        return "between claim and delete (two-phase)" if claimed else "before the store or between batches"

    kills, attempts, phases = kill_sweeps(world, rng, lambda n: world.seed(f"r{n}", expired=40), phase)
    assert not rows_in(world, State.DELETING.value), "a one-transaction sweep left a claim behind"
    clean = world.ok("sweep")
    assert clean["failed"] == 0
    lost, early = world.check_record()
    world.verify_clean()
    print(f"sweep kills: {kills} of {attempts} runs, phases {dict(phases)} (seed {seed()})")
    record("SIGKILL of `sweep`", "SIGKILL at a random moment of the measured run, 1 item a batch", kills, lost, early,
           "clean sweep (no lease to wait for), verify clean", phases=dict(phases), items=len(world.record.keys))


@pytest.mark.critical_path(seconds=20)
def test_a_purge_killed_at_random_moments_commits_its_claim_before_any_blob_goes(world_factory, rng):
    """≥ KILLS SIGKILLs of `purge ID... --yes` over unexpired items (one item a batch): a purge deletes media that
    has not expired, so its claim commits first: after every kill no purged item's blob is gone under an
    `active` row, and nothing but the purged items changed; a clean sweep (after the leases) finishes the claims
    a kill left, a re-run purges the rest, and verify is clean."""
    world = world_factory(sweep_batch_size="1", claim_lease="1h")
    world.seed("base", expired=20, unexpired=100, held=30)
    targets: list[str] = []

    def round_of(n: int) -> list[str]:
        world.seed(f"p{n}", unexpired=20)
        ids = [m for m in world.record.keys if m.startswith(f"p{n}-u-")]
        targets.extend(ids)
        return ids

    def taken(ids):
        return lambda: any(state != State.ACTIVE.value for m, state in world.states().items() if m in ids)

    ids = round_of(0)
    work = measure_work(world, taken(set(ids)), "purge", *ids, "--yes", "--json")
    phases: Counter = Counter()
    kills = attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < KILLS * 4, f"only {kills} of {attempts} runs were killed before they finished (seed {seed()})"
        ids = round_of(attempts)
        before = world.states()
        if not kill_after_work_starts(world.start("purge", *ids, "--yes", "--json"), taken(set(ids)), kill_delay(rng, work)):
            phases["finished first"] += 1
            continue
        kills += 1
        after = world.states()
        changed = {m for m, state in after.items() if before.get(m) != state}
        assert changed <= set(ids), f"a purge changed items it was not given: {sorted(changed - set(ids))[:5]} (seed {seed()})"
        early = [m for m in ids if after[m] == State.ACTIVE.value and not world.exists(world.record.keys[m])]
        assert not early, f"a purge deleted blobs before its claim committed: {early[:5]} (seed {seed()})"
        claimed = [m for m in ids if after[m] == State.DELETING.value]
        phases["blob deleted, claim not finalized" if any(not world.exists(world.record.keys[m]) for m in claimed)
               else "claimed, blob still there" if claimed else "between items"] += 1
    world.end_leases()
    world.ok("sweep")
    rest = [m for m, state in world.states().items() if m in set(targets) and state == State.ACTIVE.value]
    if rest:
        world.ok("purge", *rest, "--yes")
    states = world.states()
    lost = [m for m in targets if states[m] != State.DELETED.value or world.exists(world.record.keys[m])]
    assert not lost, f"purged items not cleanly deleted: {lost[:10]} (seed {seed()})"
    for media_id in targets:  # purged by the operator: out of the record of what must stay
        world.record.keys.pop(media_id)
    lost_count, early_count = world.check_record()
    world.verify_clean()
    print(f"purge kills: {kills} of {attempts} runs, phases {dict(phases)} (seed {seed()})")
    record("SIGKILL of `purge`", "SIGKILL at a random moment of `purge ID... --yes`, 1 item a batch", kills, lost_count,
           early_count, "clean sweep after the leases + re-run purge, verify clean", phases=dict(phases),
           items=len(targets))


@pytest.mark.critical_path(seconds=20)
def test_a_sweep_killed_at_random_moments_deletes_variants_only_with_their_item_and_leaves_none(world_factory, rng):
    """≥ KILLS SIGKILLs of `sweep` over items that each own two variants (one item a batch): after every kill no
    variant of a kept item is gone and no tombstone has a variant left (the tombstone comes after all its blobs);
    after a clean sweep every doomed item's blob and variants are gone, every kept one's are there."""
    world = world_factory(sweep_batch_size="1", claim_lease="1h")
    world.seed("base", expired=20, unexpired=60, held=20, variants=2)

    def checked(_before: dict, after: dict) -> str:
        variants = world.record.variants
        kept_lost = [m for m in world.record.kept if not all(world.exists(key) for key in variants.get(m, ()))]
        assert not kept_lost, f"variants of kept items deleted: {kept_lost[:5]} (seed {seed()})"
        leaky = [m for m, state in after.items() if state == State.DELETED.value and any(world.exists(key) for key in variants.get(m, ()))]
        assert not leaky, f"tombstones written with variants left: {leaky[:5]} (seed {seed()})"
        partly = [m for m, state in after.items() if state == State.DELETING.value
                  and any(not world.exists(key) for key in (world.record.keys[m], *variants.get(m, ())))]
        if blobs_gone_under_active_rows(world, after):
            return "some blobs deleted, commit not reached (row active, 404)"
        return "some blobs of a claimed item deleted" if partly else "no blob of an uncommitted batch deleted"

    kills, attempts, phases = kill_sweeps(world, rng, lambda n: world.seed(f"r{n}", expired=30, variants=2), checked)
    world.end_leases()
    assert world.ok("sweep")["failed"] == 0
    lost, early = world.check_record()
    world.verify_clean()
    print(f"sweep kills (variants): {kills} of {attempts} runs, phases {dict(phases)} (seed {seed()})")
    record("SIGKILL of `sweep`, items with variants", "SIGKILL at a random moment, 1 item a batch, 2 variants each", kills,
           lost, early, "clean sweep, variants gone with their items, verify clean", phases=dict(phases),
           items=len(world.record.keys), variants=sum(len(keys) for keys in world.record.variants.values()))


@pytest.mark.critical_path(seconds=45)
def test_register_manifest_killed_at_random_moments_is_completed_by_a_re_run(world_factory, rng, tmp_path):
    """≥ KILLS SIGKILLs of `register --manifest` (files copied in, then rows inserted); the re-run of each
    killed manifest succeeds and imports the rest, nothing is imported twice, verify finds nothing."""
    world = world_factory()
    world.seed("base", expired=20, unexpired=100, held=20)
    source = tmp_path / "incoming"
    source.mkdir()

    def manifest(name: str, lines: int):
        rows = []
        for n in range(lines):
            media_id = f"{name}-{n:04d}"
            (source / media_id).write_bytes(f"{media_id}\n".encode() * 20)
            # Half expire at once (created 40 days ago), half are young; none held.
            created = "2020-01-01T00:00:00Z" if n % 2 else None
            rows.append({"org": "acme", "id": media_id, "file": str(source / media_id), "mime": "image/jpeg",
                         **({"created_at": created} if created else {})})
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path, [row["id"] for row in rows]

    def copying(ids):
        first = world.media / key_for_id(ids[0])
        return first.exists

    path, ids = manifest("measure", 60)
    work = measure_work(world, copying(ids), "register", "--manifest", str(path), "--files-root", str(source), "--json")
    phases: Counter = Counter()
    all_ids = list(ids)
    kills = attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < KILLS * 4, f"only {kills} of {attempts} runs were killed before they finished (seed {seed()})"
        path, ids = manifest(f"m{attempts}", 60)
        all_ids += ids
        if not kill_after_work_starts(world.start("register", "--manifest", str(path), "--files-root", str(source), "--json"), copying(ids), kill_delay(rng, work)):
            phases["finished first"] += 1
            continue
        kills += 1
        states = world.states()
        imported = sum(1 for m in ids if m in states)
        copied = sum(1 for m in ids if any(world.media.glob(f"*/*/{m}")))
        phases["rows committed" if imported else "blobs copied, no row" if copied else "before any blob"] += 1
        rerun = world.ok("register", "--manifest", str(path), "--files-root", str(source))
        assert rerun["imported"] + rerun["already_registered"] == len(ids), rerun
        assert rerun["already_registered"] == imported, rerun
    states = world.states()
    assert not [m for m in all_ids if m not in states], "a re-run left lines unimported"
    # A copy killed mid-write cannot clean up after itself; its `.incoming-*` temp file is a partial
    # upload that reconcile removes once older than the grace (1 s here), and never a registered blob.
    partial = len(list(world.media.rglob(".incoming-*")))
    time.sleep(1.1)  # the smallest grace reconcile takes is 1 s
    world.ok("reconcile", "--grace", "1s")
    assert not list(world.media.rglob(".incoming-*")), "reconcile left a killed copy's temp file behind"
    # The record: every imported item, by its expiry (the catalog computed it; the test only knows
    # which lines were created long ago).
    for m in all_ids:
        world.record.keys[m] = next(world.media.glob(f"*/*/{m}")).relative_to(world.media).as_posix()
        if int(m.rsplit("-", 1)[1]) % 2:
            world.record.expired.add(m)
    world.ok("sweep")
    lost, early = world.check_record()
    world.verify_clean()
    print(f"register --manifest kills: {kills} of {attempts} runs, phases {dict(phases)} (seed {seed()})")
    record("SIGKILL of `register --manifest`", "SIGKILL at a random moment, then the same manifest re-run", kills, lost, early,
           "re-run imports the rest, clean sweep, verify clean", phases=dict(phases), items=len(world.record.keys),
           partial_uploads_reconciled=partial)


@pytest.mark.critical_path(seconds=30)
def test_reconcile_killed_at_random_moments_deletes_only_orphans(world_factory, rng):
    """≥ KILLS SIGKILLs of `reconcile --grace 1s` over orphans among live, held and expired items; a clean
    reconcile then removes every orphan, no registered blob is touched, and a sweep + verify are clean."""
    world = world_factory()
    world.seed("base", expired=60, unexpired=160, held=60)
    measured = world.orphans("measure", 40)
    time.sleep(1.1)  # orphans older than the smallest grace (1 s), so this reconcile must delete them
    measure_work(world, lambda: not measured[0].exists() or not measured[-1].exists(), "reconcile", "--grace", "1s", "--json")
    assert not any(p.exists() for p in measured)
    # Reconcile lists and checks before it deletes; its whole run is the window.
    reconcile_run = measure_work(world, lambda: True, "reconcile", "--grace", "1s", "--json")
    outcomes: Counter = Counter()
    orphans = []
    kills = attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < KILLS * 4, f"only {kills} of {attempts} runs were killed before they finished (seed {seed()})"
        batch = world.orphans(f"r{attempts}", 40)
        orphans += batch
        time.sleep(1.1)
        launched = time.monotonic()
        if not kill_after_work_starts(world.start("reconcile", "--grace", "1s", "--json"), lambda: True, rng.uniform(0.5, 0.9) * reconcile_run):
            # Measured once, the run can be far too long: this test starts first in a parallel run, while
            # the machine is busiest. A run that beat its kill is a newer measurement (an upper bound).
            reconcile_run = min(reconcile_run, time.monotonic() - launched)
            outcomes["finished first"] += 1
            continue
        kills += 1
        left = sum(1 for p in batch if p.exists())
        outcomes["no orphan deleted yet" if left == len(batch) else "all orphans deleted" if not left else "some orphans deleted"] += 1
        assert world.states() == {m: world.states()[m] for m in world.record.keys}  # no row appears or vanishes
        assert all((world.media / world.record.keys[m]).exists() for m in world.record.keys), "reconcile deleted a registered blob"
    world.ok("reconcile", "--grace", "1s")
    assert not [p for p in orphans if p.exists()], "orphans survived a clean reconcile"
    world.ok("sweep")
    lost, early = world.check_record()
    world.verify_clean()
    print(f"reconcile kills: {kills} of {attempts} runs, outcomes {dict(outcomes)} (seed {seed()})")
    record("SIGKILL of `reconcile`", "SIGKILL at a random moment, orphans among live/held/expired items", kills, lost, early,
           "clean reconcile (grace 1 s) + sweep, verify clean", outcomes=dict(outcomes), items=len(world.record.keys))
