"""training/memory.py and the trainer's token budget: each keeps less memory and changes no number."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from training.config import LoraSettings
from training.data import MemoryRefCache, PairExample
from training.logps import ChatEncoder, pair_batch, sequence_logps
from training.loop import token_split
from training.lora import apply_lora
from training.memory import release_freed_memory, training_memory
from training.trainer import TrainerConfig, load_policy, train_dpo

PAIRS = [PairExample(({"role": "user", "content": f"Question {i}: can you do the thing?"},),
                     "I can't help with that, but I can point you to safe resources." + " Truly." * (i % 3),
                     "Sure! Here is exactly how to do it, step by step.", 1.0, f"pair-{i}", "revision")
         for i in range(8)]


def grads_and_saved(model, tok, wrap: bool = True, **kwargs) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    """Gradients of one packed forward + backward, the bytes autograd saved for it, the log-probs;
    `wrap=False`: the model's own forward."""
    enc = ChatEncoder(tok, 64, 48)
    batch = pair_batch(model, [(enc.encode(p.prompt, p.chosen), enc.encode(p.prompt, p.rejected))
                               for p in PAIRS[:4]], enc.pad_id)
    saved: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):  # weights are held anyway; count activations only
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with (training_memory(model, **kwargs) if wrap else nullcontext()), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = sequence_logps(model, batch)
    (logps[:4] - logps[4:]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, sum(saved.values()), logps.detach()


@pytest.mark.parametrize("lora", [False, True])
def test_lean_mlp_and_recompute_keep_less_for_the_same_gradients(tiny_model_dir, lora):
    model, tok = load_policy(tiny_model_dir, "cpu")
    if lora:
        model = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
        for n, p in model.named_parameters():  # B = 0 would give A no gradient to compare
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    with training_memory(model) as (lean, recomputed):
        assert (lean, recomputed) == (model.config.num_hidden_layers, 0)  # every Llama MLP is a SwiGLU

    plain_grads, plain_saved, plain_logps = grads_and_saved(model, tok, wrap=False)
    lean_grads, lean_saved, lean_logps = grads_and_saved(model, tok)
    re_grads, re_saved, re_logps = grads_and_saved(model, tok, recompute_mlp=True)
    assert plain_saved > lean_saved > re_saved
    for logps, grads in ((lean_logps, lean_grads), (re_logps, re_grads)):
        assert torch.allclose(logps, plain_logps, atol=1e-6)
        assert grads.keys() == plain_grads.keys()
        for name, g in grads.items():
            assert torch.allclose(g, plain_grads[name], rtol=1e-5, atol=1e-7), name
    # outside the context every block is its class's own again
    assert all("forward" not in m.__dict__ for name, m in model.named_modules() if name.endswith(".mlp"))


def test_a_batch_split_under_the_token_budget_trains_the_same_weights(tiny_model_dir, tmp_path):
    enc_model, tok = load_policy(tiny_model_dir, "cpu")
    enc = ChatEncoder(tok, 64, 48)
    encoded = [(enc.encode(p.prompt, p.chosen), enc.encode(p.prompt, p.rejected)) for p in PAIRS]
    sizes = [len(c) + len(r.completion_ids) for c, r in encoded]
    budget = sizes[0] + sizes[1]  # two pairs a forward
    parts = token_split([0, 1, 2, 3], sizes, budget)
    assert [i for p in parts for i in p] == [0, 1, 2, 3] and len(parts) >= 2
    assert all(sum(sizes[i] for i in p) <= budget or len(p) == 1 for p in parts)
    assert token_split([0, 1, 2, 3], sizes, 1) == [[0], [1], [2], [3]]  # a longer pair goes alone
    assert token_split([0, 1, 2, 3], sizes, None) == [[0, 1, 2, 3]]  # the default: no limit

    weights = []
    for tokens in (None, budget):
        model, tok = load_policy(tiny_model_dir, "cpu")
        cfg = TrainerConfig(max_steps=3, lr=2e-3, warmup_ratio=0.0, batch_size=4, max_length=64,
                            max_prompt_length=48, train_batch_tokens=tokens)
        train_dpo(model, tok, PAIRS, [], cfg, out_dir=tmp_path / str(tokens), ref_model_id="t",
                  ref_cache=MemoryRefCache())
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, w in weights[0].items():
        # fp32 sums in another order when the batch is split: 1.8e-6 apart on an AMX CPU (2026-12-05);
        # a lost or doubled pair moves weights by ~lr (2e-3)
        assert torch.allclose(w, weights[1][name], atol=1e-5), (name, (w - weights[1][name]).abs().max().item())


def test_release_freed_memory_runs_on_glibc():
    import platform

    assert release_freed_memory() is (platform.libc_ver()[0] == "glibc")
