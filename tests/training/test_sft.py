"""The SFT step on a tiny random model: it learns the responses, evaluates, stops and keeps the best."""

from __future__ import annotations

import torch

from training.sft import SFTConfig, SFTExample, eval_loss, train_sft
from training.trainer import load_policy

ANSWERS = ["Drink water and sleep well.", "Use a timer and take short breaks.", "Check the tyre pressure first."]


def rows(n: int, start: int = 0) -> list[SFTExample]:
    return [SFTExample(f"r{i}", [{"role": "user", "content": f"question number {i}"}], ANSWERS[i % 3])
            for i in range(start, start + n)]


def test_sft_lowers_the_response_nll(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir, "cpu")
    cfg = SFTConfig(lr=3e-3, epochs=4, batch_size=4, early_stop_patience=None, keep_best=False)
    from training.logps import ChatEncoder

    enc = ChatEncoder(tok, cfg.max_length, cfg.max_prompt_length)
    held = rows(6, start=100)
    before = eval_loss(model, [enc.encode(e.prompt, e.response) for e in held], enc.pad_id, cfg)["loss"]
    res = train_sft(model, tok, rows(12), held, cfg)
    after = eval_loss(model, [enc.encode(e.prompt, e.response) for e in held], enc.pad_id, cfg)["loss"]
    assert after < before - 1.0  # the responses were learned, and generalise to unseen prompts
    assert res.steps == res.total_steps == 12 and res.stop_reason == "max steps"
    assert [h["step"] for h in res.history if h["split"] == "eval"][0] == 0  # the start is measured


def test_early_stop_and_keep_best(tiny_model_dir):
    """An lr far too high makes held-out loss rise after a while: training stops, and the kept
    weights are the best eval's, not the last step's."""
    model, tok = load_policy(tiny_model_dir, "cpu")
    cfg = SFTConfig(lr=0.05, epochs=20, batch_size=4, eval_every=1, early_stop_patience=2, keep_best=True,
                    warmup_ratio=0.0, scheduler="constant")
    res = train_sft(model, tok, rows(8), rows(4, start=50), cfg)
    assert res.steps < res.total_steps and res.stop_reason.startswith("early stop")
    evals = {h["step"]: h["loss"] for h in res.history if h["split"] == "eval"}
    assert res.best_step is not None and evals[res.best_step] == min(evals.values())
    from training.logps import ChatEncoder

    enc = ChatEncoder(tok, cfg.max_length, cfg.max_prompt_length)
    now = eval_loss(model, [enc.encode(e.prompt, e.response) for e in rows(4, start=50)], enc.pad_id, cfg)
    assert abs(now["loss"] - evals[res.best_step]) < 1e-3
    assert torch.isfinite(torch.tensor(now["loss"]))


def test_frozen_bottom_layers_do_not_move_and_train_again_afterwards(tiny_model_dir):
    """freeze_layers keeps the embeddings and the bottom layers as they were (autograd stops above
    them); the layers above still learn, and everything trains again after the stage."""
    model, tok = load_policy(tiny_model_dir, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SFTConfig(lr=3e-3, epochs=2, batch_size=4, early_stop_patience=None, keep_best=False, freeze_layers=1)
    train_sft(model, tok, rows(8), [], cfg)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert not [k for k in moved if ".layers.0." in k or "embed_tokens" in k]
    assert any(".layers.1." in k for k in moved)
    assert all(p.requires_grad for p in model.parameters())
    import pytest

    with pytest.raises(ValueError, match="freeze_layers 9: the model has 2 decoder layers"):
        train_sft(model, tok, rows(4), [], SFTConfig(freeze_layers=9))
