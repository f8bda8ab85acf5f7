"""The vllm engine's contract (same as the hf tests), on a tiny bf16 model. Needs CUDA and vllm.

    .venv/bin/python -m pytest tests/engines/test_vllm.py -q -m gpu
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import engines
from engines import Sampling
from engines.chat import encode, render


def _usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _usable(), reason="needs a CUDA GPU and vllm")]


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """A random Llama like the shared tiny one but with head_dim 64, which every vLLM attention
    backend supports (the shared fixture's head_dim 16 is not), stored in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("vllm-tiny")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eng(vllm_model_dir):
    e = engines.load(str(vllm_model_dir), engine="vllm", gpu_memory_utilization=0.3, max_context=512,
                     llm_kwargs={"enforce_eager": True})
    yield e
    e.close()


QUESTIONS = ["Why is the sky blue?", "Name a prime number.", "How do magnets work, in detail please?", "Hi"]


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def test_backend_and_empty(eng):
    assert eng.backend == "vllm"
    assert eng.generate([], Sampling()) == []
    assert eng.choice_logprobs([], ["(A)"]) == []


def test_order_preserved_and_greedy_reproducible(eng):
    # bf16 vLLM is not batch-invariant, so a text comparison across batch shapes could flip a
    # near-tie; prompt lengths identify each result's conversation exactly instead
    convs = [conv(q) for q in QUESTIONS]
    s = Sampling(max_new_tokens=8)
    out = eng.generate(convs, s)
    lengths = [len(encode(eng.tokenizer, render(eng.tokenizer, c))) for c in convs]
    assert [c.prompt_tokens for c in out] == lengths
    assert len({c.prompt_tokens for c in out}) == len(convs)
    assert [c.text for c in eng.generate(convs, s)] == [c.text for c in out]


def test_n_outputs_and_seeded_sampling(eng):
    s = Sampling(max_new_tokens=8, n=3, temperature=1.0, top_p=0.9, seed=5)
    a = eng.generate([conv("Hello"), conv("Bye")], s)
    assert [len(c.outputs) for c in a] == [3, 3]
    again = eng.generate([conv("Hello"), conv("Bye")], s)
    assert [[o.text for o in c.outputs] for c in again] == [[o.text for o in c.outputs] for c in a]
    other = eng.generate([conv("Hello"), conv("Bye")], Sampling(**{**s.to_dict(), "seed": 6, "stop": ()}))
    assert [o.text for c in other for o in c.outputs] != [o.text for c in a for o in c.outputs]
    g = eng.generate([conv("Hello")], Sampling(max_new_tokens=8, n=2))[0]
    assert len(g.outputs) == 2 and g.outputs[0].text == g.outputs[1].text


def test_choice_logprobs_and_truncation(eng):
    c = [{"role": "user", "content": "Pick one."}, {"role": "assistant", "content": "The answer is:"}]
    scores = eng.choice_logprobs([c, conv("word " * 600)], [" (A)", " (B)", " a longer choice"])
    assert all(list(d) == [" (A)", " (B)", " a longer choice"] for d in scores)
    assert all(v <= 0 for d in scores for v in d.values())
    out = eng.generate([conv("word " * 600)], Sampling(max_new_tokens=4))[0]
    assert out.truncated_tokens > 0 and out.prompt_tokens + 4 <= 512
    assert eng.stats.truncations >= 2


def test_stop_strings(eng):
    full = eng.generate([conv(QUESTIONS[2])], Sampling(max_new_tokens=16))[0]
    if len(full.text) < 6:
        pytest.skip("reply too short to pick a stop string from")
    stop = full.text[len(full.text) // 2:][:3]
    cut = eng.generate([conv(QUESTIONS[2])], Sampling(max_new_tokens=16, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.outputs[0].finish_reason == "stop"
