"""training/trainer.py on a tiny random model: it learns a consistent preference, reuses reference
log-probs, resumes exactly, stops early, and saves a model transformers can load and run."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from training.data import MemoryRefCache, PairExample
from training.loop import lr_factor
from training.trainer import TrainerConfig, load_policy, plot_metrics, save_model, train_dpo

REFUSAL = "I can't help with that, but I can point you to safe resources."
COMPLY = "Sure! Here is exactly how to do it, step by step."


def toy_pairs(n: int = 12, flip: bool = False, start: int = 0) -> list[PairExample]:
    out = []
    for i in range(start, start + n):
        prompt = ({"role": "user", "content": f"Question number {i}: can you do the thing?"},)
        chosen, rejected = (COMPLY, REFUSAL) if flip else (REFUSAL, COMPLY)
        out.append(PairExample(prompt, chosen, rejected, 1.0, f"pair-{i}", "revision"))
    return out


FAST = dict(lr=2e-3, warmup_ratio=0.0, batch_size=4, max_length=64, max_prompt_length=48)


def learned(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "tokens_per_s"}  # the rest is deterministic


def count_forwards(model) -> list[int]:
    calls = [0]
    model.base_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_learns_a_consistent_preference(tiny_model_dir, tmp_path):
    model, tok = load_policy(tiny_model_dir)
    res = train_dpo(
        model,
        tok,
        toy_pairs(8),
        [],
        TrainerConfig(max_steps=15, **FAST),
        out_dir=tmp_path,
        ref_model_id="tiny",
        ref_cache=MemoryRefCache(),
    )
    train = [h for h in res.history if h["split"] == "train"]
    assert len(train) == res.steps == 15
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert train[-1]["rewards/accuracies"] == 1.0
    margins = [h["rewards/margins"] for h in train]
    assert margins[-1] > margins[4] > margins[0] and margins[-1] > 0.5
    assert train[-1]["loss"] < 0.5
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "tokens_per_s",
        "lr",
    ):
        assert key in train[-1]
    png = plot_metrics(res.history, tmp_path / "metrics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_logps_are_computed_once(tiny_model_dir, tmp_path, monkeypatch):
    import training.logps

    monkeypatch.setattr(training.logps, "SHARE_PREFIX", False)  # one decoder call per forward, to count them
    cache = MemoryRefCache()
    cfg = TrainerConfig(max_steps=2, **FAST)
    pairs, held = toy_pairs(8), toy_pairs(2, start=100)
    model, tok = load_policy(tiny_model_dir)
    calls = count_forwards(model)
    first = train_dpo(
        model, tok, pairs, held, cfg, out_dir=tmp_path / "a", ref_model_id="tiny", ref_cache=cache
    )
    assert first.ref_computed == len(cache.values) > 0 and first.ref_reused == 0
    evals = sum(1 for h in first.history if h["split"] == "eval")

    model, tok = load_policy(tiny_model_dir)
    calls2 = count_forwards(model)
    second = train_dpo(
        model, tok, pairs, held, cfg, out_dir=tmp_path / "b", ref_model_id="tiny", ref_cache=cache
    )
    assert second.ref_computed == 0 and second.ref_reused == first.ref_computed
    assert calls2[0] == 2 + evals  # one forward per training step and per eval, no reference pass at all
    assert calls[0] > calls2[0]
    assert learned(second.final_train) == pytest.approx(learned(first.final_train), rel=1e-4, abs=1e-6)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    pairs = toy_pairs(12)
    cfg = TrainerConfig(
        max_steps=4,
        checkpoint_every=2,
        grad_accum=2,
        batch_size=2,
        lr=2e-3,
        warmup_ratio=0.5,
        max_length=64,
        max_prompt_length=48,
        seed=3,
    )
    straight, tok = load_policy(tiny_model_dir)
    ref = train_dpo(
        straight,
        tok,
        pairs,
        [],
        cfg,
        out_dir=tmp_path / "straight",
        ref_model_id="tiny",
        ref_cache=MemoryRefCache(),
    )
    assert (tmp_path / "straight" / "checkpoints" / "step-2" / "trainer_state.pt").exists()

    # a run that "crashed" after step 2: its checkpoint is all that is left in its out dir
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    resumed, _ = load_policy(tiny_model_dir)  # base weights: the reference pass must see these
    res = train_dpo(
        resumed,
        tok,
        pairs,
        [],
        cfg,
        out_dir=out,
        ref_model_id="tiny",
        ref_cache=MemoryRefCache(),
        resume=True,
    )
    assert res.resumed_from == 2 and res.steps == 4
    assert [h["step"] for h in res.history if h["split"] == "train"] == [1, 2, 3, 4]  # history carried over
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert learned(res.final_train) == pytest.approx(learned(ref.final_train), rel=1e-4, abs=1e-6)


def test_early_stop_on_eval_loss(tiny_model_dir, tmp_path):
    model, tok = load_policy(tiny_model_dir)
    # held-out pairs prefer the opposite answer, so the better training goes the worse eval gets
    res = train_dpo(
        model,
        tok,
        toy_pairs(8),
        toy_pairs(4, flip=True, start=100),
        TrainerConfig(max_steps=30, eval_every=1, early_stop_patience=2, **FAST),
        out_dir=tmp_path,
        ref_model_id="tiny",
        ref_cache=MemoryRefCache(),
    )
    # eval loss rises from the first eval on: the best stays step 1's, two worse evals stop it
    assert res.stopped_early and res.steps == 3
    assert [h["step"] for h in res.history if h["split"] == "eval"] == [1, 2, 3]


def test_saved_model_loads_and_generates(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = load_policy(tiny_model_dir)
    train_dpo(
        model,
        tok,
        toy_pairs(4),
        [],
        TrainerConfig(max_steps=1, **FAST),
        out_dir=tmp_path,
        ref_model_id="tiny",
        ref_cache=MemoryRefCache(),
    )
    save_model(model, tok, tmp_path / "model")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ids = tok2.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = back.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or out[0, -1].item() == tok2.eos_token_id


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6)] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="scheduler"):
        TrainerConfig(scheduler="step").validate()


class ActivationProbe:
    """What the training forwards did inside the decoder layers: bytes autograd saved for backward
    there (activation memory) and the dtypes the MLPs computed in.

    With activation checkpointing a layer saves nothing itself (torch's checkpoint keeps its own
    hooks inside and recomputes in backward), so the bytes seen here fall to almost none.
    """

    def __init__(self, model):
        self.saved_bytes, self.dtypes, self._inside = 0, set(), 0
        for layer in model.base_model.layers:
            layer.register_forward_pre_hook(lambda *_: self._enter(1))
            layer.register_forward_hook(lambda *_: self._enter(-1))
            layer.mlp.register_forward_hook(self._mlp)

    def _enter(self, step: int) -> None:
        self._inside += step

    def _mlp(self, _module, _inputs, output) -> None:
        if torch.is_grad_enabled():  # training forwards, not the no-grad reference pass
            self.dtypes.add(output.dtype)

    def _pack(self, t):
        if self._inside:  # (a no-grad forward saves nothing)
            self.saved_bytes += t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def test_activation_checkpointing_changes_nothing_but_memory(tiny_model_dir, tmp_path):
    results, probes, during = [], [], []
    for on in (False, True):
        model, tok = load_policy(tiny_model_dir)
        probe = ActivationProbe(model)
        cfg = TrainerConfig(max_steps=2, gradient_checkpointing=on, **FAST)
        with probe.hooks():
            res = train_dpo(
                model,
                tok,
                toy_pairs(4),
                [],
                cfg,
                out_dir=tmp_path,
                ref_model_id="tiny",
                ref_cache=MemoryRefCache(),
                on_metrics=lambda *_, m=model: during.append(m.is_activation_checkpointing
                                                              if hasattr(m, "is_activation_checkpointing")
                                                              else m.is_gradient_checkpointing),
            )
        results.append(learned(res.final_train))
        probes.append(probe)
    assert results[1] == pytest.approx(results[0], rel=1e-5, abs=1e-7)
    assert during == [False, False, True, True]  # on while training, per step
    # the option took effect: the layers' activations are recomputed, not kept (measured: ~28x less)
    assert probes[0].saved_bytes > 0
    assert probes[1].saved_bytes < probes[0].saved_bytes / 5, (probes[0].saved_bytes, probes[1].saved_bytes)


def test_bf16_autocast_runs(tiny_model_dir, tmp_path):
    model, tok = load_policy(tiny_model_dir)
    probe = ActivationProbe(model)
    res = train_dpo(
        model,
        tok,
        toy_pairs(4),
        [],
        TrainerConfig(max_steps=2, dtype="bfloat16", **FAST),
        out_dir=tmp_path,
        ref_model_id="tiny",
        ref_cache=MemoryRefCache(),
    )
    assert probe.dtypes == {torch.bfloat16}  # autocast was on: the MLPs computed in bf16
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert math.isfinite(res.final_train["loss"])
    fp32 = load_policy(tiny_model_dir)[0]
    probe32 = ActivationProbe(fp32)
    train_dpo(fp32, tok, toy_pairs(4), [], TrainerConfig(max_steps=1, **FAST), out_dir=tmp_path / "fp32",
              ref_model_id="tiny", ref_cache=MemoryRefCache())
    assert probe32.dtypes == {torch.float32}  # and the probe tells the two apart


def test_truncated_sequences_are_counted(tiny_model_dir, tmp_path):
    model, tok = load_policy(tiny_model_dir)
    # SmolLM2's template alone (default system prompt) is over 16 tokens: every prompt gets cut
    cfg = TrainerConfig(**{**FAST, "max_length": 24, "max_prompt_length": 16, "max_steps": 1})
    res = train_dpo(
        model, tok, toy_pairs(4), [], cfg, out_dir=tmp_path, ref_model_id="tiny", ref_cache=MemoryRefCache()
    )
    assert res.truncated == 8  # 4 pairs x (chosen, rejected)
    assert math.isfinite(res.final_train["loss"])


class _Planted:
    """A pickle that would create a file when unpickled: what a tampered run directory could hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_the_run_directory(tiny_model_dir, tmp_path):
    import json

    from training.checkpoint import META_FILE, STATE_FILE, CheckpointError, latest_checkpoint, read_meta

    model, tok = load_policy(tiny_model_dir)
    cfg = TrainerConfig(max_steps=3, checkpoint_every=2, **FAST)
    train_dpo(model, tok, toy_pairs(8), [], cfg, out_dir=tmp_path, ref_model_id="tiny",
              ref_cache=MemoryRefCache(), meta={"pairs_hash": "abc"})
    path, step = latest_checkpoint(tmp_path / "checkpoints")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)  # no pickle needed
    assert set(state) == {"step", "optimizer", "scheduler", "rng"} and step == 2
    meta = json.loads((path / META_FILE).read_text())
    assert meta["step"] == 2 and read_meta(path)["pairs_hash"] == "abc"
    assert [h["step"] for h in meta["meta"]["history"]] == [1, 2]

    marker = tmp_path / "pwned"
    torch.save({"step": 2, "optimizer": _Planted(marker), "scheduler": {}, "rng": {}}, path / STATE_FILE)
    again, _ = load_policy(tiny_model_dir)
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: not a checkpoint this version loads safely"):
        train_dpo(again, tok, toy_pairs(8), [], cfg, out_dir=tmp_path, ref_model_id="tiny",
                  ref_cache=MemoryRefCache(), resume=True)
    assert not marker.exists()
    (path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_meta\.json: cannot read checkpoint metadata"):
        read_meta(path)


def test_rpo_term_keeps_the_chosen_likelihood_up(tiny_model_dir, tmp_path):
    """With rpo_alpha the chosen reply's log-prob ends higher than with plain DPO on the same data."""
    ends = {}
    for alpha in (0.0, 1.0):
        model, tok = load_policy(tiny_model_dir)
        res = train_dpo(model, tok, toy_pairs(8), [], TrainerConfig(max_steps=10, rpo_alpha=alpha, **FAST),
                        out_dir=tmp_path / str(alpha), ref_model_id="tiny", ref_cache=MemoryRefCache())
        ends[alpha] = [h for h in res.history if h["split"] == "train"][-1]["logps/chosen"]
        assert res.stop_reason == "max steps"
    assert ends[1.0] > ends[0.0] + 1.0
