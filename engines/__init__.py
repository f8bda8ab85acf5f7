"""Text generation and scoring backends behind one interface (see engines/base.py).

    from engines import load, Sampling
    eng = load()                                   # bundled SmolLM2-135M-Instruct, hf on CPU
    eng = load("/models/llama-8b", engine="vllm", tensor_parallel_size=2)

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

ENGINES = ("hf", "vllm", "auto")

# Settings each backend takes. A config written for one backend still loads on the other
# (engine: auto picks by machine), so settings meant for the other backend are dropped with a
# log line instead of failing; a setting neither knows is an error.
HF_SETTINGS = {"device", "dtype", "max_batch_tokens", "max_batch_size", "prefix_reuse", "min_prefix_tokens",
               "max_context", "threads"}
VLLM_SETTINGS = {"dtype", "tensor_parallel_size", "gpu_memory_utilization", "kv_cache_gib", "threads", "max_context",
                 "enable_prefix_caching", "seed", "llm_kwargs"}


def vllm_usable() -> bool:
    """vllm is installed and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def load(spec: str = DEFAULT_SPEC, engine: str = "auto", **settings) -> Engine:
    """An engine for `spec`: a bundled alias ("smollm2-135m"), a local HF directory, a .gguf file or a hub id.

    engine: "hf" (transformers), "vllm" (GPU), or "auto" (vllm when usable, else hf).
    Raises ModelNotFound when the spec cannot be resolved or loaded.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    unknown = set(settings) - HF_SETTINGS - VLLM_SETTINGS
    if unknown:
        raise TypeError(f"unknown engine setting(s) {sorted(unknown)}; hf takes {sorted(HF_SETTINGS)}, "
                        f"vllm takes {sorted(VLLM_SETTINGS)}")
    if engine == "auto":
        engine = "vllm" if vllm_usable() else "hf"
    allowed = HF_SETTINGS if engine == "hf" else VLLM_SETTINGS
    if ignored := sorted(set(settings) - allowed):
        log.info("engine %s ignores settings meant for the other backend: %s", engine, ignored)
    kwargs = {k: v for k, v in settings.items() if k in allowed}
    if engine == "hf":
        from engines.hf import HFEngine

        return HFEngine(spec, **kwargs)
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError("engine 'vllm' needs the vllm package: pip install 'cai-factory[vllm]' "
                                  "(on a machine with a CUDA GPU), or use engine='hf'")
    from engines.vllm import VLLMEngine

    return VLLMEngine(spec, **kwargs)
