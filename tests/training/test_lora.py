"""LoRA DPO (training/lora.py) on a tiny random model: the base stays frozen, the reference is the
base with adapters off, the output is an adapter of KBs that the hf engine loads (merged for
vLLM), and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from training.config import LoraSettings
from training.data import MemoryRefCache, PairExample
from training.lora import apply_lora, merge, reference, trainable_parameters
from training.trainer import TrainerConfig, load_policy, save_model, train_dpo

REFUSAL = "I can't help with that, but I can point you to safe resources."
COMPLY = "Sure! Here is exactly how to do it, step by step."
LORA = LoraSettings(r=4, alpha=8)
FAST = dict(lr=2e-2, warmup_ratio=0.0, batch_size=4, max_length=64, max_prompt_length=48, lora=LORA)


def toy_pairs(n: int = 8) -> list[PairExample]:
    return [PairExample(({"role": "user", "content": f"Question {i}: can you do the thing?"},), REFUSAL, COMPLY,
                        1.0, f"pair-{i}", "revision") for i in range(n)]


def lora_policy(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir, "cpu")
    return apply_lora(model, LORA), tok


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}


def test_lora_dpo_trains_adapters_only_against_the_base(tiny_model_dir, tmp_path):
    model, tok = lora_policy(tiny_model_dir)
    n_train, n_all = trainable_parameters(model)
    assert 0 < n_train < n_all / 10
    before = base_state(model)
    cache = MemoryRefCache()
    res = train_dpo(model, tok, toy_pairs(), [], TrainerConfig(max_steps=12, **FAST), out_dir=tmp_path,
                    ref_model_id="tiny", ref_cache=cache)
    train = [h for h in res.history if h["split"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # B = 0: policy == reference at step 1
    assert train[-1]["rewards/accuracies"] == 1.0 and train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    after = base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base never moved

    # the reference numbers are the plain base model's (shared with full-weight runs of that base)
    plain, _ = load_policy(tiny_model_dir, "cpu")
    fresh = MemoryRefCache()
    train_dpo(plain, tok, toy_pairs(), [], TrainerConfig(max_steps=1, **(FAST | {"lora": LoraSettings()})),
              out_dir=tmp_path / "plain", ref_model_id="tiny", ref_cache=fresh)
    assert fresh.values.keys() == cache.values.keys()
    for k, v in cache.values.items():
        assert v.logp == pytest.approx(fresh.values[k].logp, abs=1e-4)
    # and adapters off gives the base back after training too
    enc_ids = tok("hello there", return_tensors="pt").input_ids
    with torch.no_grad(), reference(model):
        off = model(input_ids=enc_ids).logits
    with torch.no_grad():
        on = model(input_ids=enc_ids).logits
        base = plain.__class__.from_pretrained(str(tiny_model_dir))(input_ids=enc_ids).logits
    assert torch.allclose(off, base, atol=1e-5) and not torch.allclose(on, base, atol=1e-3)


def test_adapter_is_small_and_loads_in_the_hf_engine_and_merged(tiny_model_dir, tmp_path):
    from engines.bundled import ModelNotFound, is_adapter_dir, merged_dir
    from engines.hf import HFEngine

    model, tok = lora_policy(tiny_model_dir)
    train_dpo(model, tok, toy_pairs(), [], TrainerConfig(max_steps=4, **FAST), out_dir=tmp_path,
              ref_model_id="tiny", ref_cache=MemoryRefCache())
    out = tmp_path / "adapter"
    save_model(model, tok, out)
    assert is_adapter_dir(out) and not (out / "model.safetensors").exists()
    full = (tiny_model_dir / "model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size < full / 10
    with pytest.raises(ModelNotFound, match="--merge-lora"):
        merged_dir(out, "vllm")

    ids = tok("a question and", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_model(merge(model), tok, out / "merged")
    assert merged_dir(out, "vllm") == out / "merged"
    engine = HFEngine(str(out), device="cpu", dtype="float32")
    with torch.no_grad():
        got = engine.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)


def test_lora_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg = TrainerConfig(max_steps=4, checkpoint_every=2, **(FAST | {"batch_size": 2}))
    straight, tok = lora_policy(tiny_model_dir)
    ref = train_dpo(straight, tok, toy_pairs(), [], cfg, out_dir=tmp_path / "a", ref_model_id="tiny",
                    ref_cache=MemoryRefCache())
    first, _ = lora_policy(tiny_model_dir)
    train_dpo(first, tok, toy_pairs(), [], cfg, out_dir=tmp_path / "b", ref_model_id="tiny",
              ref_cache=MemoryRefCache())
    ckpts = tmp_path / "b" / "checkpoints"
    assert (ckpts / "step-2" / "adapter_model.safetensors").exists()
    # as if killed after step 2: only that checkpoint is left
    shutil.rmtree(ckpts / "step-4", ignore_errors=True)
    resumed, _ = lora_policy(tiny_model_dir)
    res = train_dpo(resumed, tok, toy_pairs(), [], cfg, out_dir=tmp_path / "b", ref_model_id="tiny",
                    ref_cache=MemoryRefCache(), resume=True)
    assert res.resumed_from == 2 and res.steps == 4
    assert res.final_train["loss"] == pytest.approx(ref.final_train["loss"], abs=1e-5)
    a = dict(straight.named_parameters())
    for k, v in resumed.named_parameters():
        if "lora_" in k:
            assert torch.allclose(v, a[k], atol=1e-6), k


def test_unknown_target_module_names_what_the_model_has(tiny_model_dir):
    model, _ = load_policy(tiny_model_dir, "cpu")
    with pytest.raises(ValueError, match="qkv_proj not in this model .*q_proj"):
        apply_lora(model, LoraSettings(r=2, target_modules=["qkv_proj"]))


def test_an_adapter_on_a_relative_base_path_loads_from_any_directory(tiny_model_dir, tmp_path, monkeypatch):
    """`cai train --base runs/sft --lora-r 16` records the base in adapter_config.json: a path
    relative to where training ran would not load from anywhere else."""
    from engines.bundled import resolve
    from engines.hf import HFEngine

    monkeypatch.chdir(tiny_model_dir.parent)
    base = resolve(tiny_model_dir.name)  # what `cai train --base <relative dir>` loads
    model, tok = load_policy(base, "cpu")
    save_model(apply_lora(model, LORA), tok, tmp_path / "adapter")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    engine = HFEngine(str(tmp_path / "adapter"), device="cpu", dtype="float32")
    assert engine.model is not None
