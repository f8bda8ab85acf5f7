"""Run one stage of a flow over every pending item: claim, compute in chunks, write, repeat.

Shared by the generate, label and eval flows. The caller supplies plain functions:
`done(session, keys)` says which outputs exist, `compute(items)` calls the engine for one
chunk (returning a result or an Exception per item), `write(session, pairs)` stores results.
Everything a chunk produced, plus the release of its claims and what its engine calls cost (the
ledger, store/ledger.py), is one transaction. While a chunk computes, a background thread renews
its claims every lease_s/3 (store/work.py `renewing`), so a chunk slower than its lease is not
taken over (and computed twice) by another worker.

What a model stage may spend is the runner's too: `dry_run` estimates the requests and tokens of
the pending items (`Stage.estimate`) and sends nothing; `budget` stops the stage cleanly before a
chunk that would pass the run's limit (the rows stored so far stay; a rerun resumes). The
estimates, a dry run's figures and the budget's arithmetic are cai/budget.py. An item a
remote endpoint still failed after its retries (`retry_later`) is a failure row that this run
does not ask for again (a rerun does), and never counts towards quarantine.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlmodel import Session

from cai.budget import Estimate, Spending, dry_run_plan
from cai.errors import UserError
from cai.stage_stats import StageStats
from engines.base import metered
from flows.common import run_logger
from store import ledger, work
from store.db import session_scope

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("cai.stage")


@dataclass
class Stage(Generic[T, R]):
    name: str  # failure/claim namespace, e.g. "generate.critique"
    key: Callable[[T], str]
    done: Callable[[Session, list[str]], set[str]]
    compute: Callable[[list[T]], Sequence[R | Exception]]
    write: Callable[[Session, list[tuple[T, R]]], None]
    tokens: Callable[[R], int] = lambda _r: 0
    size: Callable[[T], int] = lambda _t: 0  # sort key: similar lengths share a batch
    estimate: Callable[[T], Estimate] | None = None  # what one item sends (dry runs, budgets); None: no model


def _compute_one(stage: Stage[T, R], chunk: list[T]) -> Sequence[R | Exception]:
    results = stage.compute(chunk)
    if len(results) != len(chunk):
        raise RuntimeError(f"engine returned {len(results)} results for {len(chunk)} items")
    return results


def _compute_isolating(stage: Stage[T, R], chunk: list[T], logger) -> list[R | Exception]:
    """Compute a chunk; if it raises, retry its items one by one so one bad item cannot sink
    (and eventually quarantine) the rest of its chunk. (A remote engine answers the retry of an
    item whose request already succeeded from memory: nothing is sent twice.) An error marked
    `fatal` (a setting the engine cannot honour) is raised: every item would fail the same way."""
    try:
        return list(_compute_one(stage, chunk))
    except Exception as exc:  # noqa: BLE001 - recorded per item, the flow goes on
        if getattr(exc, "fatal", False):
            raise
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
            if getattr(exc, "fatal", False):
                raise
            out.append(exc)
    return out


def _spending(budget: str | None, prices: dict, run_id: str | None, url: str | None) -> Spending:
    """The budget's view of this run (cai/budget.py), priced by the ledger, with what the run spent before."""
    limit = ledger.parse_budget(budget) if budget else None
    if limit and limit.unit == "usd" and not prices:
        raise UserError(f"--budget {budget}: a budget in dollars needs a price table (runner.prices: model -> "
                        "{input, output} $ per million tokens); or give the budget in tokens")
    before = ledger.Spent()
    if limit and run_id:
        with session_scope(url) as s:
            before = ledger.spent(s, run_id)
    return Spending(limit, prices, before, ledger.cost, ledger.is_local)


def run_stage(stage: Stage[T, R], items: list[T], *, worker: str, run_id: str | None, chunk_size: int,
              lease_s: float, show_progress: bool, url: str | None = None, poll_s: float = 1.0,
              dry_run: bool = False, budget: str | None = None, prices: dict | None = None) -> StageStats:
    """Compute every item of `items` that has no output yet; return what happened.

    chunk_size, lease_s, show_progress, dry_run, budget and prices are a flow config's `runner`
    (flows.configs.RunnerSettings). With a run_id, what this run claims, writes and fails is
    counted in `work_progress` under the Prefect worker that started it (PREFECT__WORKER_NAME,
    set by `prefect worker`) and this host, and what its engine calls cost in the ledger.
    """
    who = {"worker": os.environ.get("PREFECT__WORKER_NAME", ""), "host": socket.gethostname()}
    t_start = time.perf_counter()
    stats = StageStats(stage.name, items=len(items))
    logger = run_logger(log)
    by_key = {stage.key(i): i for i in items}
    keys = list(by_key)
    prices = prices or {}
    if dry_run:
        with session_scope(url) as s:
            done = stage.done(s, keys)
            bad = work.quarantined(s, stage.name)
        pending = [by_key[k] for k in keys if k not in done and k not in bad]
        stats.done_before = len(done)
        stats.extra["dry_run"] = dry_run_plan(len(pending), [stage.estimate(i) for i in pending] if stage.estimate
                                              else None, prices, ledger.cost)
        logger.info("%s (dry run): %d of %d items pending; would send %d requests, ~%d prompt and ~%d completion "
                    "tokens", stage.name, len(pending), len(keys), stats.extra["dry_run"]["requests"],
                    stats.extra["dry_run"]["prompt_tokens"], stats.extra["dry_run"]["completion_tokens"])
        stats.total_s = time.perf_counter() - t_start
        return stats
    spending = _spending(budget, prices, run_id, url) if stage.estimate or budget else None
    deferred: set[str] = set()  # failed at the endpoint after its retries: asked again by the next run only
    stopped: str | None = None
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
            pending = [k for k in keys if k not in done and k not in bad and k not in deferred]
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
                if spending is not None and spending.budget is not None:
                    fitted, stopped = spending.fit([by_key[k] for k in chunk_keys], stage.estimate)
                    chunk_keys = chunk_keys[:len(fitted)]
                    if stopped:
                        break
                with session_scope(url) as s:
                    # another worker may have finished some since we looked: those stay unclaimed
                    mine = work.claim(s, stage.name, chunk_keys, worker, lease_s,
                                      done=lambda ks, s=s: stage.done(s, ks))
                    if mine and run_id:
                        work.tally(s, run_id, stage.name, **who, claimed=len(mine))
                if not mine:
                    continue
                did_any = True
                chunk = [by_key[k] for k in mine]
                t0 = time.perf_counter()
                try:
                    with work.renewing(stage.name, mine, worker, lease_s, url, logger), metered() as meter:
                        results = _compute_isolating(stage, chunk, logger)
                except Exception as exc:
                    if not getattr(exc, "fatal", False):
                        raise
                    with session_scope(url) as s:  # nothing was computed: free the items for the next run
                        work.release(s, stage.name, mine, worker)
                    raise UserError(f"{stage.name}: {exc}") from None
                stats.engine_s += time.perf_counter() - t0
                if spending is not None:
                    spending.add(meter, sum(stage.estimate(i).tokens for i in chunk) if stage.estimate else 0)
                t1 = time.perf_counter()
                good = [(item, r) for item, r in zip(chunk, results, strict=True) if not isinstance(r, Exception)]
                bad_items = [(item, r) for item, r in zip(chunk, results, strict=True) if isinstance(r, Exception)]
                with session_scope(url) as s:
                    stage.write(s, good)
                    for item, exc in bad_items:
                        later = bool(getattr(exc, "retry_later", False))
                        attempts = work.record_failure(s, stage.name, stage.key(item),
                                                       f"{exc.__class__.__name__}: {exc}", run_id, transient=later)
                        stats.failed += 1
                        if later:
                            deferred.add(stage.key(item))
                            stats.deferred += 1
                        elif attempts >= work.MAX_ATTEMPTS:
                            stats.quarantined += 1
                    work.clear_failures(s, stage.name, [stage.key(i) for i, _ in good])
                    work.release(s, stage.name, mine, worker)
                    if run_id:
                        work.tally(s, run_id, stage.name, **who, done=len(good), failed=len(bad_items))
                        ledger.add(s, run_id, stage.name, meter.rows, prices)
                stats.write_s += time.perf_counter() - t1
                stats.computed += len(good)
                stats.tokens += sum(stage.tokens(r) for _, r in good)
                progress.update(bar, advance=len(good),
                                rate=f"{stats.tok_s:,.0f} tok/s" if stats.tokens else "")
                logger.info("%s: wrote %d rows (%d failed) in %.1fs", stage.name, len(good), len(bad_items),
                            time.perf_counter() - t0)
            if stopped:
                stats.extra["budget_stopped"] = stopped
                logger.warning("%s: stopped before sending more: %s; %d items left for a rerun", stage.name, stopped,
                               len(pending) - start)
                break
            if not did_any:
                # everything left is claimed by live workers: wait for them
                time.sleep(poll_s)
    if stats.deferred:
        logger.warning("%s: %d items failed at the endpoint after every retry; stored as failures, a rerun asks "
                       "for them again", stage.name, stats.deferred)
    if spending is not None and spending.meter.rows:
        stats.extra["spend"] = {f"{m} @ {e}": {"requests": u.requests, "prompt_tokens": u.prompt_tokens,
                                               "completion_tokens": u.completion_tokens, "retries": u.retries,
                                               "failures": u.failures}
                                for (e, m), u in spending.meter.rows.items()}
    with session_scope(url) as s:
        stats.by_others = max(0, len(stage.done(s, keys)) - stats.done_before - stats.computed)
    stats.total_s = time.perf_counter() - t_start
    return stats
