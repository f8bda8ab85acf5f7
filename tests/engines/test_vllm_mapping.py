"""The vllm engine's own logic on any machine, against a stand-in `vllm` module.

The stand-in records what the engine hands to vLLM (LLM settings, token prompts, one
SamplingParams per request) and answers prompt_logprobs with real log-probs from the tiny
transformers model, so choice_logprobs can be compared with the hf engine's. The real vLLM
runs in test_vllm.py (GPU only).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
import torch

import engines
from engines import Sampling
from engines.chat import encode, render, row_seed

SAMPLING_FIELDS = {"n", "temperature", "top_p", "max_tokens", "stop", "stop_token_ids", "seed",
                   "skip_special_tokens", "prompt_logprobs", "detokenize", "repetition_penalty"}


@dataclass
class Logprob:
    logprob: float


class FakeSamplingParams:
    def __init__(self, **kw):
        assert set(kw) <= SAMPLING_FIELDS, f"not a vllm SamplingParams field: {set(kw) - SAMPLING_FIELDS}"
        self.n, self.seed, self.prompt_logprobs = 1, None, None  # vLLM's defaults
        self.__dict__.update(kw)


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kw):
        from transformers import AutoModelForCausalLM

        self.kwargs = kw
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.requests: list[tuple[list[int], FakeSamplingParams]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = prompt["prompt_token_ids"]
            self.requests.append((ids, p))
            plp = None
            if p.prompt_logprobs is not None:
                with torch.no_grad():
                    logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
                plp = [None] + [{t: Logprob(logp[i - 1, t].item())} for i, t in enumerate(ids) if i > 0]
            outs = [types.SimpleNamespace(text=f"reply {j} seed {p.seed}", token_ids=[5] * (j + 1),
                                          finish_reason="length" if j else "stop") for j in range(p.n)]
            out.append(types.SimpleNamespace(outputs=outs, prompt_logprobs=plp))
        return out


class FakePlatform:
    cpu = False

    def is_cpu(self) -> bool:
        return self.cpu


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = FakePlatform()
    mod.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    FakeLLM.instances.clear()
    return mod


@pytest.fixture
def veng(fake_vllm, varied_model_dir):
    from engines.vllm import VLLMEngine

    e = VLLMEngine(str(varied_model_dir), max_context=64, tensor_parallel_size=2)
    yield e
    e.close()


def conv(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def test_llm_settings(veng):
    kw = FakeLLM.instances[0].kwargs
    assert kw["enable_prefix_caching"] is True and kw["max_model_len"] == 64
    assert kw["tensor_parallel_size"] == 2 and kw["gpu_memory_utilization"] == 0.9 and kw["dtype"] == "auto"
    assert "kv_cache_memory_bytes" not in kw
    assert veng.backend == "vllm" and veng.stats.extra["device"] == "cuda"


def test_cpu_settings_chosen_automatically(fake_vllm, varied_model_dir, monkeypatch):
    from engines.vllm import VLLMEngine, cpu_list

    fake_vllm.platforms.current_platform.cpu = True
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    e = VLLMEngine(str(varied_model_dir), max_context=64, kv_cache_gib=1.5)
    kw = FakeLLM.instances[0].kwargs
    assert "gpu_memory_utilization" not in kw and kw["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert kw["dtype"] == "float32"  # CAI_CPU_DTYPE (tests/conftest.py), as the hf engine decides
    assert e.stats.extra["device"] == "cpu"
    import os

    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == cpu_list(sorted(os.sched_getaffinity(0)))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's own binding is kept
    VLLMEngine(str(varied_model_dir), max_context=64, threads=1)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_cpu_list_is_what_vllm_parses():
    from engines.vllm import cpu_list

    assert cpu_list([0, 1]) == "0-1" and cpu_list([5, 0, 1, 2]) == "0-2,5" and cpu_list([3]) == "3"


def test_requests_carry_hf_prompts_and_per_conversation_seeds(veng):
    convs = [conv("Hi"), conv("word " * 100), [{"role": "user", "content": "Q"},
                                                {"role": "assistant", "content": "The answer is:"}]]
    s = Sampling(max_new_tokens=8, n=3, temperature=0.7, top_p=0.9, seed=4, stop=("\n\n",))
    out = veng.generate(convs, s)
    reqs = FakeLLM.instances[0].requests
    assert reqs[0][0] == encode(veng.tokenizer, render(veng.tokenizer, convs[0]))  # the hf engine's ids
    assert reqs[2][0][-3:] == encode(veng.tokenizer, render(veng.tokenizer, convs[2]))[-3:]
    assert out[1].truncated_tokens > 0 and len(reqs[1][0]) == 64 - 8 and veng.stats.truncations == 1
    for c, (_, p) in zip(convs, reqs, strict=True):
        assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop) == (3, 0.7, 0.9, 8, ["\n\n"])
        assert p.seed == row_seed(4, c, 0)
        assert 2 in p.stop_token_ids  # <|im_end|>
    assert [o.finish_reason for o in out[0].outputs] == ["stop", "length", "length"]
    assert [o.completion_tokens for o in out[0].outputs] == [1, 2, 3]


def test_repetition_controls_map_or_are_named(veng, caplog):
    veng.generate([conv("Hi")], Sampling(max_new_tokens=4, repetition_penalty=1.15))
    (_, p), = FakeLLM.instances[0].requests
    assert p.repetition_penalty == 1.15
    with caplog.at_level("WARNING", logger="cai.engines"):  # vLLM has no n-gram ban: said once, not silently
        veng.generate([conv("Hi")], Sampling(max_new_tokens=4, no_repeat_ngram=4))
        veng.generate([conv("Hi")], Sampling(max_new_tokens=4, no_repeat_ngram=4))
    assert sum("no_repeat_ngram" in r.message for r in caplog.records) == 1


def test_greedy_asks_once_and_copies(veng):
    out = veng.generate([conv("Hi")], Sampling(max_new_tokens=4, n=3))
    (_, p), = FakeLLM.instances[0].requests
    assert p.n == 1 and p.seed is None and p.temperature == 0.0
    assert len(out[0].outputs) == 3 and len({o.text for o in out[0].outputs}) == 1
    assert veng.generate([], Sampling()) == []


def test_choice_logprobs_match_the_hf_engine(veng, varied_model_dir):
    convs = [conv("Pick one."), [{"role": "user", "content": "Which?"},
                                 {"role": "assistant", "content": "The answer is:"}]]
    choices = [" (A)", " (B)", " a longer multi token choice"]
    got = veng.choice_logprobs(convs, choices)
    (_, p), *_ = FakeLLM.instances[0].requests
    assert p.max_tokens == 1 and p.prompt_logprobs == 1
    hf = engines.load(str(varied_model_dir), engine="hf", threads=torch.get_num_threads())
    want = hf.choice_logprobs(convs, choices)
    for a, b in zip(got, want, strict=True):
        assert list(a) == choices
        assert a == pytest.approx(b, abs=1e-4)
