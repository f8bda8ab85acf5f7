"""training/loop.py's accumulation and checkpoint/resume, as the SFT and reward-model loops use them: a run
killed after a checkpoint and resumed ends where an uninterrupted run ends (keep-best included), and
two micro-batches (or forwards under a token budget) make the same update as one batch of their rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_reward import toy_pairs

from training import loop
from training.config import LoraSettings, RewardConfig, SFTConfig
from training.logps import ChatEncoder
from training.reward import load_reward_model, train_reward
from training.sft import SFTExample, train_sft
from training.trainer import load_policy

ANSWERS = ["Drink water and sleep well.", "Use a timer and take short breaks, then come back to it later.",
           "Check the tyre pressure first."]
LENGTHS = dict(max_length=64, max_prompt_length=48)
LR = 1e-3  # of the accumulation tests


def rows(n: int) -> list[SFTExample]:
    """Rows of different lengths: a loss averaged per micro-batch would weigh their tokens unequally."""
    return [SFTExample(f"r{i}", [{"role": "user", "content": f"question number {i}" + " please" * i}], ANSWERS[i % 3])
            for i in range(n)]


# held-out replies unlike the training ones: held-out loss falls, then rises, so keep-best matters
HELD = [SFTExample(f"h{i}", [{"role": "user", "content": f"question number {i}"}],
                   "Bananas grow on large herbs in warm places.") for i in range(50, 54)]


class Killed(Exception):
    pass


def kill_at(step: int):
    """An on_metrics hook that dies when `step` starts reporting: the run stops mid-way, as a crash would."""
    def hook(s: int, split: str, metrics: dict[str, float]) -> None:
        if s == step:
            raise Killed(f"killed at step {s}")
    return hook


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max().item())


def test_sft_killed_and_resumed_ends_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = SFTConfig(lr=0.05, max_steps=8, batch_size=2, eval_every=1, early_stop_patience=None, keep_best=True,
                    warmup_ratio=0.25, scheduler="cosine", checkpoint_every=2, **LENGTHS)
    model, tok = load_policy(tiny_model_dir, "cpu")
    straight = train_sft(model, tok, rows(8), HELD, cfg, checkpoint_dir=tmp_path / "a")
    expected = weights(model)
    # the best held-out loss comes before the checkpoint the run resumes from: its weights must survive it
    assert straight.best_step is not None and straight.best_step < 4 and "kept the weights" in straight.stop_reason

    model, tok = load_policy(tiny_model_dir, "cpu")
    with pytest.raises(Killed):
        train_sft(model, tok, rows(8), HELD, cfg, checkpoint_dir=tmp_path / "b", on_metrics=kill_at(5))
    model, tok = load_policy(tiny_model_dir, "cpu")  # a new process: base weights, fresh RNG
    resumed = train_sft(model, tok, rows(8), HELD, cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.resumed_from == 4 and resumed.steps == straight.steps == 8
    assert resumed.history == straight.history  # every loss, grad norm and lr, to the bit
    assert (resumed.stop_reason, resumed.best_step) == (straight.stop_reason, straight.best_step)
    assert_same_weights(weights(model), expected)


def test_sft_resume_of_a_finished_stage_loads_it_instead_of_training(tiny_model_dir, tmp_path):
    """final_checkpoint (SFT before DPO): a resumed run takes the finished stage's weights and result."""
    cfg = SFTConfig(lr=0.05, max_steps=4, batch_size=2, eval_every=1, early_stop_patience=None, keep_best=True,
                    **LENGTHS)
    model, tok = load_policy(tiny_model_dir, "cpu")
    done = train_sft(model, tok, rows(8), HELD, cfg, checkpoint_dir=tmp_path, final_checkpoint=True)
    expected = weights(model)
    model, tok = load_policy(tiny_model_dir, "cpu")
    steps: list[int] = []
    again = train_sft(model, tok, rows(8), HELD, cfg, checkpoint_dir=tmp_path, resume=True,
                      on_metrics=lambda s, *_: steps.append(s))
    assert steps == [] and again.resumed_from == done.steps  # nothing trained, nothing evaluated
    assert (again.history, again.stop_reason, again.best_step) == (done.history, done.stop_reason, done.best_step)
    assert_same_weights(weights(model), expected)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("lora", [LoraSettings(), LoraSettings(r=4, alpha=8)], ids=["full", "lora"])
def test_reward_model_killed_and_resumed_ends_as_an_uninterrupted_run(tiny_model_dir, tmp_path, lora):
    """With LoRA a checkpoint holds the adapters and the head (peft's modules_to_save)."""
    cfg = RewardConfig(lr=0.02, head_lr=0.2, max_steps=8, batch_size=2, eval_every=1, keep_best=True,
                       warmup_ratio=0.0, scheduler="constant", checkpoint_every=2, lora=lora, **LENGTHS)
    train, held = toy_pairs(8, prob=0.6, method="ai"), toy_pairs(4, start=100, prob=0.6)
    model, tok = load_reward_model(tiny_model_dir, "cpu", cfg)
    straight = train_reward(model, tok, train, held, cfg, checkpoint_dir=tmp_path / "a")
    expected = weights(model)
    assert straight.best_step is not None and straight.best_step < 4 and "kept the weights" in straight.stop_reason

    model, tok = load_reward_model(tiny_model_dir, "cpu", cfg)
    with pytest.raises(Killed):
        train_reward(model, tok, train, held, cfg, checkpoint_dir=tmp_path / "b", on_metrics=kill_at(5))
    model, tok = load_reward_model(tiny_model_dir, "cpu", cfg)
    resumed = train_reward(model, tok, train, held, cfg, checkpoint_dir=tmp_path / "b", resume=True)
    assert resumed.resumed_from == 4 and resumed.steps == straight.steps == 8
    assert resumed.history == straight.history
    assert (resumed.stop_reason, resumed.best_step) == (straight.stop_reason, straight.best_step)
    assert_same_weights(weights(model), expected)


def _budget(costs: list[int], n_forwards: int = 2) -> int:
    """A token budget that cuts a batch of all the rows (costs[i]: row i's tokens) into n_forwards or more."""
    budget = max(max(costs), sum(costs) // n_forwards)
    assert len(loop.token_split(list(range(len(costs))), costs, budget)) >= n_forwards
    return budget


def _same_update(runs: dict[str, tuple[list[dict], dict[str, torch.Tensor]]], start: dict[str, torch.Tensor]) -> None:
    """Every run's per-step loss and grad norm (before clipping: it sees a wrongly scaled gradient, which
    Adam's update would hide) and final weights match the one-batch run's, to fp32 summation order."""
    (_, (hist, w)), *others = runs.items()
    assert len(hist) == 2 and any(not torch.equal(v, start[k]) for k, v in w.items())  # it did train
    for name, (h, w2) in others:
        for a, b in zip(hist, h, strict=True):
            assert (a["step"], a["split"]) == (b["step"], b["split"])
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), name
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), name
        # Adam divides by the gradient's own size: elements with a near-zero gradient move on fp32
        # summation-order noise alone (1.5e-5 at lr 1e-2); a lost or doubled row moves many by ~lr
        assert_same_weights(w, w2, atol=LR / 100)


def test_sft_two_micro_batches_make_the_update_of_one_batch(tiny_model_dir):
    """4 rows, 2 steps (two epochs): one batch of 4, two micro-batches of 2, or forwards under a budget."""
    enc = ChatEncoder(load_policy(tiny_model_dir, "cpu")[1], **LENGTHS)
    budget = _budget([len(enc.encode(e.prompt, e.response)) for e in rows(4)])
    runs = {}
    for name, kw in {"one batch": dict(batch_size=4), "grad_accum 2": dict(batch_size=2, grad_accum=2),
                     "token budget": dict(batch_size=4, train_batch_tokens=budget)}.items():
        model, tok = load_policy(tiny_model_dir, "cpu")
        start = weights(model)
        cfg = SFTConfig(lr=LR, max_steps=2, warmup_ratio=0.0, **kw, **LENGTHS)
        res = train_sft(model, tok, rows(4), [], cfg)
        runs[name] = (res.history, weights(model))
    _same_update(runs, start)


def test_reward_two_micro_batches_make_the_update_of_one_batch(tiny_model_dir):
    # soft labels and a centring term: every pair's loss differs, so a wrong per-forward weight shows
    pairs = toy_pairs(4, prob=0.7, method="ai")
    pairs[3] = replace(pairs[3], chosen=pairs[3].chosen + " Really, truly, it is so.", label_prob=0.9)
    enc = ChatEncoder(load_reward_model(tiny_model_dir, "cpu")[1], **LENGTHS)
    budget = _budget([len(enc.encode(p.prompt, p.chosen)) + len(enc.encode(p.prompt, p.rejected)) for p in pairs], 3)
    runs = {}
    for name, kw in {"one batch": dict(batch_size=4), "grad_accum 2": dict(batch_size=2, grad_accum=2),
                     "token budget": dict(batch_size=4, train_batch_tokens=budget)}.items():
        cfg = RewardConfig(lr=LR, head_lr=10 * LR, max_steps=2, warmup_ratio=0.0, **kw, **LENGTHS)
        model, tok = load_reward_model(tiny_model_dir, "cpu", cfg)
        start = weights(model)
        res = train_reward(model, tok, pairs, [], cfg)
        runs[name] = (res.history, weights(model))
    _same_update(runs, start)
