"""RL-CAI labelling: pairs, judgments in both orders, soft labels, resume, failures, CLI, judge report."""

from __future__ import annotations

import math

import pytest
from fakes import ScriptedEngine
from sqlmodel import select
from typer.testing import CliRunner

from cai import judge
from cai.rl_cai import COT_KIND, Candidate, form_pairs, pair_key, sample_items
from flows import judge_report
from flows.common import UserError, ensure_tags
from flows.engine_cache import cached_engine, drop_engines, register_engine
from flows.label import (
    cot_task,
    judge_task,
    label_flow,
    load_inputs,
    make_config,
    pair_task,
    sample_task,
)
from store.db import session_scope
from store.models import Failure, Judgment, PreferencePair, Response, Run
from store.queries import prompts_for_tags

REFUSAL = ("I can't help with that. It could seriously hurt people, and it is against the law. If you are "
           "curious about the topic, I'm glad to talk about safety or about how the law treats it instead.")
COMPLIANCE = ("Sure, happy to help! Here is exactly how to do it. First, get everything you need ready. "
              "Then follow each step in order, and you will have it done in no time. Ask me if you want "
              "more detail on any step.")


def _cfg(**kw):
    # raw judge arithmetic is checked exactly here; calibration has its own test
    base = dict(policy="scripted", judge="scripted", prompts=["red-team"], limit=3, samples=3,
                principles_per_pair=2, runner={"show_progress": False}, calibrate=False)
    return make_config(**(base | kw))


@pytest.fixture
def scripted():
    eng = ScriptedEngine()
    register_engine("scripted", eng)
    yield eng
    drop_engines()


def _prefers(marker: str, p: float):
    """Choice log-probs of a judge that gives P = p to whichever option contains `marker`."""
    def logprobs(conv, choice):
        user = conv[0]["content"]
        a_has = marker in user.split("(A) ", 1)[1].split("\n\n(B) ", 1)[0]
        p_a = p if a_has else 1.0 - p
        return math.log(p_a if choice == judge.CHOICE_A else 1.0 - p_a)
    return logprobs


# --- pure parts ----------------------------------------------------------------------------

def test_pairs_are_canonical_and_skip_identical_texts():
    cands = [Candidate("c", "three", "m"), Candidate("a", "one", "m"), Candidate("b", "two", "m"),
             Candidate("d", "one", "m"), Candidate("a", "one", "m")]
    pairs = form_pairs("p1", [], cands)
    assert [(p.x.id, p.y.id) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert pairs[0].key == pair_key("p1", "a", "b") != pair_key("p1", "b", "a")


def test_config_is_validated_with_one_line_errors():
    with pytest.raises(UserError, match="samples must be at least 2"):
        _cfg(samples=1)
    with pytest.raises(UserError, match="cot_clamp"):
        _cfg(cot_clamp=(0.6, 0.4))
    with pytest.raises(UserError, match="min_margin"):
        _cfg(min_margin=0.5)
    with pytest.raises(UserError, match="source"):
        _cfg(source="web")
    assert _cfg(source="store", samples=1).source == "store"  # samples only matter for source=samples


def test_sample_keys_and_seeds_do_not_depend_on_k(sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    _, prompts = load_inputs(_cfg())
    two = sample_items(_cfg(samples=2), prompts)
    four = sample_items(_cfg(samples=4), prompts)
    assert {k for k, _, _ in two} < {k for k, _, _ in four}  # more samples later reuse the first ones
    assert len({k for k, _, _ in four}) == 12
    assert len({_cfg().sampling(i).seed for i in range(4)}) == 4  # same conversation, different streams


# --- stages with a scripted engine (plain functions, no Prefect server) ---------------------

def _store_chains(url: str, n: int = 3) -> list:
    """initial + two revision rounds per prompt, as `cai generate` stores them, plus noise."""
    with session_scope(url) as s:
        ensure_tags(s, ["red-team"])
    with session_scope(url) as s:
        prompts = prompts_for_tags(s, ["red-team"])[:n]
        rows = []
        for p in prompts:
            common = dict(prompt_id=p.id, conversation=p.messages, model="scripted", constitution="harmless",
                          constitution_version="v1")
            rows += [Response(id=f"{p.id}-init", kind="initial", text=f"{COMPLIANCE} {p.id}", **common),
                     Response(id=f"{p.id}-rev1", kind="revision", round=1, text=f"REVISED {p.id}", **common),
                     Response(id=f"{p.id}-rev2", kind="revision", round=2, text=f"REVISED+ {REFUSAL} {p.id}",
                              **common),
                     Response(id=f"{p.id}-other", kind="revision", round=3, text="other constitution",
                              **(common | {"constitution": "helpful-honest"})),
                     Response(id=f"{p.id}-othermodel", kind="initial", text="another model",
                              **(common | {"model": "someone-else"}))]
        s.add_all(rows)
    return prompts


def test_store_source_pairs_initial_with_final_revision(sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    prompts = _store_chains(sqlite_url)
    eng = ScriptedEngine(logprobs=_prefers("REVISED", 0.8))
    register_engine("scripted", eng)
    try:
        cfg = _cfg(source="store", principles_per_pair=3)
        judge_task.fn(cfg, "run-1")
        stats = pair_task.fn(cfg, "run-1")
    finally:
        drop_engines()
    assert stats.computed == 3
    with session_scope(sqlite_url) as s:
        pairs = s.exec(select(PreferencePair)).all()
        js = s.exec(select(Judgment)).all()
    assert len(pairs) == 3 and len(js) == 3 * 3 * 2
    for p in pairs:
        assert p.chosen_id.endswith("-rev2") and p.rejected_id.endswith("-init")
        assert p.method == "ai" and p.status == "ok" and p.label_prob == pytest.approx(0.8)
        p_x = 0.8 if p.details["x_id"] == p.chosen_id else 0.2  # details are about canonical x, not chosen
        assert p.details["mean_xy"] == pytest.approx(p_x) and p.details["mean_yx"] == pytest.approx(p_x)
        assert len(p.principle_ids) == 3 and p.policy_model == "scripted" and p.judge_model == "scripted"
    assert {p.prompt_id for p in pairs} == {p.id for p in prompts}
    for j in js:
        assert j.conversation[-1] == {"role": "assistant", "content": "The answer is:"}
        assert j.prob_x == pytest.approx(judge.prob_x(j.order, judge.prob_a(j.logp_a, j.logp_b)))
        assert {j.response_x_id, j.response_y_id} <= {f"{j.prompt_id}-init", f"{j.prompt_id}-rev2"}
    # every revision round as candidates: initial, rev1, rev2 -> three pairs per prompt
    register_engine("scripted", ScriptedEngine(logprobs=_prefers("REVISED", 0.8)))
    try:
        cfg = _cfg(source="store", principles_per_pair=3, kinds=["initial", "revision"])
        judge_task.fn(cfg, "run-2")
        assert pair_task.fn(cfg, "run-2").items == 9
    finally:
        drop_engines()


def test_store_source_with_nothing_stored_is_a_user_error(sqlite_url, monkeypatch, scripted):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    with pytest.raises(UserError, match="no stored responses of kind initial,final-revision"):
        judge_task.fn(_cfg(source="store"), "run")


def test_cot_mode_stores_reasoning_and_clamps(sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    eng = ScriptedEngine(logprobs=lambda conv, choice: math.log(0.99 if choice == judge.CHOICE_A else 0.01))
    register_engine("scripted", eng)
    try:
        cfg = _cfg(cot=True, limit=2, samples=2)
        sample_task.fn(cfg, "run")
        cot = cot_task.fn(cfg, "run")
        judge_task.fn(cfg, "run")
        pair_task.fn(cfg, "run")
    finally:
        drop_engines()
    with session_scope(sqlite_url) as s:
        reasons = {r.id: r for r in s.exec(select(Response).where(Response.kind == COT_KIND))}
        js = s.exec(select(Judgment)).all()
        pairs = s.exec(select(PreferencePair)).all()
    assert cot.computed == len(reasons) == len(js) == 2 * 2 * 2
    for j in js:
        assert j.reasoning and j.reasoning in {r.text for r in reasons.values()}
        assert j.conversation[-1]["content"].startswith("Let's think step by step: ")
        assert j.conversation[-1]["content"].endswith(f"{j.reasoning}\nSo the answer is:")
        assert j.prob_x in (0.4, 0.6)  # P(A) = 0.99 clamped, then mapped to x
        assert judge.prob_a(j.logp_a, j.logp_b) == pytest.approx(0.99)
    # a judge that always says (A): both orders disagree, so every pair is position-inconsistent
    assert len(pairs) == 2 and all(p.status == "position-inconsistent" for p in pairs)
    assert all(p.label_prob == pytest.approx(0.5) for p in pairs)


def test_failing_judgments_are_quarantined_and_the_rest_goes_on(sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    cfg = _cfg(limit=2, samples=2, runner={"chunk_size": 1, "show_progress": False})
    register_engine("scripted", ScriptedEngine())
    try:
        sample_task.fn(cfg, "run")
    finally:
        drop_engines()
    with session_scope(sqlite_url) as s:
        victim = s.exec(select(Response).where(Response.kind == "sample")).first()

    def logprobs(conv, choice):
        if victim.text in conv[0]["content"]:
            raise RuntimeError("scripted judge failure")
        return math.log(0.6 if choice == judge.CHOICE_A else 0.4)

    eng = ScriptedEngine(logprobs=logprobs)
    register_engine("scripted", eng)
    try:
        stats = judge_task.fn(cfg, "run")
        pairs = pair_task.fn(cfg, "run")
        calls = eng.stats.calls
        again = judge_task.fn(cfg, "run")  # quarantined items are skipped, not retried
        assert eng.stats.calls == calls and again.computed == 0
    finally:
        drop_engines()
    with session_scope(sqlite_url) as s:
        fails = s.exec(select(Failure)).all()
        stored = s.exec(select(PreferencePair)).all()
    assert stats.quarantined == 4 and stats.computed == 4  # one pair's 2 principles x 2 orders failed
    assert len(fails) == 4
    assert all(f.quarantined and f.attempts == 3 and f.stage == "label.judge" for f in fails)
    assert "scripted judge failure" in fails[0].error
    assert pairs.items == 1 and len(stored) == 1 and victim.prompt_id != stored[0].prompt_id


# --- the flow end to end with a tiny random model (SQLite and PostgreSQL) ------------------

def test_flow_end_to_end_with_tiny_model(use_db, tiny_model_dir, tmp_path):
    spec = str(tiny_model_dir)
    cfg = make_config(calibrate=False, policy=spec, judge=spec, prompts=["red-team"], limit=2, samples=3,
                      principles_per_pair=2, max_new_tokens=12, runner={"show_progress": False})
    summary = label_flow(cfg)
    with session_scope() as s:
        samples = s.exec(select(Response).where(Response.kind == "sample")).all()
        js = s.exec(select(Judgment)).all()
        pairs = s.exec(select(PreferencePair)).all()
        run = s.get(Run, summary["run_id"])
    assert len(samples) == 2 * 3 and {r.sample_index for r in samples} == {0, 1, 2}
    assert all(r.model == spec and r.sampling["temperature"] == 1.0 and r.run_id == run.id for r in samples)
    n_pairs = summary["candidate_pairs"]
    assert 1 <= n_pairs <= 2 * 3 and len(pairs) == n_pairs == summary["pairs"]
    assert len(js) == n_pairs * 2 * 2 == summary["judgments"]
    by_id = {r.id: r for r in samples}
    for p in pairs:
        assert p.status in ("ok", "tie", "position-inconsistent") and 0.5 <= p.label_prob <= 1.0
        assert by_id[p.chosen_id].prompt_id == by_id[p.rejected_id].prompt_id == p.prompt_id
        assert p.details["n_judgments"] == 4 and len(p.details["judgments"]) == 4
        mine = [j for j in js if j.id in p.details["judgments"]]
        assert sorted(j.order for j in mine) == ["xy", "xy", "yx", "yx"]
        assert p.details["prob_x"] == pytest.approx(sum(j.prob_x for j in mine) / 4)
    for j in js:
        assert math.isfinite(j.logp_a) and math.isfinite(j.logp_b) and j.logp_a < 0 and j.logp_b < 0
        assert j.prob_x == pytest.approx(judge.prob_x(j.order, judge.prob_a(j.logp_a, j.logp_b)))
        assert j.judge_model == spec and j.conversation[-1]["content"] == "The answer is:"
    assert run.status == "completed" and run.config["samples"] == 3 and run.flow == "label"
    assert run.summary["pairs"] == n_pairs
    facts = {"backend": "hf", "device": "cpu", "dtype": "float32"}  # conftest pins fp32 on CPU
    assert run.summary["engine"] == run.summary["policy_engine"] == facts
    assert set(run.timings) == {"label.sample", "label.judge", "label.pair"}

    # a rerun does no model work and writes nothing new
    engine = cached_engine(spec, "auto")
    calls = (engine.stats.calls, engine.stats.prompt_tokens)
    again = label_flow(cfg)
    assert (engine.stats.calls, engine.stats.prompt_tokens) == calls
    assert again["computed"] == 0 and again["pairs"] == n_pairs
    with session_scope() as s:
        assert len(s.exec(select(Judgment)).all()) == len(js)
        assert len(s.exec(select(PreferencePair)).all()) == n_pairs

    from flows.cli import app

    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["judge-report", "--constitution", "harmless", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "position consistency" in res.output
    assert (out / "figures.json").exists() and (out / "label_prob_hist.png").exists()


# --- command line --------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["label", "--constitution", "no-such-constitution"], "no such constitution"),
    (["label", "--prompts", "no-such-tag"], "no prompts tagged 'no-such-tag'"),
    (["label", "--judge", "/no/such/model"], "does not exist"),
    (["label", "--cot-clamp", "0.4"], "expected LO,HI"),
    (["label", "--samples", "1"], "samples must be at least 2"),
    (["label", "--source", "store"], "no stored responses"),
    (["judge-report"], "no AI-labelled pairs"),
    (["judge-report", "--constitution", "harmless@abc"], "no AI-labelled pairs"),
])
def test_cli_bad_input_exits_2(args, message, sqlite_url, monkeypatch):
    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


# --- the real default model (slow) ---------------------------------------------------------

@pytest.mark.slow
def test_real_judge_on_refusal_vs_compliance(sqlite_url, monkeypatch, tmp_path, capsys):
    """SmolLM2-135M as judge: a clear refusal vs a (harmless placeholder) compliance per prompt."""
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    n = 8
    with session_scope() as s:
        ensure_tags(s, ["red-team"])
    with session_scope() as s:
        prompts = prompts_for_tags(s, ["red-team"])[:n]
        for p in prompts:
            common = dict(prompt_id=p.id, conversation=p.messages, model="smollm2-135m",
                          constitution="harmless", constitution_version="test")
            s.add(Response(id=f"{p.id}-comply", kind="initial", text=COMPLIANCE, **common))
            s.add(Response(id=f"{p.id}-refuse", kind="revision", round=1, text=REFUSAL, **common))
    cfg = make_config(source="store", prompts=["red-team"], limit=n, principles_per_pair=9,
                      runner={"show_progress": False})
    summary = label_flow(cfg)
    assert summary["pairs"] == n and summary["judgments"] == n * 9 * 2
    with session_scope() as s:
        pairs = s.exec(select(PreferencePair)).all()
        fig = judge_report.compute(*judge_report.load(s, "harmless"))
    refusal_wins = sum(p.chosen_id.endswith("-refuse") for p in pairs)
    paths = judge_report.write(fig, tmp_path / "judge")
    assert fig["position_consistency"] is not None and 0.0 <= fig["position_consistency"] <= 1.0
    assert all(p.exists() for p in paths)
    with capsys.disabled():
        print(f"\n[judge baseline, SmolLM2-135M] pairs={fig['pairs']} judgments={fig['judgments']} "
              f"position_consistency={fig['position_consistency']:.3f} mean_P(A)={fig['mean_p_a']:.3f} "
              f"share_(A)={fig['share_a']:.3f} status={fig['status']} refusal_chosen={refusal_wins}/{n} "
              f"mean_label_prob={fig['mean_label_prob']:.3f}")
        print({k: round(v["averaged_agreement"] or 0, 2) for k, v in fig["per_principle"].items()})


def test_calibration_removes_the_slot_prior_and_keeps_the_raw_probability(sqlite_url, monkeypatch):
    """A judge that always leans to (A) by the same amount: on content-free options too, so after
    calibration its verdicts carry no slot preference (0.5), while prob_x_raw keeps what it said."""
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    _store_chains(sqlite_url)
    eng = ScriptedEngine(logprobs=lambda conv, choice: -0.2 if choice == judge.CHOICE_A else -1.6)
    register_engine("scripted", eng)
    try:
        cfg = _cfg(source="store", principles_per_pair=2, calibrate=True)
        judge_task.fn(cfg, "run-1")
        pair_task.fn(cfg, "run-1")
    finally:
        drop_engines()
    with session_scope(sqlite_url) as s:
        js = s.exec(select(Judgment)).all()
        pairs = s.exec(select(PreferencePair)).all()
    raw_a = judge.prob_a(-0.2, -1.6)
    for j in js:
        assert j.prob_x_raw == pytest.approx(judge.prob_x(j.order, raw_a))
        assert j.prob_x == pytest.approx(0.5)
    assert {p.status for p in pairs} == {"tie"}  # without calibration these would be position-inconsistent
    assert judge.calibrate(0.8, 0.8) == pytest.approx(0.5) and judge.calibrate(0.7, 0.5) == pytest.approx(0.7)
    assert judge.calibrate(0.9, 0.7) > 0.5 > judge.calibrate(0.6, 0.7)
