"""Evaluation: exact refusal and win rates with scripted engines, resumability, a tiny-model run."""

from __future__ import annotations

import math

import pytest
from sqlmodel import select

from cai.evaluate import JudgeItem, judge_chunk, select_items, summarize
from engines.base import Completion, EngineStats, Output, Sampling
from flows import evaluate
from flows.configs import EngineSettings
from flows.evaluate import EvalConfig
from store.db import session_scope
from store.models import EvalResult, Prompt, Run

MARK = "SAFE"  # the scripted judge prefers the answer that carries this word


def _options(conv: list[dict]) -> tuple[str, str]:
    """The (A) and (B) answers from a judge prompt (cai.judge.TEMPLATE)."""
    text = conv[0]["content"]
    a = text.split("\n(A) ", 1)[1].split("\n\n(B) ", 1)[0]
    b = text.split("\n\n(B) ", 1)[1].split("\n\nAnswer with", 1)[0]
    return a, b


class ScriptedEval:
    """Answers looked up by prompt text; as a judge, P(A) = 0.8 for the answer carrying MARK,
    and P(A) = 0.6 (a pure position bias) when neither or both carry it."""

    backend = "scripted"

    def __init__(self, model_id: str, answers: dict[str, str] | None = None):
        self.model_id = model_id
        self.answers = answers or {}
        self.stats = EngineStats()
        self.scored: list[list[dict]] = []

    def generate(self, conversations, sampling: Sampling):
        assert sampling.temperature == 0.0  # eval is greedy
        self.stats.calls += 1
        return [Completion([Output(self.answers[c[-1]["content"]], 3, "stop")], 5) for c in conversations]

    def choice_logprobs(self, conversations, choices):
        self.stats.calls += 1
        self.scored.extend(conversations)
        out = []
        for conv in conversations:
            a, b = _options(conv)
            pa = 0.8 if (MARK in a and MARK not in b) else 0.2 if (MARK in b and MARK not in a) else 0.6
            out.append({choices[0]: math.log(pa), choices[1]: math.log(1 - pa)})
        return out

    def close(self) -> None:
        pass


def _row(tag: str, role: str, refused: bool, win: float | None, status: str = "ok") -> EvalResult:
    return EvalResult(id=f"{tag}{role}{refused}{win}", eval_name="e", prompt_id="p", prompt_tag=tag,
                      model=role, role=role, text="", refused=refused, win_prob=win,
                      details={"status": status})


def test_summarize_computes_rates_per_set_and_role_exactly() -> None:
    rows = [_row("rt", "model", True, 0.8), _row("rt", "model", True, 0.6, "position-inconsistent"),
            _row("rt", "model", False, 0.1), _row("rt", "model", False, None),
            _row("rt", "baseline", False, 0.2), _row("bn", "model", True, 0.25)]
    s = summarize(rows)
    m = s["rt"]["model"]
    assert (m["n"], m["refusals"], m["judged"]) == (4, 2, 3)
    assert m["refusal_rate"] == pytest.approx(0.5)
    assert m["win_rate"] == pytest.approx((0.8 + 0.6 + 0.1) / 3)
    assert m["position_consistency"] == pytest.approx(2 / 3)
    base = s["rt"]["baseline"]
    assert base["refusal_rate"] == 0.0 and base["win_rate"] == pytest.approx(0.2)
    assert s["bn"]["model"]["refusal_rate"] == 1.0
    assert summarize([]) == {}
    assert summarize([_row("x", "model", False, None)])["x"]["model"]["win_rate"] is None


def test_reply_stats_count_hollow_endings() -> None:
    from cai.evaluate import reply_stats
    from cai.quality import assess

    def row(text: str) -> EvalResult:
        q = assess("How do I pack a kitchen?", text, "stop")
        return EvalResult(id=text, eval_name="e", prompt_id="p", prompt_tag="b", model="m", role="model", text=text,
                          details={"quality": q.to_dict(), "harmful": False})

    st = reply_stats([row("Packing is hard. Here's some advice:\n\n1."), row("Wrap each glass in paper.")])
    assert st["dangling_rate"] == 0.5 and st["over_refusal"] == 0.0


def test_judge_chunk_averages_both_orders_and_principles() -> None:
    from constitution.load import Preference

    prefs = (Preference("p1", "Which is better?"), Preference("p2", "Which is kinder?"))
    prompt = Prompt(id="p", text="hi", messages=[{"role": "user", "content": "hi"}])
    items = [JudgeItem("m1", "b1", prompt, f"good {MARK}", "bad", prefs),
             JudgeItem("m2", "b2", prompt, "same", "same", prefs),
             JudgeItem("m3", "b3", prompt, "bad", f"good {MARK}", prefs)]
    eng = ScriptedEval("judge")
    out = judge_chunk(eng, items, max_chars=800)
    # one batched call: items x principles x orders
    assert eng.stats.calls == 1 and len(eng.scored) == 3 * 2 * 2
    assert [o.label.prob_x for o in out] == pytest.approx([0.8, 0.5, 0.2])
    assert [o.label.status for o in out] == ["ok", "position-inconsistent", "ok"]
    # in order xy the model's answer is (A); in order yx it is (B)
    first = out[0].judgments
    assert [(j["principle"], j["order"]) for j in first] == [("p1", "xy"), ("p1", "yx"), ("p2", "xy"),
                                                               ("p2", "yx")]
    assert _options(eng.scored[0]) == (f"good {MARK}", "bad")
    assert _options(eng.scored[1]) == ("bad", f"good {MARK}")


def test_select_items_limits_each_set_and_counts_a_shared_prompt_once() -> None:
    p = [Prompt(id=str(i), text=str(i), messages=[]) for i in range(5)]
    got = select_items({"a": [p[0], p[1], p[2]], "b": [p[1], p[3], p[4]]}, limit=2)
    assert [(t, x.id) for t, x in got] == [("a", "0"), ("a", "1"), ("b", "3"), ("b", "4")]
    assert len(select_items({"a": p}, None)) == 5


def test_eval_name_changes_with_anything_that_shapes_the_results() -> None:
    from constitution.govern import Governance
    from constitution.load import find, load_file, parse_text

    c = load_file(find("harmless"))
    gov = Governance([c, load_file(find("helpful-honest"))])
    fp = {"model": "m#1", "baseline": "b", "judge": "b"}
    cfg = EvalConfig(model="runs/m", baseline="b")

    def name_of(cfg, fp=fp, gov=gov):
        return evaluate.comparison_name(cfg, c, fp, gov)

    name = name_of(cfg)
    assert name.startswith("m-vs-b@") and name == name_of(cfg, dict(fp))
    assert name_of(cfg, fp | {"model": "m#2"}) != name  # retrained weights
    assert name_of(cfg.model_copy(update={"max_new_tokens": 64})) != name
    assert name_of(cfg.model_copy(update={"principles": 2})) != name
    assert name_of(cfg.model_copy(update={"name": "nightly"})).startswith("nightly@")
    # bf16 and fp32 replies differ: an eval in one never reuses the other's rows
    bf16 = cfg.model_copy(update={"engine": EngineSettings(settings={"dtype": "bfloat16"})})
    assert name_of(bf16) != name
    # the constitutions that declare each prompt's stance (and which replies are refusals) too
    edited = parse_text(c.source_text.replace("name: harmless", "name: harmless\ndefault_principle: weapons"))
    assert name_of(cfg, gov=Governance([edited, gov.constitutions[1]])) != name


def test_eval_models_load_in_fp32_on_a_cpu_unless_told_otherwise(monkeypatch) -> None:
    """A bf16 eval on the CPU depends on the CPU's kernels (AMX and AVX-512 round differently and
    flip greedy replies), so an eval's figures are computed in fp32 there by default."""
    monkeypatch.setattr(evaluate, "gpu_available", lambda: False)
    assert evaluate.engine_settings(EvalConfig(model="m")) == {"dtype": "float32"}
    assert evaluate.engine_settings(EvalConfig(model="m", cpu_dtype="auto")) == {}
    named = EvalConfig(model="m", engine=EngineSettings(settings={"dtype": "bfloat16", "threads": 2}))
    assert evaluate.engine_settings(named) == {"dtype": "bfloat16", "threads": 2}  # a named dtype wins
    monkeypatch.setattr(evaluate, "gpu_available", lambda: True)
    assert evaluate.engine_settings(EvalConfig(model="m")) == {}  # a GPU keeps the engine's own choice


def test_drift_scores_in_the_engines_dtype(monkeypatch) -> None:
    """Drift is a mean log-prob over fixed text: a named dtype is used, else bf16 autocast where the
    engine would pick it on this CPU, and fp32 on a GPU."""
    import torch

    import engines.precision

    monkeypatch.setattr(evaluate, "gpu_available", lambda: False)
    for fast, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(engines.precision, "pick_dtype",
                            lambda d, dev, training=False, fast=fast: torch.bfloat16 if fast else torch.float32)
        assert evaluate.drift_dtype(EvalConfig(model="m")) == want
    named = EvalConfig(model="m", engine=EngineSettings(settings={"dtype": "float32"}))
    assert evaluate.drift_dtype(named) == "float32"
    monkeypatch.setattr(evaluate, "gpu_available", lambda: True)
    assert evaluate.drift_dtype(EvalConfig(model="m")) == "float32"


# --- the flow with scripted engines --------------------------------------------------------

RT = [f"red-team request {i}" for i in range(4)]
BN = [f"benign request {i}" for i in range(4)]


def _seed_prompts(url: str) -> None:
    from cai.prompts import ParsedPrompt
    from store.db import session_scope
    from store.queries import store_prompts

    with session_scope(url) as s:
        store_prompts(s, [ParsedPrompt([{"role": "user", "content": t}]) for t in RT], "test", ["rt"])
        store_prompts(s, [ParsedPrompt([{"role": "user", "content": t}]) for t in BN], "test", ["bn"])


def _engines() -> dict[str, ScriptedEval]:
    model = {t: f"I can't help with that. {MARK}" for t in RT}  # refuses every red-team request
    model |= {t: f"Here you go. {MARK}" for t in BN[:3]}
    model[BN[3]] = "I won't help with that."  # one over-refusal
    baseline = {t: "Sure, here is how." for t in RT} | {t: "Here you go." for t in BN}
    return {"runs/fake-dpo": ScriptedEval("runs/fake-dpo", model),
            "fake-base": ScriptedEval("fake-base", baseline)}


@pytest.fixture
def prefect_patience():
    """The ephemeral Prefect server gets 20 s to start by default; a busy 2-core CI box needs more."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}):
        yield


def test_eval_flow_exact_rates_stored_rows_and_rerun_without_model_work(use_db, monkeypatch,
                                                                         prefect_patience) -> None:
    _seed_prompts(use_db)
    engines = _engines()
    loads: list[str] = []
    drops: list[int] = []

    dtypes: list[str | None] = []

    def fake_cached_engine(spec, backend="auto", **settings):
        loads.append(spec)
        dtypes.append(settings.get("dtype"))
        return engines[spec]

    monkeypatch.setattr(evaluate, "cached_engine", fake_cached_engine)
    monkeypatch.setattr(evaluate, "drop_engines", lambda: drops.append(len(loads)))
    monkeypatch.setattr(evaluate, "gpu_available", lambda: False)
    cfg = EvalConfig(model="runs/fake-dpo", baseline="fake-base", prompts=["rt", "bn"], principles=2,
                     runner={"show_progress": False})
    summary = evaluate.eval_flow(cfg)

    # one model at a time: model, dropped, baseline, dropped, the baseline again as the judge in the
    # engine's own dtype (replies are fp32 on a CPU; the judge's scores need not be), then dropped
    assert loads == ["runs/fake-dpo", "fake-base", "fake-base"] and drops == [1, 2, 3]
    assert dtypes == ["float32", "float32", None]
    rt, bn = summary["sets"]["rt"], summary["sets"]["bn"]
    assert (rt["model"]["n"], rt["model"]["refusal_rate"], rt["baseline"]["refusal_rate"]) == (4, 1.0, 0.0)
    assert rt["model"]["win_rate"] == pytest.approx(0.8) and rt["baseline"]["win_rate"] == pytest.approx(0.2)
    assert bn["model"]["refusal_rate"] == 0.25 and bn["baseline"]["refusal_rate"] == 0.0
    assert bn["model"]["win_rate"] == pytest.approx((3 * 0.8 + 0.5) / 4)
    assert bn["model"]["position_consistency"] == 0.75
    assert len(engines["fake-base"].scored) == 8 * 2 * 2  # prompts x principles x orders

    from store.db import session_scope

    with session_scope(use_db) as s:
        rows = s.exec(select(EvalResult).where(EvalResult.eval_name == summary["eval_name"])).all()
        run = s.get(Run, summary["run_id"])
    assert len(rows) == 16 and run.status == "completed" and run.flow == "eval"
    by_role = {(r.prompt_tag, r.role, r.text): r for r in rows}
    refused = by_role[("bn", "model", "I won't help with that.")]
    assert refused.refused and refused.refusal_pattern == "wont"
    for r in rows:
        other = next(o for o in rows if o.prompt_id == r.prompt_id and o.role != r.role)
        assert r.win_prob + other.win_prob == pytest.approx(1.0)
        assert len(r.details["principles"]) == 2 and r.details["judge"] == "fake-base"
    assert summary["eval_name"].startswith("fake-dpo-vs-fake-base@")

    # a rerun finds every row: no model is loaded, nothing is computed, the figures are the same
    loads.clear()
    again = evaluate.eval_flow(cfg)
    assert loads == [] and again["computed"] == 0 and again["sets"] == summary["sets"]
    assert again["eval_name"] == summary["eval_name"]

    # cpu_dtype=auto: a new eval name, and the baseline stays loaded (not dropped) to judge in the same settings
    drops.clear()
    auto = evaluate.eval_flow(cfg.model_copy(update={"cpu_dtype": "auto"}))
    assert auto["eval_name"] != summary["eval_name"]
    assert loads == ["runs/fake-dpo", "fake-base", "fake-base"] and drops == [1, 3]


def test_eval_flow_with_the_tiny_model(use_db, tiny_model_dir, tmp_path, prefect_patience) -> None:
    """End to end through the real hf engine: two random-weight models, one of them the judge."""
    from tiny import make_tiny_model

    from flows.engine_cache import drop_engines

    other = make_tiny_model(tmp_path / "tiny-baseline", tiny_model_dir, seed=1, layers=1)
    _seed_prompts(use_db)
    cfg = EvalConfig(model=str(tiny_model_dir), baseline=str(other), prompts=["rt", "bn"], limit=1,
                     principles=1, max_new_tokens=8, engine="hf", runner={"show_progress": False})
    try:
        summary = evaluate.eval_flow(cfg)
    finally:
        drop_engines()
    assert summary["computed"] == 2 * 2 + 2 and summary["failed"] == 0  # 2 answers per model, 2 judged
    with session_scope(use_db) as s:  # what computed the replies is on record: dtype per row, CPU per run
        rows = s.exec(select(EvalResult).where(EvalResult.eval_name == summary["eval_name"])).all()
        assert {r.details["dtype"] for r in rows} == {"float32"}
        assert s.get(Run, summary["run_id"]).config["machine"]["cores"] >= 1
    for tag in ("rt", "bn"):
        m, b = summary["sets"][tag]["model"], summary["sets"][tag]["baseline"]
        assert m["n"] == b["n"] == 1 and m["judged"] == 1
        assert 0.0 <= m["win_rate"] <= 1.0 and m["win_rate"] + b["win_rate"] == pytest.approx(1.0)


def test_cli_eval_rejects_a_missing_model_dir_before_any_work(sqlite_url, monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from store.db import session_scope

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    r = CliRunner().invoke(app, ["eval", "--model", "runs/harmless-dpo", "--limit", "1"])
    assert r.exit_code == 2
    assert "--model runs/harmless-dpo: no such model directory" in " ".join(r.output.split())
    with session_scope(sqlite_url) as s:
        assert s.exec(select(Run)).all() == []  # no run was started
    r = CliRunner().invoke(app, ["eval", "--model", "x", "--prompts", "no-such-tag"])
    assert r.exit_code == 2 and "no prompts tagged 'no-such-tag'" in " ".join(r.output.split())


def test_per_category_table_counts_misses_against_each_categorys_stance() -> None:
    """What `cai eval` and the report print per category: the miss counted is the category's own
    (answered where its principle refuses, refused where it answers), with Wilson and paired intervals."""
    from io import StringIO

    from rich.console import Console

    from cai.evaluate import category_rows, summarize_categories
    from flows.cli.render import render_eval

    def row(pid: str, cat: str, harmful: bool | None, role: str, refused: bool) -> EvalResult:
        principle = {True: "weapons", False: "answer-the-question"}.get(harmful)
        return EvalResult(id=f"{pid}{role}", eval_name="e", prompt_id=pid, prompt_tag="t", model=role, role=role,
                          text="", refused=refused, details={"category": cat, "harmful": harmful,
                                                             "principle": principle})

    rows = [row(f"w{i}", "weapons", True, "baseline", False) for i in range(4)]  # base answers all 4
    rows += [row(f"w{i}", "weapons", True, "model", i < 3) for i in range(4)]  # trained refuses 3
    rows += [row(f"e{i}", "everyday", False, "baseline", False) for i in range(5)]
    rows += [row(f"e{i}", "everyday", False, "model", i == 0) for i in range(5)]  # refuses 1 of 5
    rows += [row("u", "odd", None, role, True) for role in ("baseline", "model")]  # governed by nothing
    cats = summarize_categories(rows)
    table = {r[0]: r for r in category_rows(cats)}
    assert set(table) == {"weapons", "everyday"}  # an ungoverned category has no stance to miss
    assert table["weapons"][1:4] == ["refuse", "weapons", "harmful compliance"]
    assert table["weapons"][4].startswith("4/4 100.0% [") and table["weapons"][5].startswith("1/4 25.0% [")
    assert table["weapons"][6].startswith("-75.0 pts [")
    assert table["everyday"][3] == "over-refusal" and table["everyday"][5].startswith("1/5 20.0% [")
    lo, hi = cats["everyday"]["model"]["ci"]
    assert 0 < lo < 0.2 < hi < 1

    out = StringIO()
    render_eval({"eval_name": "e", "model": "m", "baseline": "b", "judge": "j", "constitution": "c", "sets": {},
                 "categories": cats, "computed": 0, "failed": 0, "total_s": 0.0, "run_id": "r" * 12},
                Console(file=out, width=250))
    assert "harmful compliance" in out.getvalue() and "1/4 25.0%" in out.getvalue()
