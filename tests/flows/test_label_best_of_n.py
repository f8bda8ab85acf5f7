"""`cai label --label-source best-of-n`: N policy samples scored by a (tiny, trained) reward model,
best vs worst as a pair with sigmoid(margin) as its label, through the same quality gates."""

from __future__ import annotations

import math

import pytest
from fakes import ScriptedEngine
from sqlmodel import select
from typer.testing import CliRunner

from engines.base import Completion, Output
from flows.engine_cache import drop_engines, register_engine
from flows.label import best_of_n_task, make_config, sample_task
from store.db import session_scope
from store.models import PreferencePair, Response

REFUSAL = ("I can't help with that. It could seriously hurt people, and it is against the law. If you are "
           "curious about the topic, I'm glad to talk about safety or about how the law treats it instead.")
COMPLIANCE = ("Sure, happy to help! Here is exactly how to do it. First, get everything you need ready. "
              "Then follow each step in order, and you will have it done in no time.")


class StanceEngine(ScriptedEngine):
    """Sample 0 of every prompt refuses, the others comply."""

    def __init__(self, refusing_seed: int):
        super().__init__()
        self.refusing_seed = refusing_seed

    def generate(self, conversations, sampling):
        text = REFUSAL if sampling.seed == self.refusing_seed else f"{COMPLIANCE} ({sampling.seed % 97})"
        return [Completion(outputs=[Output(text=text, completion_tokens=len(text.split()), finish_reason="stop")],
                           prompt_tokens=3) for _ in conversations]


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model that has learned refusal > compliance."""
    from training.config import RewardConfig
    from training.data import PairExample
    from training.reward import load_reward_model, save_reward_model, train_reward

    cfg = RewardConfig(max_steps=12, lr=1e-3, head_lr=1e-2, warmup_ratio=0.0, batch_size=4, max_length=96,
                       max_prompt_length=48)
    model, tok = load_reward_model(tiny_model_dir, "cpu", cfg)
    pairs = [PairExample(({"role": "user", "content": f"Tell me how to do bad thing {i}."},), REFUSAL,
                         f"{COMPLIANCE} ({i})", 1.0, f"p{i}", "revision") for i in range(8)]
    train_reward(model, tok, pairs, [], cfg)
    out = tmp_path_factory.mktemp("rm")
    save_reward_model(model, tok, out)
    return out


def _cfg(reward_dir, prompts):
    return make_config(source="best-of-n", samples=4, reward_model=str(reward_dir), policy="scripted",
                       judge="scripted", prompts=prompts, limit=3, runner={"show_progress": False})


def test_best_of_n_pairs_best_with_worst_through_the_gates(sqlite_url, monkeypatch, reward_dir):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    cfg = _cfg(reward_dir, ["red-team"])
    register_engine("scripted", StanceEngine(cfg.sampling(0).seed))
    try:
        sample_task.fn(cfg, "run-1")
        stats = best_of_n_task.fn(cfg, "run-1")
        assert stats.computed == 3
        assert best_of_n_task.fn(cfg, "run-1").computed == 0  # a rerun finds every pair done
        benign = _cfg(reward_dir, ["benign"])
        sample_task.fn(benign, "run-2")
        best_of_n_task.fn(benign, "run-2")
    finally:
        drop_engines()
    with session_scope(sqlite_url) as s:
        pairs = s.exec(select(PreferencePair)).all()
        texts = {r.id: r.text for r in s.exec(select(Response))}
    harmful = [p for p in pairs if p.run_id == "run-1"]
    assert len(harmful) == 3
    for p in harmful:
        assert p.method == "best-of-n" and p.status == "ok" and texts[p.chosen_id] == REFUSAL
        scores = p.details["scores"]
        assert p.details["n"] == 4 and len(scores) == 4
        assert scores[p.chosen_id] == max(scores.values()) and scores[p.rejected_id] == min(scores.values())
        assert p.label_prob == pytest.approx(1 / (1 + math.exp(-p.details["margin"]))) and p.label_prob > 0.5
        assert p.judge_model == str(reward_dir) and p.policy_model == "scripted"
    # on benign requests the reward model still picks the refusal: the stance gate keeps it out
    gated = [p for p in pairs if p.run_id == "run-2"]
    assert gated and all(p.status == "gated:wrong-stance" for p in gated)


def test_cli_best_of_n_without_a_reward_model_exits_2(sqlite_url, monkeypatch, tmp_path):
    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    res = CliRunner().invoke(app, ["label", "--label-source", "best-of-n", "--samples", "4",
                                   "--reward-model", str(tmp_path / "nope")])
    assert res.exit_code == 2, res.output
    assert "not a reward model directory" in " ".join(res.output.split())
