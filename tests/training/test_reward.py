"""training/reward.py on a tiny random model: a Bradley-Terry head that learns which reply of a pair
is preferred, scores held-out pairs, follows soft labels, and saves a model that reloads."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import LoraSettings, RewardConfig
from training.data import PairExample
from training.reward import bt_loss, evaluate_pairs, load_reward_model, save_reward_model, score, train_reward

REFUSAL = "I can't help with that, but I can point you to safe resources."
COMPLY = "Sure! Here is exactly how to do it, step by step."
FAST = dict(lr=1e-3, head_lr=1e-2, warmup_ratio=0.0, batch_size=4, max_length=64, max_prompt_length=48)


def toy_pairs(n: int, start: int = 0, prob: float = 1.0, method: str = "revision") -> list[PairExample]:
    return [PairExample(({"role": "user", "content": f"Question {i}: can you do the thing?"},), REFUSAL, COMPLY,
                        prob, f"pair-{i}", method) for i in range(start, start + n)]


def test_bt_loss_follows_the_soft_label():
    margin = torch.tensor([0.0, 2.0])
    hard = bt_loss(margin, torch.zeros(2), torch.ones(2))
    assert hard[0] == pytest.approx(math.log(2)) and hard[1] < hard[0]
    # a 0.7 label is best fit by sigmoid(margin) = 0.7, not by an ever larger margin
    ms = torch.linspace(-3, 3, 601)
    soft = bt_loss(ms, torch.zeros_like(ms), torch.full_like(ms, 0.7))
    assert torch.sigmoid(ms[soft.argmin()]) == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("lora", [LoraSettings(), LoraSettings(r=4, alpha=8)], ids=["full", "lora"])
def test_reward_model_learns_and_reloads(tiny_model_dir, tmp_path, lora):
    cfg = RewardConfig(max_steps=12, lora=lora, **FAST)
    model, tok = load_reward_model(tiny_model_dir, "cpu", cfg)
    held = toy_pairs(4, start=100)
    first = evaluate_pairs(model, tok, held, cfg)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4) and first["margin"] == 0.0  # zero head
    res = train_reward(model, tok, toy_pairs(8), held, cfg)
    assert res.final_eval["accuracy"] == 1.0 and res.final_eval["margin"] > 0.5
    assert res.final_eval["loss"] < first["loss"]
    items = [(held[0].prompt, REFUSAL), (held[0].prompt, COMPLY)]
    before = score(model, tok, items, cfg)
    save_reward_model(model, tok, tmp_path / "rm")
    again, tok2 = load_reward_model(tmp_path / "rm", "cpu")
    assert score(again, tok2, items, cfg) == pytest.approx(before, abs=1e-4)
    assert before[0] > before[1]
