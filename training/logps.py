"""Sequence log-probs of chat completions, tokenized exactly as the model saw them when generating.

    enc = ChatEncoder(tokenizer, max_length=512, max_prompt_length=256)
    chosen, rejected = enc.encode(messages, "No."), enc.encode(messages, "Sure, ...")
    logps, n_tokens = sequence_logps(model, collate([chosen, rejected], enc.pad_id))
    logps, n_tokens = sequence_logps(model, collate_pairs([(chosen, rejected)], enc.pad_id))  # same numbers

The prompt is the chat template rendered with `add_generation_prompt=True` (what the engines
send), and the completion is the response text followed by whatever the template writes after
an assistant message (for SmolLM2 `<|im_end|>\\n`), so the policy also learns where to stop.
The two halves are tokenized separately, as generation produced them, not re-merged.

Only completion tokens count: prompt and padding are masked. The LM head runs on those
positions alone; on a 49k vocabulary it is a fifth of the model's FLOPs and the largest
activation, and most positions of a short answer to a templated prompt are prompt.

`collate_pairs` packs a pair as one row, prompt + chosen + rejected, with position ids that
restart the rejected answer right after the prompt and an attention mask that hides the
chosen answer from it: the same numbers as two separate rows (tested), but the prompt, often
most of the tokens, goes through the model once instead of twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.lora import backbone

# Config attributes of models whose head is more than a plain Linear (soft-capping, scaling):
# those take the model's own forward, which applies them.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                "logits_scaling")
# Above this many logit elements per chunk (1 GiB in fp32) the head is recomputed in backward
# instead of keeping all logits alive.
_LOGIT_CHUNK_ELEMENTS = 1 << 28
# Without grad (the reference pass, evals) nothing is recomputed, so chunks cost nothing: 128 MiB
# of fp32 logits at a time instead of a whole big batch's logits and log-softmax. (It did not
# move bench/dpo.py's LoRA peak, 2008 -> 2011 MB: that peak is elsewhere.)
_NO_GRAD_CHUNK_ELEMENTS = 1 << 25
_PROBE = "\u2063cai-probe\u2063"
SHARE_PREFIX = True  # run a batch's common leading tokens once (see _hidden); tests switch it off to compare
MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a second forward call


@dataclass(frozen=True)
class Encoded:
    """One (prompt, response) as token ids; `truncated` if either half was cut to fit."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def end_of_turn_text(tokenizer) -> str:
    """What the chat template writes after an assistant message's content (eos if it cannot tell)."""
    probe = [{"role": "user", "content": "hi"}]
    try:
        gen = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        answered = probe + [{"role": "assistant", "content": _PROBE}]
        full = tokenizer.apply_chat_template(answered, tokenize=False)
    except Exception:  # noqa: BLE001 - no usable template: plain eos is the best guess
        return tokenizer.eos_token or ""
    if full.startswith(gen) and _PROBE in full[len(gen):]:
        return full[len(gen):].split(_PROBE, 1)[1]
    return tokenizer.eos_token or ""


class ChatEncoder:
    """Renders and tokenizes (prompt messages, response) pairs; caches prompts (chosen and
    rejected share one)."""

    def __init__(self, tokenizer, max_length: int = 1024, max_prompt_length: int = 512) -> None:
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length "
                             f"({max_length}), or no completion token would fit")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: set tokenizer.chat_template to the one "
                             "the answers were generated with (flows/train.py uses the engines' fallback)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.end_of_turn = end_of_turn_text(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._prompts: dict[str, tuple[int, ...]] = {}

    def prompt_ids(self, messages: Sequence[dict]) -> tuple[int, ...]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        if text not in self._prompts:
            # the template already wrote every special token; a second BOS would differ from generation
            self._prompts[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._prompts[text]

    def completion_ids(self, response: str, ended: bool = True) -> tuple[int, ...]:
        text = response + self.end_of_turn if ended else response
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, messages: Sequence[dict], response: str, ended: bool = True) -> Encoded:
        """`ended=False`: a reply the token limit cut, scored without the end-of-turn after it."""
        prompt = self.prompt_ids(messages)
        completion = self.completion_ids(response, ended)
        truncated = False
        if len(prompt) > self.max_prompt_length:  # the end of a prompt is what the answer responds to
            prompt = prompt[-self.max_prompt_length:]
            truncated = True
        room = self.max_length - len(prompt)
        if len(completion) > room:  # the start of an answer is what sets its direction
            completion = completion[:room]
            truncated = True
        return Encoded(prompt, completion, truncated)


# A batch is input_ids + attention mask (2-D padding mask, or a 4-D mask for packed pairs),
# optional position_ids, and the scored tokens as flat lists: the hidden state at
# (src_row, src_col) predicts `target`, which belongs to output sequence `seq`.

def _scored(rows: list[int], cols: list[int], targets: list[int], seq: list[int], row: int, src: range,
            ids: Sequence[int], out: int) -> None:
    rows.extend([row] * len(ids))
    cols.extend(src)
    targets.extend(ids)
    seq.extend([out] * len(ids))


def scored_tokens(s: Encoded) -> int:
    """How many tokens of `s` collate scores: its response (less its first token without a prompt)."""
    return len(s) - max(len(s.prompt_ids), 1)


def collate(seqs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded row per sequence; output i is sequence i."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    seq: list[int] = []
    for i, s in enumerate(seqs):
        n_p, n = len(s.prompt_ids), len(s)
        input_ids[i, :n] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        first = max(n_p, 1)  # token 0 has nothing before it to predict it
        ids = s.prompt_ids + s.completion_ids
        _scored(rows, cols, targets, seq, i, range(first - 1, n - 1), ids[first:n], i)
    return _finish(input_ids, attention_mask, None, rows, cols, targets, seq, len(seqs),
                   min(len(s.prompt_ids) for s in seqs) - 1)


def collate_pairs(pairs: Sequence[tuple[Encoded, Encoded]], pad_id: int, additive_mask: bool = False
                  ) -> dict[str, torch.Tensor]:
    """One row per pair, prompt + chosen + rejected; outputs are [chosen..., rejected...].

    The rejected answer gets the positions it would have right after the prompt and cannot
    attend to the chosen answer, so each answer sees exactly prompt + itself. `additive_mask`
    gives a float 0/-inf mask (eager attention) instead of a boolean one (SDPA).
    """
    n_pairs = len(pairs)
    lengths = []
    for c, r in pairs:
        if c.prompt_ids != r.prompt_ids:
            raise ValueError("collate_pairs needs chosen and rejected encoded from the same prompt")
        lengths.append(len(c) + len(r.completion_ids))
    width = max(lengths)
    input_ids = torch.full((n_pairs, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_pairs, width), dtype=torch.long)
    allowed = torch.zeros((n_pairs, width, width), dtype=torch.bool)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    seq: list[int] = []
    for i, ((c, r), n) in enumerate(zip(pairs, lengths, strict=True)):
        p, nc, nr = len(c.prompt_ids), len(c.completion_ids), len(r.completion_ids)
        input_ids[i, :n] = torch.tensor(c.prompt_ids + c.completion_ids + r.completion_ids, dtype=torch.long)
        position_ids[i, :p + nc] = torch.arange(p + nc)
        position_ids[i, p + nc:n] = torch.arange(p, p + nr)
        block = torch.ones((n, n), dtype=torch.bool).tril_()
        block[p + nc:, p:p + nc] = False  # rejected never sees chosen
        allowed[i, :n, :n] = block
        allowed[i, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding sees itself: no empty row
        if p == 0:  # no prompt: the first token of each answer has nothing to be predicted from
            raise ValueError("collate_pairs needs a non-empty prompt")
        _scored(rows, cols, targets, seq, i, range(p - 1, p + nc - 1), c.completion_ids, i)
        # the first rejected token is predicted from the last prompt token, the rest from their left neighbour
        src = [p - 1] + list(range(p + nc, p + nc + nr - 1)) if nr else []
        _scored(rows, cols, targets, seq, i, src, r.completion_ids, n_pairs + i)  # type: ignore[arg-type]
    mask = allowed[:, None]
    if additive_mask:
        mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
    return _finish(input_ids, mask, position_ids, rows, cols, targets, seq, 2 * n_pairs,
                   min(len(c.prompt_ids) for c, _ in pairs) - 1)


def shared_prefix(input_ids: torch.Tensor, limit: int) -> int:
    """How many leading tokens every row has in common (at most `limit`), or 0 when too few rows
    or tokens share it to be worth a separate forward."""
    if input_ids.shape[0] < 2 or limit < MIN_SHARED_PREFIX:
        return 0
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(dim=0)
    n = int(same.long().cumprod(0).sum())
    return n if n >= MIN_SHARED_PREFIX else 0


def _finish(input_ids, attention_mask, position_ids, rows, cols, targets, seq, n_out, prefix_limit: int = 0
            ) -> dict[str, torch.Tensor]:
    def longs(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long)

    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "src_rows": longs(rows),
             "src_cols": longs(cols), "targets": longs(targets), "seq": longs(seq),
             "n_out": torch.tensor(n_out), "prefix_len": torch.tensor(shared_prefix(input_ids, prefix_limit))}
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


def can_pack_pairs(model) -> bool:
    """Packing needs a custom 4-D attention mask: SDPA or eager attention, no sliding window."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return (getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager")
            and getattr(cfg, "sliding_window", None) is None
            and not getattr(cfg, "use_sliding_window", False))


def _plain_head(model) -> bool:
    """True if logits = lm_head(last hidden state), so the head can run on chosen positions only."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _HEAD_EXTRAS):
        return False
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear) and getattr(model, "base_model", model) is not model


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # log-softmax over 50k+ entries in bf16 loses the small differences DPO trains on
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _token_logps(head: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(_at_least_fp32(head(hidden)), targets, reduction="none")


def _cache_kwarg(decoder) -> str:
    """transformers renamed the forward's `past_key_values` to `cache` (5.2x); either works here."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _hidden(decoder, inputs: dict[str, torch.Tensor], prefix: int) -> tuple[torch.Tensor, int]:
    """(last hidden states, the column they start at). With `prefix` > 0 every row of the batch
    begins with the same tokens (the chat template's system turn and the user header: a quarter of a
    short chat row): they go through the model once, as one row, and every row attends to that one
    copy through the KV cache. Gradients flow back through the cache into the single prefix pass, so
    loss and gradients are those of the full batch; the compute of the prefix is paid once."""
    if not prefix or not SHARE_PREFIX:
        return decoder(**inputs).last_hidden_state, 0
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if getattr(decoder, "gradient_checkpointing", False) and decoder.training:
        return decoder(**inputs).last_hidden_state, 0  # checkpointed layers keep no cache to share
    head = decoder(input_ids=ids[:1, :prefix], use_cache=True)
    cache = getattr(head, "cache", None) or getattr(head, "past_key_values", None)
    if cache is None:  # a model that returns no cache: the ordinary forward
        return decoder(**inputs).last_hidden_state, 0
    cache.batch_repeat_interleave(ids.shape[0])
    rest = {"input_ids": ids[:, prefix:], _cache_kwarg(decoder): cache, "use_cache": True,
            # the suffix's queries against every key: the prefix's columns and its own
            "attention_mask": mask[:, :, prefix:, :] if mask.dim() == 4 else mask}
    if "position_ids" in inputs:
        rest["position_ids"] = inputs["position_ids"][:, prefix:]
    else:
        rest["position_ids"] = torch.arange(prefix, ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    return decoder(**rest).last_hidden_state, prefix


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the scored tokens per output sequence, and how many each has."""
    model = backbone(model)  # a PeftModel's own base_model is the LoRA wrapper, not the decoder
    device = next(model.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device),
              "attention_mask": batch["attention_mask"].to(device), "use_cache": False}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device)
    if inputs["attention_mask"].dim() == 4 and inputs["attention_mask"].is_floating_point():
        inputs["attention_mask"] = inputs["attention_mask"].to(next(model.parameters()).dtype)
    rows, cols = batch["src_rows"].to(device), batch["src_cols"].to(device)
    targets, seq = batch["targets"].to(device), batch["seq"].to(device)
    if _plain_head(model):
        hidden, offset = _hidden(model.base_model, inputs, int(batch.get("prefix_len", 0)))
        picked = hidden[rows, cols - offset]
        head = model.get_output_embeddings()
        chunk = max(1, _LOGIT_CHUNK_ELEMENTS // head.out_features)
        if not torch.is_grad_enabled():
            small = max(1, min(_LOGIT_CHUNK_ELEMENTS, _NO_GRAD_CHUNK_ELEMENTS) // head.out_features)
            token_logps = torch.cat([_token_logps(head, picked[i:i + small], targets[i:i + small])
                                     for i in range(0, picked.shape[0], small)])
        elif picked.shape[0] <= chunk:
            token_logps = _token_logps(head, picked, targets)
        else:
            from torch.utils.checkpoint import checkpoint

            token_logps = torch.cat([
                checkpoint(_token_logps, head, picked[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, picked.shape[0], chunk)])
    else:
        logits = model(**inputs).logits
        token_logps = -F.cross_entropy(_at_least_fp32(logits[rows, cols]), targets, reduction="none")
    n_out = int(batch["n_out"])
    logps = torch.zeros(n_out, device=device, dtype=token_logps.dtype).index_add(0, seq, token_logps)
    counts = torch.zeros(n_out, device=device, dtype=torch.long).index_add(0, seq, torch.ones_like(seq))
    return logps, counts


def pair_batch(model, pairs: Sequence[tuple[Encoded, Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed pairs where the model allows it, else chosen and rejected as separate rows."""
    if can_pack_pairs(model) and all(c.prompt_ids == r.prompt_ids for c, r in pairs):
        eager = model.config._attn_implementation == "eager"
        return collate_pairs(pairs, pad_id, additive_mask=eager)
    return collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def autocast_for(model, dtype: str):
    """bf16 autocast around forward passes; the weights and the optimizer stay fp32. `auto`: bf16
    where the measured probe says it is faster on this device (engines/precision.py)."""
    if dtype == "auto":
        from engines.precision import resolve

        dtype = resolve("auto", next(model.parameters()).device)
    if dtype in ("float32", "fp32"):
        return nullcontext()
    if dtype in ("bfloat16", "bf16"):
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")


@torch.no_grad()
def batched_pair_logps(model, pairs: Sequence[tuple[Encoded, Encoded]], pad_id: int,
                       max_batch_tokens: int = 8192, dtype: str = "float32"
                       ) -> list[tuple[tuple[float, int], tuple[float, int]]]:
    """((chosen logp, tokens), (rejected logp, tokens)) per pair, in input order; no grad.

    For reference log-probs and eval: pairs sorted by length and packed under a token budget,
    so padding stays small and one long pair does not force tiny batches on all the others.
    """
    was_training = model.training
    model.eval()
    size = [len(c) + len(r.completion_ids) for c, r in pairs]
    order = sorted(range(len(pairs)), key=lambda i: size[i], reverse=True)
    out: list = [None] * len(pairs)
    start = 0
    try:
        while start < len(order):
            # longest first: the first pair of a batch sets its padded width
            end = start + max(1, max_batch_tokens // max(size[order[start]], 1))
            idx = order[start:end]
            with autocast_for(model, dtype):
                logps, n = sequence_logps(model, pair_batch(model, [pairs[i] for i in idx], pad_id))
            lp, nn = logps.tolist(), n.tolist()
            for j, i in enumerate(idx):
                out[i] = ((float(lp[j]), int(nn[j])), (float(lp[len(idx) + j]), int(nn[len(idx) + j])))
            start = end
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def batched_logps(model, seqs: Sequence[Encoded], pad_id: int, max_batch_tokens: int = 8192,
                  dtype: str = "float32") -> list[tuple[float, int]]:
    """(summed log-prob of the completion tokens, how many) per sequence, in input order; no grad.

    Longest first under a token budget, like batched_pair_logps; used for held-out SFT loss and
    for the eval's drift figure (each reply's log-prob under the base model).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    out: list = [None] * len(seqs)
    start = 0
    try:
        while start < len(order):
            end = start + max(1, max_batch_tokens // max(len(seqs[order[start]]), 1))
            idx = order[start:end]
            with autocast_for(model, dtype):
                logps, n = sequence_logps(model, collate([seqs[i] for i in idx], pad_id))
            for j, i in enumerate(idx):
                out[i] = (float(logps[j]), int(n[j]))
            start = end
    finally:
        model.train(was_training)
    return out
