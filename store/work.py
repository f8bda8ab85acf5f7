"""Claiming work and recording failures, so several workers share one store safely.

The scheme (works the same on SQLite and PostgreSQL):
- A worker computes the items of a stage that have no output row yet, then claims a batch
  of them by inserting `claim` rows (`INSERT ... ON CONFLICT DO NOTHING`): a key already
  claimed by someone else is not inserted, so exactly one worker holds each item.
- A claim is a lease. It is taken over when it has expired, or when its worker ran on this
  host and that process is gone (a SIGKILLed `cai generate` does not block its own rerun).
  A worker renews its leases while it computes (`renew`, every lease/3 from a background thread
  while a chunk computes: `renewing`), so a slow chunk is never taken over.
- The outputs of a batch and the deletion of its claims are committed in one transaction,
  so an item is either done (its row exists) or still pending; never half-written.
- Each run counts what it claimed, wrote and failed per stage in `work_progress`, with its
  worker and host (`tally`); the counts of a batch commit with its outputs, so `cai status`
  shows per-worker progress that agrees with the rows.
- A failing item gets a `failure` row (error, attempts); after MAX_ATTEMPTS it is quarantined:
  skipped by later runs and reported by `cai status`, never silently dropped. A transient
  failure (a remote endpoint that still failed after its retries) is counted but never
  quarantines: the item is not at fault, and the next run asks for it again. `release_quarantine`
  (`cai db release-quarantine`) forgets quarantines, so the next run tries those items afresh.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlmodel import Session, select

from store.db import session_scope
from store.models import MAX_ATTEMPTS, Claim, Failure, WorkProgress, utcnow
from store.upsert import insert_ignore


def dead_local(worker: str) -> bool:
    """True if `worker` ("host:pid[:...]") ran on this host and its process no longer exists."""
    host, _, rest = worker.partition(":")
    if host != socket.gethostname():
        return False
    try:
        pid = int(rest.split(":", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def quarantined(session: Session, stage: str) -> set[str]:
    rows = session.exec(select(Failure.item_key).where(Failure.stage == stage, Failure.quarantined == True))  # noqa: E712
    return set(rows)


def claim(session: Session, stage: str, keys: list[str], worker: str, lease_s: float = 900,
          done: Callable[[list[str]], Collection[str]] | None = None) -> list[str]:
    """Claim as many of `keys` as nobody else holds; returns the ones this worker now holds.

    `done(keys)` names the keys whose output is already stored (another worker may have finished
    them since the caller looked): those are left unclaimed in the same transaction, so a worker
    that dies right after claiming never leaves a claim on finished work that nobody would release.
    Commits once, so other workers see the claims at once.
    """
    if not keys:
        return []
    now = utcnow()
    expires = now + timedelta(seconds=lease_s)
    insert_ignore(session, Claim, [Claim(stage=stage, item_key=k, worker=worker, expires_at=expires) for k in keys])
    held = session.exec(select(Claim).where(Claim.stage == stage, Claim.item_key.in_(keys))).all()
    stale = [c.item_key for c in held if c.worker != worker and (c.expires_at <= now or dead_local(c.worker))]
    if stale:
        # the WHERE re-checks the lease, so two workers cannot both take over one stale claim
        session.exec(update(Claim).where(Claim.stage == stage, Claim.item_key.in_(stale),
                                         Claim.worker.in_({c.worker for c in held if c.item_key in stale}))
                     .values(worker=worker, expires_at=expires))
        held = session.exec(select(Claim).where(Claim.stage == stage, Claim.item_key.in_(keys))
                            .execution_options(populate_existing=True)).all()
    mine = {c.item_key for c in held if c.worker == worker}
    finished = set(done([k for k in keys if k in mine])) if done is not None and mine else set()
    if finished:
        release(session, stage, finished, worker)
    session.commit()
    return [k for k in keys if k in mine and k not in finished]


def renew(session: Session, stage: str, keys: Iterable[str], worker: str, lease_s: float = 900) -> int:
    """Extend this worker's claims on `keys` by a fresh lease; returns how many it still holds.

    A chunk that computes longer than the lease would otherwise be taken over and done twice.
    Commits, so other workers see the new expiry at once.
    """
    keys = list(keys)
    if not keys:
        return 0
    result = session.exec(update(Claim).where(Claim.stage == stage, Claim.item_key.in_(keys), Claim.worker == worker)
                          .values(expires_at=utcnow() + timedelta(seconds=lease_s)))
    session.commit()
    return result.rowcount


@contextmanager
def renewing(stage: str, keys: list[str], worker: str, lease_s: float, url: str | None, logger: Any) -> Iterator[None]:
    """Keep this worker's claims on `keys` alive while the block runs (one renewal every lease_s/3)."""
    stop = threading.Event()

    def renew_loop() -> None:
        while not stop.wait(max(lease_s / 3, 0.05)):
            try:
                with session_scope(url) as s:
                    held = renew(s, stage, keys, worker, lease_s)
            except Exception as exc:  # noqa: BLE001 - the next renewal may succeed; the lease still runs
                logger.warning("%s: could not renew %d claims (%s)", stage, len(keys), exc)
                continue
            if held < len(keys):
                logger.warning("%s: %d of %d claims were taken over by another worker while computing",
                               stage, len(keys) - held, len(keys))

    thread = threading.Thread(target=renew_loop, name=f"renew-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def tally(session: Session, run_id: str, stage: str, worker: str, host: str, *, claimed: int = 0, done: int = 0,
          failed: int = 0) -> None:
    """Add to this run's counts for `stage` (in the caller's transaction)."""
    insert_ignore(session, WorkProgress, [WorkProgress(run_id=run_id, stage=stage, worker=worker, host=host)])
    # an increment in SQL, not read-modify-write: safe whatever else updates the row
    session.exec(update(WorkProgress).where(WorkProgress.run_id == run_id, WorkProgress.stage == stage)
                 .values(claimed=WorkProgress.claimed + claimed, done=WorkProgress.done + done,
                         failed=WorkProgress.failed + failed, updated_at=utcnow()))


def release(session: Session, stage: str, keys: Iterable[str], worker: str) -> None:
    """Drop this worker's claims (in the caller's transaction, with the batch's outputs)."""
    keys = list(keys)
    if keys:
        session.exec(delete(Claim).where(Claim.stage == stage, Claim.item_key.in_(keys), Claim.worker == worker))


def record_failure(session: Session, stage: str, key: str, error: str, run_id: str | None,
                   transient: bool = False) -> int:
    """Count one more failed attempt; quarantine at MAX_ATTEMPTS unless `transient`. Returns the attempt count."""
    row = session.get(Failure, (stage, key))
    if row is None:
        insert_ignore(session, Failure, [Failure(stage=stage, item_key=key, error=error[:4000], attempts=0,
                                                 run_id=run_id)])
        row = session.get(Failure, (stage, key))
    row.attempts += 1
    row.error = error[:4000]
    row.quarantined = row.attempts >= MAX_ATTEMPTS and not transient
    row.run_id = run_id
    row.updated_at = utcnow()
    session.add(row)
    return row.attempts


def clear_failures(session: Session, stage: str, keys: Iterable[str]) -> None:
    """An item that finally succeeded keeps no failure row that would count against it."""
    keys = list(keys)
    if keys:
        session.exec(delete(Failure).where(Failure.stage == stage, Failure.item_key.in_(keys),
                                           Failure.quarantined == False))  # noqa: E712


def release_quarantine(session: Session, stage: str | None = None) -> dict[str, int]:
    """Forget the quarantined failures (of `stage`: a stage name such as `label.judge`, or a flow
    such as `label` for all of its stages), so the next run tries those items again with a fresh
    MAX_ATTEMPTS. Returns stage -> items released; leaves the commit to the caller."""
    q = select(Failure).where(Failure.quarantined == True)  # noqa: E712
    if stage:
        q = q.where((Failure.stage == stage) | Failure.stage.startswith(stage + "."))
    released: dict[str, int] = {}
    for row in session.exec(q).all():
        released[row.stage] = released.get(row.stage, 0) + 1
        session.delete(row)
    return dict(sorted(released.items()))
