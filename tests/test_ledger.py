"""The spend ledger (store/ledger.py): budgets as people write them, costs, per-run totals."""

from __future__ import annotations

import pytest

from engines.base import Meter
from store import ledger
from store.db import session_scope


@pytest.mark.parametrize("text,amount,unit", [("200000", 200_000, "tokens"), ("200k", 200_000, "tokens"),
                                              ("1.5M", 1_500_000, "tokens"), ("50k tokens", 50_000, "tokens"),
                                              ("$5", 5.0, "usd"), ("5usd", 5.0, "usd"), ("0.25 USD", 0.25, "usd"),
                                              ("$ 2.50", 2.5, "usd"), ("1,000", 1000, "tokens")])
def test_budgets_as_people_write_them(text, amount, unit):
    b = ledger.parse_budget(text)
    assert (b.amount, b.unit) == (amount, unit)


@pytest.mark.parametrize("text", ["", "lots", "-5", "$0", "5 euros", "0"])
def test_a_budget_that_is_not_one_says_what_was_expected(text):
    with pytest.raises(ValueError, match="expected tokens"):
        ledger.parse_budget(text)


def test_costs_from_the_price_table():
    prices = {"big": {"input": 3.0, "output": 15.0}, "*": {"input": 0.1, "output": 0.2}}
    assert ledger.cost(prices, "big", 1_000_000, 100_000) == pytest.approx(4.5)
    assert ledger.cost(prices, "other", 1_000_000, 1_000_000) == pytest.approx(0.3)
    assert ledger.cost({"big": {"input": 1, "output": 1}}, "other", 10, 10) is None


def test_chunks_add_up_per_run_stage_endpoint_and_model(db_url):
    m = Meter()
    m.add("http://h/v1", "judge", requests=2, prompt_tokens=100, completion_tokens=4, retries=1)
    m.add("local:hf", "policy", requests=3, prompt_tokens=30, completion_tokens=60)
    m.add("http://other/v1", "unpriced", requests=1, prompt_tokens=1, completion_tokens=1)
    prices = {"judge": {"input": 10.0, "output": 20.0}}
    with session_scope(db_url) as s:
        for _ in range(2):
            ledger.add(s, "run1", "label.judge", m.rows, prices)
        ledger.add(s, "run2", "label.judge", m.rows, prices)
    with session_scope(db_url) as s:
        spent = ledger.spent(s, "run1")
        totals = ledger.per_run(s, ["run1", "run2", "none"])
    assert spent.tokens == 2 * (104 + 90 + 2)
    assert spent.unpriced == ("unpriced",)  # the local engine is free unless priced; a remote one is not
    assert spent.usd == pytest.approx(2 * (100 * 10 + 4 * 20) / 1e6)
    r1 = totals["run1"]
    assert r1["requests"] == 12 and r1["retries"] == 2 and set(totals) == {"run1", "run2"}
    assert r1["by_model"]["judge @ http://h/v1"]["prompt_tokens"] == 200
    assert r1["by_model"]["policy @ local:hf"]["cost_usd"] is None
    assert spent.over(ledger.Budget(300, "tokens")) and not spent.over(ledger.Budget(1.0, "usd"))
