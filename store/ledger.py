"""The spend ledger: requests, tokens and cost per run, stage, endpoint and model; budgets.

    cai label --budget 200k ...        # stop the run's model stages after ~200,000 tokens
    cai label --budget '$2.50' --set runner.prices='{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}'

The stage runner measures each chunk's engine calls (engines.base.metered) and adds them here in
the transaction that stores the chunk's outputs (`add`), so the ledger agrees with the rows, and
a killed run keeps the spend of every chunk it stored. Prices are US dollars per million tokens,
by model as rows record it ("*" matches any other model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from store.models import Spend, utcnow
from store.upsert import insert_ignore

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


@dataclass(frozen=True)
class Budget:
    amount: float
    unit: str  # "tokens" | "usd"

    def __str__(self) -> str:
        return f"${self.amount:g}" if self.unit == "usd" else f"{self.amount:,.0f} tokens"


def parse_budget(text: str) -> Budget:
    """'200000', '200k', '1.5M', '200k tokens' -> tokens; '$5', '5usd', '5 USD', '$0.25' -> dollars."""
    t = str(text).strip().lower().replace(",", "").replace("_", "")
    money = re.fullmatch(r"\$\s*([0-9]*\.?[0-9]+)|([0-9]*\.?[0-9]+)\s*(usd|dollars?)", t)
    if money:
        value = float(money.group(1) or money.group(2))
        if value > 0:
            return Budget(value, "usd")
    tokens = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmg]?)\s*(tokens?|tok)?", t)
    if tokens and float(tokens.group(1)) > 0:
        return Budget(float(tokens.group(1)) * _SUFFIX[tokens.group(2)], "tokens")
    raise ValueError(f"budget {text!r}: expected tokens (200000, 200k, 1.5M) or dollars ($5, 5usd), above 0")


def price_of(prices: Mapping[str, Any], model: str) -> tuple[float, float] | None:
    """(input, output) $ per million tokens for `model`, or None when the table has neither it nor '*'."""
    p = prices.get(model, prices.get("*"))
    if p is None:
        return None
    if isinstance(p, Mapping):
        return float(p.get("input", 0.0)), float(p.get("output", 0.0))
    if isinstance(p, list | tuple):
        return float(p[0]), float(p[1])
    return float(p.input), float(p.output)  # a flows.configs.Price


def cost(prices: Mapping[str, Any], model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    p = price_of(prices, model)
    if p is None:
        return None
    return (prompt_tokens * p[0] + completion_tokens * p[1]) / 1e6


def add(session: Session, run_id: str, stage: str, rows: Mapping[tuple[str, str], Any],
        prices: Mapping[str, Any]) -> None:
    """Add one chunk's usage ({(endpoint, model): engines.base.Usage}) in the caller's transaction."""
    for (endpoint, model), u in rows.items():
        if not (u.requests or u.failures or u.prompt_tokens or u.completion_tokens):
            continue
        insert_ignore(session, Spend, [Spend(run_id=run_id, stage=stage, endpoint=endpoint, model=model)])
        c = cost(prices, model, u.prompt_tokens, u.completion_tokens)
        where = (Spend.run_id == run_id, Spend.stage == stage, Spend.endpoint == endpoint, Spend.model == model)
        # increments in SQL: safe whatever else adds to the row
        session.exec(update(Spend).where(*where).values(
            requests=Spend.requests + u.requests, prompt_tokens=Spend.prompt_tokens + u.prompt_tokens,
            completion_tokens=Spend.completion_tokens + u.completion_tokens, retries=Spend.retries + u.retries,
            failures=Spend.failures + u.failures, updated_at=utcnow()))
        if c is not None:
            session.exec(update(Spend).where(*where).values(cost_usd=func.coalesce(Spend.cost_usd, 0.0) + c))


def is_local(endpoint: str) -> bool:
    """An in-process engine (local:hf, local:vllm): free unless the price table names its model."""
    return endpoint.startswith("local:")


@dataclass
class Spent:
    tokens: int = 0
    usd: float = 0.0
    unpriced: tuple[str, ...] = ()  # remote models with tokens but no price

    def over(self, budget: Budget) -> bool:
        return (self.tokens if budget.unit == "tokens" else self.usd) >= budget.amount


def spent(session: Session, run_id: str) -> Spent:
    """What a run has used so far, over all its stages."""
    rows = session.exec(select(Spend).where(Spend.run_id == run_id)).all()
    unpriced = sorted({r.model for r in rows if r.cost_usd is None and (r.prompt_tokens or r.completion_tokens)
                       and not is_local(r.endpoint)})
    return Spent(tokens=sum(r.prompt_tokens + r.completion_tokens for r in rows),
                 usd=sum(r.cost_usd or 0.0 for r in rows), unpriced=tuple(unpriced))


def per_run(session: Session, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """run id -> totals and one entry per endpoint and model (what `cai status` and the report show)."""
    ids = list(run_ids)
    out: dict[str, dict[str, Any]] = {}
    if not ids:
        return out
    rows = session.exec(select(Spend).where(col(Spend.run_id).in_(ids))
                        .order_by(Spend.run_id, Spend.endpoint, Spend.model, Spend.stage)).all()
    for r in rows:
        run = out.setdefault(r.run_id, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "retries": 0,
                                        "failures": 0, "cost_usd": None, "by_model": {}})
        key = f"{r.model} @ {r.endpoint}"
        m = run["by_model"].setdefault(key, {"endpoint": r.endpoint, "model": r.model, "requests": 0,
                                             "prompt_tokens": 0, "completion_tokens": 0, "retries": 0,
                                             "failures": 0, "cost_usd": None})
        for target in (run, m):
            for k in ("requests", "prompt_tokens", "completion_tokens", "retries", "failures"):
                target[k] += getattr(r, k)
            if r.cost_usd is not None:
                target["cost_usd"] = (target["cost_usd"] or 0.0) + r.cost_usd
    return out
