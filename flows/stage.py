"""Run one stage of a flow over every pending item: claim, compute in chunks, write, repeat.

Shared by the generate, label and eval flows. The caller supplies plain functions:
`done(session, keys)` says which outputs exist, `compute(items)` calls the engine for one
chunk (returning a result or an Exception per item), `write(session, pairs)` stores results.
Everything a chunk produced, plus the release of its claims and what its engine calls cost (the
ledger, store/ledger.py), is one transaction. While a chunk computes, a background thread renews
its claims every lease_s/3, so a chunk slower than its lease is not taken over (and computed
twice) by another worker.

What a model stage may spend is the runner's too: `dry_run` estimates the requests and tokens of
the pending items (`Stage.estimate`) and sends nothing; `budget` stops the stage cleanly before a
chunk that would pass the run's limit (the rows stored so far stay; a rerun resumes). An item a
remote endpoint still failed after its retries (`retry_later`) is a failure row that this run
does not ask for again (a rerun does), and never counts towards quarantine.
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
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlmodel import Session

from cai.errors import UserError
from engines.base import Meter, metered
from flows.common import run_logger
from store import ledger, work
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
    deferred: int = 0  # items an endpoint failed after its retries: failure rows a rerun asks for again
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.engine_s if self.engine_s else 0.0


CHARS_PER_TOKEN = 4  # a rough figure for English text; estimates only (dry runs, budget look-ahead)


@dataclass(frozen=True)
class Estimate:
    """What computing one item would send: requests and rough prompt and completion tokens."""

    requests: int = 1
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def chat_estimate(conversation: Sequence[dict], max_new_tokens: int, n: int = 1, requests: int = 1) -> Estimate:
    """One chat request: its messages at ~4 characters a token (plus a few per message for the
    template), at most `max_new_tokens` x `n` new tokens."""
    chars = sum(len(m.get("content", "")) for m in conversation)
    return Estimate(requests, requests * (chars // CHARS_PER_TOKEN + 8 * len(conversation)), max_new_tokens * n)


def placeholder(key: str, max_new_tokens: int) -> SimpleNamespace:
    """A stand-in (`.id`, `.text`) for a row a dry run has not made: as long as `max_new_tokens`
    allows, so the items built on it estimate what they would send. Never stored."""
    return SimpleNamespace(id=f"dry-run:{key}", text="x" * (max_new_tokens * CHARS_PER_TOKEN))


def choice_estimate(conversation: Sequence[dict], choices: int = 2) -> Estimate:
    """One choice scoring: at most one request per choice (prompt log-probs), one token each."""
    return chat_estimate(conversation, 1, n=1, requests=choices)


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


class _Spending:
    """The run's spend as the budget sees it: the ledger before this stage plus this stage's chunks."""

    def __init__(self, budget: str | None, prices: dict, run_id: str | None, url: str | None, stage: str) -> None:
        self.budget = ledger.parse_budget(budget) if budget else None
        self.prices, self.stage = prices or {}, stage
        self.meter = Meter()  # this stage's usage, chunk by chunk
        self.scale = 1.0  # what this stage's chunks really used over what was estimated for them (>= 1)
        self._est = self._got = 0
        self.before = ledger.Spent()
        if self.budget and self.budget.unit == "usd" and not self.prices:
            raise UserError(f"--budget {budget}: a budget in dollars needs a price table (runner.prices: model -> "
                            "{input, output} $ per million tokens); or give the budget in tokens")
        if self.budget and run_id:
            with session_scope(url) as s:
                self.before = ledger.spent(s, run_id)

    def add(self, meter: Meter, estimated: int = 0) -> None:
        """One chunk's usage; with its estimate (tokens), later estimates are scaled to what chunks really use."""
        if estimated:
            self._est += estimated
            self._got += meter.total.prompt_tokens + meter.total.completion_tokens
            self.scale = max(1.0, self._got / self._est)
        for (endpoint, model), u in meter.rows.items():
            self.meter.add(endpoint, model, requests=u.requests, prompt_tokens=u.prompt_tokens,
                           completion_tokens=u.completion_tokens, retries=u.retries, failures=u.failures)

    def used(self) -> float:
        b = self.budget
        assert b is not None
        if b.unit == "tokens":
            return self.before.tokens + self.meter.total.prompt_tokens + self.meter.total.completion_tokens
        unpriced = set(self.before.unpriced)
        total = self.before.usd
        for (endpoint, model), u in self.meter.rows.items():
            c = ledger.cost(self.prices, model, u.prompt_tokens, u.completion_tokens)
            if c is None and (u.prompt_tokens or u.completion_tokens) and not ledger.is_local(endpoint):
                unpriced.add(model)
            total += c or 0.0
        if unpriced:
            raise UserError(f"--budget {b}: no price for model(s) {', '.join(sorted(unpriced))} in runner.prices; "
                            "add them (or '*'), or give the budget in tokens")
        return total

    def cost_of(self, est: Estimate) -> float:
        """An estimate in the budget's unit; dollars at the dearest price the run has met (or the table's)."""
        assert self.budget is not None
        if self.budget.unit == "tokens":
            return est.tokens * self.scale
        models = [m for _, m in self.meter.rows] or list(self.prices)
        return self.scale * max((ledger.cost(self.prices, m, est.prompt_tokens, est.completion_tokens) or 0.0)
                                for m in models)

    def fit(self, chunk: list[T], estimate: Callable[[T], Estimate] | None) -> tuple[list[T], str | None]:
        """The start of `chunk` that fits what is left of the budget, and why the stage stops, if it does."""
        if self.budget is None:
            return chunk, None
        used, limit = self.used(), self.budget.amount
        if used >= limit:
            return [], f"budget {self.budget} reached ({self._show(used)} used)"
        if estimate is None:
            return chunk, None
        left, take = limit - used, 0
        for item in chunk:
            left -= self.cost_of(estimate(item))
            if left < 0:
                break
            take += 1
        if take == 0:
            return [], (f"budget {self.budget}: {self._show(used)} used, and the next item needs about "
                        f"{self._show(self.cost_of(estimate(chunk[0])))} more")
        return chunk[:take], None

    def _show(self, amount: float) -> str:
        assert self.budget is not None
        return f"${amount:.4f}" if self.budget.unit == "usd" else f"{amount:,.0f} tokens"


def _plan(stage: Stage[T, R], pending: list[T], prices: dict) -> dict[str, Any]:
    """A dry run's figures for the pending items: requests, rough tokens, cost where prices allow."""
    ests = [stage.estimate(i) for i in pending] if stage.estimate else []
    plan = {"pending": len(pending), "requests": sum(e.requests for e in ests),
            "prompt_tokens": sum(e.prompt_tokens for e in ests),
            "completion_tokens": sum(e.completion_tokens for e in ests), "model_calls": stage.estimate is not None}
    if prices:
        costs = [ledger.cost(prices, m, plan["prompt_tokens"], plan["completion_tokens"]) for m in prices]
        plan["cost_usd_at_most"] = max((c for c in costs if c is not None), default=None)
    return plan


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
        stats.extra["dry_run"] = _plan(stage, pending, prices)
        logger.info("%s (dry run): %d of %d items pending; would send %d requests, ~%d prompt and ~%d completion "
                    "tokens", stage.name, len(pending), len(keys), stats.extra["dry_run"]["requests"],
                    stats.extra["dry_run"]["prompt_tokens"], stats.extra["dry_run"]["completion_tokens"])
        stats.total_s = time.perf_counter() - t_start
        return stats
    spending = _Spending(budget, prices, run_id, url, stage.name) if stage.estimate or budget else None
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
                    with _renewing(stage.name, mine, worker, lease_s, url, logger), metered() as meter:
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


def stage_summary(s: StageStats) -> dict[str, Any]:
    """One stage's figures as stored in a Run summary."""
    out = {"items": s.items, "done_before": s.done_before, "computed": s.computed, "failed": s.failed,
           "quarantined": s.quarantined, "by_others": s.by_others, "tokens": s.tokens,
           "engine_s": round(s.engine_s, 3), "total_s": round(s.total_s, 3)}
    if s.deferred:
        out["deferred"] = s.deferred
    for k in ("dry_run", "budget_stopped", "spend"):
        if k in s.extra:
            out[k] = s.extra[k]
    return out


def stage_totals(stages: Sequence[StageStats]) -> dict[str, Any]:
    """Per-stage figures and their sums: the part of a Run summary every stage flow shares."""
    out = {"stages": {s.stage: stage_summary(s) for s in stages},
           "computed": sum(s.computed for s in stages), "failed": sum(s.failed for s in stages),
           "tokens": sum(s.tokens for s in stages), "engine_s": round(sum(s.engine_s for s in stages), 3)}
    if any("dry_run" in s.extra for s in stages):
        out["dry_run"] = True
    if stopped := [s.extra["budget_stopped"] for s in stages if "budget_stopped" in s.extra]:
        out["budget_stopped"] = stopped[0]
    return out
