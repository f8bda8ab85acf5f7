"""What a model stage would send and may spend: estimates per item, a dry run's figures, the budget's look-ahead.

    cai label --dry-run ...              # dry_run_plan: requests and rough tokens of the pending items
    cai label --budget 200k ...          # Spending.fit: stop before a chunk that would pass the limit

Estimates are rough (~4 characters a token) and only ever decide what to send, never what is
stored. The runner (flows/stage.py) reads what a run spent before (store/ledger.py `spent`) and
passes the ledger's price rule in (`ledger.cost`, `ledger.is_local`): cai/ reads no store module
but its row types and keys, and nothing here sends, stores or reads anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

from cai.errors import UserError
from engines.base import Meter

T = TypeVar("T")
# the ledger's price rule (store/ledger.py `cost`): (prices, model, prompt tokens, completion tokens) -> $, or None
Cost = Callable[[Mapping[str, Any], str, int, int], float | None]

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


def dry_run_plan(pending: int, estimates: Sequence[Estimate] | None, prices: Mapping[str, Any],
                 cost: Cost) -> dict[str, Any]:
    """A dry run's figures for the pending items: requests, rough tokens, cost where prices allow
    (`estimates` None: the stage calls no model)."""
    ests = estimates or []
    plan = {"pending": pending, "requests": sum(e.requests for e in ests),
            "prompt_tokens": sum(e.prompt_tokens for e in ests),
            "completion_tokens": sum(e.completion_tokens for e in ests), "model_calls": estimates is not None}
    if prices:
        costs = [cost(prices, m, plan["prompt_tokens"], plan["completion_tokens"]) for m in prices]
        plan["cost_usd_at_most"] = max((c for c in costs if c is not None), default=None)
    return plan


class Spending:
    """The run's spend as the budget sees it: what the ledger held before this stage (`before`, a
    store.ledger.Spent) plus this stage's chunks. `budget` is a store.ledger.Budget or None; `cost`
    and `local` are the ledger's price rule (an unpriced in-process engine counts as free)."""

    def __init__(self, budget: Any, prices: Mapping[str, Any], before: Any, cost: Cost,
                 local: Callable[[str], bool]) -> None:
        self.budget, self.prices, self.before = budget, prices, before
        self._cost, self._local = cost, local
        self.meter = Meter()  # this stage's usage, chunk by chunk
        self.scale = 1.0  # what this stage's chunks really used over what was estimated for them (>= 1)
        self._est = self._got = 0

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
            c = self._cost(self.prices, model, u.prompt_tokens, u.completion_tokens)
            if c is None and (u.prompt_tokens or u.completion_tokens) and not self._local(endpoint):
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
        return self.scale * max((self._cost(self.prices, m, est.prompt_tokens, est.completion_tokens) or 0.0)
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
