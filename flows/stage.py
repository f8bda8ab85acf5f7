"""Run one stage of a flow over every pending item: claim, compute in chunks, write, repeat.

Shared by the generate, label and eval flows. The caller supplies plain functions:
`done(session, keys)` says which outputs exist, `compute(items)` calls the engine for one
chunk (returning a result or an Exception per item), `write(session, pairs)` stores results.
Everything a chunk produced, plus the release of its claims, is one transaction. While a chunk
computes, a background thread renews its claims every lease_s/3, so a chunk slower than its lease
is not taken over (and computed twice) by another worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlmodel import Session

from flows.common import run_logger
from store import work
from store.db import session_scope

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("cai.stage")


@dataclass
class StageStats:
    stage: str
    items: int = 0  # items this stage needed in total
    done_before: int = 0  # already in the store when the stage started
    computed: int = 0  # computed by this worker now
    failed: int = 0  # failed attempts by this worker
    quarantined: int = 0
    by_others: int = 0  # finished by other workers while this one ran
    engine_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.engine_s if self.engine_s else 0.0


@dataclass
class Stage(Generic[T, R]):
    name: str  # failure/claim namespace, e.g. "generate.critique"
    key: Callable[[T], str]
    done: Callable[[Session, list[str]], set[str]]
    compute: Callable[[list[T]], Sequence[R | Exception]]
    write: Callable[[Session, list[tuple[T, R]]], None]
    tokens: Callable[[R], int] = lambda _r: 0
    size: Callable[[T], int] = lambda _t: 0  # sort key: similar lengths share a batch


def _compute_one(stage: Stage[T, R], chunk: list[T]) -> Sequence[R | Exception]:
    results = stage.compute(chunk)
    if len(results) != len(chunk):
        raise RuntimeError(f"engine returned {len(results)} results for {len(chunk)} items")
    return results


def _compute_isolating(stage: Stage[T, R], chunk: list[T], logger) -> list[R | Exception]:
    """Compute a chunk; if it raises, retry its items one by one so one bad item cannot sink
    (and eventually quarantine) the rest of its chunk."""
    try:
        return list(_compute_one(stage, chunk))
    except Exception as exc:  # noqa: BLE001 - recorded per item, the flow goes on
        logger.warning("%s: chunk of %d failed (%s)%s", stage.name, len(chunk), exc,
                       "; retrying its items one by one" if len(chunk) > 1 else "")
        log.debug("%s", traceback.format_exc())
        if len(chunk) == 1:
            return [exc]
    out: list[R | Exception] = []
    for item in chunk:
        try:
            out.extend(_compute_one(stage, [item]))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out


@contextmanager
def _renewing(stage: str, keys: list[str], worker: str, lease_s: float, url: str | None, logger) -> Iterator[None]:
    """Keep this worker's claims on `keys` alive while the block runs (one renewal every lease_s/3)."""
    stop = threading.Event()

    def renew_loop() -> None:
        while not stop.wait(max(lease_s / 3, 0.05)):
            try:
                with session_scope(url) as s:
                    held = work.renew(s, stage, keys, worker, lease_s)
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


def run_stage(stage: Stage[T, R], items: list[T], *, worker: str, run_id: str | None, chunk_size: int,
              lease_s: float, show_progress: bool, url: str | None = None, poll_s: float = 1.0) -> StageStats:
    """Compute every item of `items` that has no output yet; return what happened.

    chunk_size, lease_s and show_progress are a flow config's `runner` (flows.configs.RunnerSettings).
    With a run_id, what this run claims, writes and fails is counted in `work_progress` under the
    Prefect worker that started it (PREFECT__WORKER_NAME, set by `prefect worker`) and this host.
    """
    who = {"worker": os.environ.get("PREFECT__WORKER_NAME", ""), "host": socket.gethostname()}
    t_start = time.perf_counter()
    stats = StageStats(stage.name, items=len(items))
    logger = run_logger(log)
    by_key = {stage.key(i): i for i in items}
    keys = list(by_key)
    first_pass = True
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
                        disable=not show_progress or not console.is_terminal, transient=False)
    with progress:
        bar = progress.add_task(stage.name, total=len(keys), rate="")
        while True:
            with session_scope(url) as s:
                done = stage.done(s, keys)
                bad = work.quarantined(s, stage.name)
            pending = [k for k in keys if k not in done and k not in bad]
            if first_pass:
                stats.done_before = len(done)
                first_pass = False
            progress.update(bar, completed=len(keys) - len(pending))
            if not pending:
                break
            pending.sort(key=lambda k: stage.size(by_key[k]))
            did_any = False
            for start in range(0, len(pending), chunk_size):
                chunk_keys = pending[start:start + chunk_size]
                with session_scope(url) as s:
                    mine = work.claim(s, stage.name, chunk_keys, worker, lease_s)
                    # another worker may have finished some since we looked
                    finished = stage.done(s, mine)
                    if finished:
                        work.release(s, stage.name, finished, worker)
                    mine = [k for k in mine if k not in finished]
                    if mine and run_id:
                        work.tally(s, run_id, stage.name, **who, claimed=len(mine))
                if not mine:
                    continue
                did_any = True
                chunk = [by_key[k] for k in mine]
                t0 = time.perf_counter()
                with _renewing(stage.name, mine, worker, lease_s, url, logger):
                    results = _compute_isolating(stage, chunk, logger)
                stats.engine_s += time.perf_counter() - t0
                t1 = time.perf_counter()
                good = [(item, r) for item, r in zip(chunk, results, strict=True) if not isinstance(r, Exception)]
                bad_items = [(item, r) for item, r in zip(chunk, results, strict=True) if isinstance(r, Exception)]
                with session_scope(url) as s:
                    stage.write(s, good)
                    for item, exc in bad_items:
                        attempts = work.record_failure(s, stage.name, stage.key(item),
                                                       f"{exc.__class__.__name__}: {exc}", run_id)
                        stats.failed += 1
                        if attempts >= work.MAX_ATTEMPTS:
                            stats.quarantined += 1
                    work.clear_failures(s, stage.name, [stage.key(i) for i, _ in good])
                    work.release(s, stage.name, mine, worker)
                    if run_id:
                        work.tally(s, run_id, stage.name, **who, done=len(good), failed=len(bad_items))
                stats.write_s += time.perf_counter() - t1
                stats.computed += len(good)
                stats.tokens += sum(stage.tokens(r) for _, r in good)
                progress.update(bar, advance=len(good),
                                rate=f"{stats.tok_s:,.0f} tok/s" if stats.tokens else "")
                logger.info("%s: wrote %d rows (%d failed) in %.1fs", stage.name, len(good), len(bad_items),
                            time.perf_counter() - t0)
            if not did_any:
                # everything left is claimed by live workers: wait for them
                time.sleep(poll_s)
    with session_scope(url) as s:
        stats.by_others = max(0, len(stage.done(s, keys)) - stats.done_before - stats.computed)
    stats.total_s = time.perf_counter() - t_start
    return stats


def stage_summary(s: StageStats) -> dict[str, Any]:
    """One stage's figures as stored in a Run summary."""
    return {"items": s.items, "done_before": s.done_before, "computed": s.computed, "failed": s.failed,
            "quarantined": s.quarantined, "by_others": s.by_others, "tokens": s.tokens,
            "engine_s": round(s.engine_s, 3), "total_s": round(s.total_s, 3)}


def stage_totals(stages: Sequence[StageStats]) -> dict[str, Any]:
    """Per-stage figures and their sums: the part of a Run summary every stage flow shares."""
    return {"stages": {s.stage: stage_summary(s) for s in stages},
            "computed": sum(s.computed for s in stages), "failed": sum(s.failed for s in stages),
            "tokens": sum(s.tokens for s in stages), "engine_s": round(sum(s.engine_s for s in stages), 3)}
