"""The transformers engine: CPU by default, GPU when CUDA is present.

    from engines import load, Sampling
    eng = load("smollm2-135m", engine="hf", max_batch_tokens=16384)
    eng.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=32))

A call is split into batches: prompts are sorted by length and packed under a token budget
(`max_batch_tokens`, counting prompt + max_new_tokens per row, which bounds the KV cache),
generated with our own KV-cache loop (engines/decode.py), and returned in input order.
Our own loop rather than `model.generate` because it gives (a) one random stream per row, so
seeded samples do not depend on which other prompts share the batch, and (b) shared-prefix
reuse: the few-shot block that starts every critique/revision prompt runs once per call.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engines.base import Completion, Conversation, EngineStats, Output, Sampling, record_usage
from engines.bundled import ALIASES, DEFAULT_SPEC, ModelNotFound, is_adapter_dir, resolve
from engines.chat import (
    check_sampling,
    common_prefix_len,
    cut_at_stop,
    encode,
    encode_prompts,
    end_of_turn_ids,
    row_seed,
)
from engines.decode import PrefixStore, Row, decode, score_choices
from engines.precision import cpu_bf16_speedup, pick_dtype  # noqa: F401 - cpu_bf16_speedup: re-exported

log = logging.getLogger(__name__)

# the dtype probe lives in engines/precision.py (training reads it too); these names stay for callers
_pick_dtype = pick_dtype


def pack(lengths: list[int], extra: int, max_tokens: int, max_rows: int, weight: int = 1) -> list[list[int]]:
    """Indices grouped into batches, longest first, each under `max_tokens`.

    A batch costs rows * weight * (longest prompt + extra): padding makes every row as long as
    the longest, and that is what the KV cache holds. Sorting keeps padding small; a row that
    alone exceeds the budget still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            cur = batches[-1]
            cost = (len(cur) + 1) * weight * (lengths[cur[0]] + extra)
            if len(cur) < max_rows and cost <= max_tokens:
                cur.append(i)
                continue
        batches.append([i])
    return batches


class HFEngine:
    backend = "hf"

    def __init__(
        self,
        spec: str = DEFAULT_SPEC,
        *,
        device: str | None = None,  # None: cuda when available, else cpu
        dtype: str = "auto",  # auto: bf16 (or fp16) on GPU; on CPU bf16 where it is faster, else fp32
        max_batch_tokens: int = 16384,  # (prompt + new tokens) x rows per batch; bounds KV memory
        max_batch_size: int = 64,  # rows per batch; past ~64 a 2-core CPU gains nothing
        prefix_reuse: bool = True,  # run a batch's shared token prefix once and copy its KV cache
        min_prefix_tokens: int = 16,  # shorter shared prefixes are not worth the copy
        max_context: int | None = None,  # prompt + reply limit; default: the model's max positions
        threads: int | None = None,  # CPU threads; default: all cores
        loaded: tuple | None = None,  # (model, tokenizer) already in memory: see `from_model`
    ) -> None:
        self.model_id = DEFAULT_SPEC if spec.lower() in ALIASES else spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.dtype = _pick_dtype(dtype, self.device)
        if loaded is not None:
            self.model, self.tokenizer = loaded
        else:
            self._load(spec)
        self.model.to(self.device).eval()
        self._setup(max_context, max_batch_tokens, max_batch_size, prefix_reuse, min_prefix_tokens)

    @classmethod
    def from_model(cls, model, tokenizer, name: str = "in-memory", **kwargs) -> HFEngine:
        """An engine around a model already in memory (the training loop's, say), without saving it
        first. By default it stays in its own dtype and on its own device, and is put in eval
        mode; the caller restores train mode if it trains on."""
        param = next(model.parameters())
        kwargs.setdefault("device", str(param.device))
        kwargs.setdefault("dtype", str(param.dtype).removeprefix("torch."))
        return cls(name, loaded=(model, tokenizer), **kwargs)

    def _load(self, spec: str) -> None:
        path = resolve(spec)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            if is_adapter_dir(path):  # a LoRA run's output: base + adapter, merged once for fast decoding
                from peft import AutoPeftModelForCausalLM

                self.model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=self.dtype).merge_and_unload()
            else:
                self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype)
        except OSError as exc:
            raise ModelNotFound(
                f"cannot load model {spec!r}: it is not a bundled alias ({', '.join(sorted(ALIASES))}), "
                f"not a local HF model directory or .gguf file, and loading it as a hub id failed ({exc}). "
                f"Pass '{DEFAULT_SPEC}', a directory with config.json, or a .gguf path.") from exc

    def _setup(self, max_context, max_batch_tokens, max_batch_size, prefix_reuse, min_prefix_tokens) -> None:
        tok = self.tokenizer
        if tok.pad_token_id is None:  # decoder-only tokenizers often have none; eos is never attended
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.stop_ids = end_of_turn_ids(tok, self.model.config.get_text_config().eos_token_id,
                                        self.model.generation_config.eos_token_id)
        cfg = self.model.config.get_text_config()
        self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", None) or 2048)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.prefix_reuse = prefix_reuse
        self.min_prefix_tokens = min_prefix_tokens
        self.stats = EngineStats()
        self.stats.extra.update(batches=0, prefix_tokens_reused=0, dtype=str(self.dtype).removeprefix("torch."),
                                device=self.device.type)
        log.info("hf engine: %s on %s, %s%s", self.model_id, self.device.type, self.stats.extra["dtype"],
                 f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else "")

    # ---- prompts -------------------------------------------------------------------------

    def _prompts(self, conversations: list[Conversation], reserve: int) -> tuple[list[list[int]], list[int]]:
        return encode_prompts(self.tokenizer, conversations, self.max_context, reserve, self.stats)

    def _prefix(self, store: PrefixStore, rows: list[list[int]]):
        """(KV, length) of the prefix every row of a batch shares, or (None, 0) when not worth it."""
        if not self.prefix_reuse or len(rows) < 2:
            return None, 0
        # every row keeps at least one token of its own: its last logits come from that token
        n = min(common_prefix_len(rows), min(len(r) for r in rows) - 1)
        if n < self.min_prefix_tokens:
            return None, 0
        kv = store.get(rows[0][:n])
        if kv is None:
            return None, 0
        self.stats.extra["prefix_tokens_reused"] += (len(rows) - 1) * n
        return kv, n

    def _store(self, prompts: list[list[int]]) -> PrefixStore:
        """A prefix store rooted at the prefix of the whole call, which each batch's own extends."""
        root: list[int] = []
        if self.prefix_reuse and len(prompts) > 1:
            n = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
            if n >= self.min_prefix_tokens:
                root = prompts[0][:n]
        return PrefixStore(self.model, root)

    # ---- public API ----------------------------------------------------------------------

    def generate(self, conversations: list[Conversation], sampling: Sampling) -> list[Completion]:
        check_sampling(sampling)
        if not conversations:
            return []
        t0 = time.perf_counter()
        prompts, dropped = self._prompts(conversations, sampling.max_new_tokens)
        greedy = sampling.temperature <= 0
        draws = 1 if greedy else sampling.n  # greedy outputs are identical: compute once, copy n times
        rows, owner = [], []
        for i, ids in enumerate(prompts):
            max_new = max(0, min(sampling.max_new_tokens, self.max_context - len(ids)))
            for j in range(draws):
                gen = None
                if not greedy:
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed(row_seed(sampling.seed, conversations[i], j))
                rows.append(Row(ids, max_new, gen))
                owner.append((i, j))
        outputs: list[list[Output | None]] = [[None] * draws for _ in conversations]
        with torch.inference_mode():
            store = self._store(prompts)
            batches = pack([len(r.ids) for r in rows], sampling.max_new_tokens, self.max_batch_tokens,
                           self.max_batch_size)
            for batch in batches:
                prefix, plen = self._prefix(store, [rows[k].ids for k in batch])
                results = decode(self.model, [rows[k] for k in batch], pad_id=self.pad_id,
                                 stop_ids=self.stop_ids, temperature=sampling.temperature,
                                 top_p=sampling.top_p, stop_texts=sampling.stop, tokenizer=self.tokenizer,
                                 prefix=prefix, prefix_len=plen,
                                 repetition_penalty=sampling.repetition_penalty,
                                 no_repeat_ngram=sampling.no_repeat_ngram)
                for k, res in zip(batch, results, strict=True):
                    text = self.tokenizer.decode(res.tokens, skip_special_tokens=True)
                    text, hit = cut_at_stop(text, sampling.stop)
                    i, j = owner[k]
                    outputs[i][j] = Output(text, res.n_generated, "stop" if hit else res.finish_reason)
        completions = []
        for i, outs in enumerate(outputs):
            full = [replace(outs[j % draws]) for j in range(sampling.n)]  # copies, not aliases
            completions.append(Completion(outputs=full, prompt_tokens=len(prompts[i]),
                                          truncated_tokens=dropped[i]))
        self.stats.calls += 1
        self.stats.extra["batches"] += len(batches)
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.completion_tokens += sum(o.completion_tokens for c in completions for o in c.outputs)
        self.stats.seconds += time.perf_counter() - t0
        record_usage("local:hf", self.model_id, requests=len(conversations),
                     prompt_tokens=sum(len(p) for p in prompts),
                     completion_tokens=sum(o.completion_tokens for c in completions for o in c.outputs))
        return completions

    def choice_logprobs(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[dict[str, float]]:
        """log p(choice | rendered conversation) for every choice, as sums over the choice's tokens.

        Choice tokens are the choice string tokenized on its own and appended to the prompt's
        tokens (so " (A)" and "(A)" are different choices; pass exactly what should follow).
        """
        if not conversations:
            return []
        if not choices:
            return [{} for _ in conversations]
        t0 = time.perf_counter()
        choice_ids = [encode(self.tokenizer, ch) for ch in choices]
        if empty := [ch for ch, ids in zip(choices, choice_ids, strict=True) if not ids]:
            raise ValueError(f"choices must tokenize to at least one token; got {empty!r}")
        longest = max(len(c) for c in choice_ids)
        prompts, _ = self._prompts(conversations, longest)
        out: list[dict[str, float]] = [{} for _ in conversations]
        with torch.inference_mode():
            store = self._store(prompts)
            batches = pack([len(p) for p in prompts], longest, self.max_batch_tokens, self.max_batch_size,
                           weight=len(choices))
            for batch in batches:
                prefix, plen = self._prefix(store, [prompts[k] for k in batch])
                scores = score_choices(self.model, [prompts[k] for k in batch], choice_ids, self.pad_id,
                                       prefix, plen).tolist()
                for k, row in zip(batch, scores, strict=True):
                    out[k] = {ch: float(s) for ch, s in zip(choices, row, strict=True)}
        self.stats.calls += 1
        self.stats.extra["batches"] += len(batches)
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.seconds += time.perf_counter() - t0
        record_usage("local:hf", self.model_id, requests=len(conversations),
                     prompt_tokens=sum(len(p) for p in prompts))
        return out

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
