"""training/loop.py: the pieces the SFT, DPO and reward-model loops share, so each gets the same early
stop, keep-best and schedule; and the reward model and DPO gain what only SFT had."""

from __future__ import annotations

import math

import pytest
import torch
from test_reward import FAST, toy_pairs

from training import loop
from training.config import RewardConfig, TrainerConfig
from training.loss import dpo_loss
from training.reward import evaluate_pairs, load_reward_model, train_reward
from training.trainer import load_policy, train_dpo


def test_early_stop_counts_evals_without_a_lower_loss_and_restores_the_best():
    model = torch.nn.Linear(2, 1)
    stop = loop.EarlyStop(patience=2, keep_best=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert not stop.update(1, 1.0, model)  # best so far: its weights are kept
    with torch.no_grad():
        model.weight.fill_(2.0)
    assert not stop.update(2, 1.0 - loop.MIN_DELTA / 2, model)  # lower by less than MIN_DELTA: not progress
    assert stop.update(3, 1.5, model)  # the second eval without progress stops
    assert stop.best_step == 1 and stop.reason(3).startswith("early stop at step 3")
    assert stop.restore(model, 3) == "; kept the weights of step 1" and float(model.weight[0, 0]) == 1.0
    assert loop.EarlyStop(None).update(1, 1.0, model) is False  # patience None: never stops


def test_every_loop_builds_its_optimizer_the_same_way():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = loop.param_groups(model.parameters(), 1e-3, 0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (3, 0.0)]  # no decay on norms/biases
    sched = loop.schedule(loop.optimizer(groups, 1e-3), total=10, warmup_ratio=0.2, kind="linear")
    assert sched.get_last_lr()[0] == pytest.approx(0.5e-3)  # step 0 of a 2-step warmup


def test_rpo_term_lives_in_the_loss():
    pi_c, pi_r, ref = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0])
    plain, _, _ = dpo_loss(pi_c, pi_r, ref, ref, beta=0.1)
    rpo, _, _ = dpo_loss(pi_c, pi_r, ref, ref, beta=0.1, rpo_alpha=0.5, chosen_tokens=torch.tensor([5]))
    assert float(rpo - plain) == pytest.approx(0.5 * 10.0 / 5)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(pi_c, pi_r, ref, ref, rpo_alpha=0.5)


def test_reward_model_stops_early_and_keeps_its_best_weights(tiny_model_dir):
    """An lr far too high: held-out loss rises, training stops, and the best eval's weights are back."""
    cfg = RewardConfig(**(FAST | dict(lr=0.05, head_lr=0.5, scheduler="constant")), epochs=30, eval_every=1,
                       early_stop_patience=2, keep_best=True)
    model, tok = load_reward_model(tiny_model_dir, "cpu", cfg)
    held = toy_pairs(4, start=100, prob=0.6)
    res = train_reward(model, tok, toy_pairs(8, prob=0.6), held, cfg)
    evals = {h["step"]: h["loss"] for h in res.history if h["split"] == "eval"}
    assert res.steps < res.total_steps and res.stop_reason.startswith("early stop")
    assert evals[res.best_step] == min(evals.values())
    assert evaluate_pairs(model, tok, held, cfg)["loss"] == pytest.approx(evals[res.best_step], abs=1e-3)


def test_dpo_keep_best_restores_the_best_eval(tiny_model_dir, tmp_path):
    from training.data import PairExample

    class Cache:
        def __init__(self):
            self.d = {}

        def get(self, keys):
            return {k: self.d[k] for k in keys if k in self.d}

        def put(self, ref_model, values):
            self.d.update(values)

    pairs = [PairExample(({"role": "user", "content": f"risky {i}?"},), "I can't help with that.",
                         f"Sure, step {i}: do it.", 1.0, f"p{i}") for i in range(12)]
    cfg = TrainerConfig(max_steps=12, lr=0.05, batch_size=2, eval_every=1, early_stop_patience=None, keep_best=True,
                        scheduler="constant", warmup_ratio=0.0, max_length=64, max_prompt_length=32)
    model, tok = load_policy(tiny_model_dir, "cpu")
    res = train_dpo(model, tok, pairs[:8], pairs[8:], cfg, out_dir=tmp_path, ref_model_id="tiny", ref_cache=Cache())
    evals = {h["step"]: h["loss"] for h in res.history if h["split"] == "eval"}
    assert res.final_eval["loss"] - min(evals.values()) <= loop.MIN_DELTA  # the best, up to what counts as progress
    kept = next(s for s, v in evals.items() if v == res.final_eval["loss"])
    assert (kept == 12) == ("kept the weights" not in res.stop_reason)
    assert res.final_eval["loss"] < evals[1] and math.isfinite(res.final_eval["loss"])
