"""Small pieces both backends share, so hf and vllm see byte-identical prompts and seeds.

    from engines.chat import render, row_seed, cut_at_stop
    text = render(tokenizer, [{"role": "user", "content": "Hi"}])

Rendering is the tokenizer's own chat template. A conversation whose last message is the
assistant's is rendered with `continue_final_message=True` (no end-of-turn after it, no new
assistant header), so the model continues that text; any other conversation gets the
assistant header (`add_generation_prompt=True`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

# Used only when a tokenizer ships without a chat template (base models, some GGUF exports).
# ChatML is what SmolLM2, Qwen and many small instruct models were tuned on, and its markers
# are plain text for tokenizers that lack them, so it degrades to a readable transcript.
# It honours both `add_generation_prompt` and `continue_final_message` (transformers finds the
# final message's content in the rendered text and cuts everything after it).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# End-of-turn markers of common chat formats: generation stops on any of these that the
# tokenizer knows as a single token, in addition to the model's configured EOS ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _check(conversation: Any, index: int) -> None:
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"conversation {index} must be a non-empty list of {{'role', 'content'}} messages, "
                         f"got {conversation!r:.80}")
    for m, msg in enumerate(conversation):
        if not isinstance(msg, dict) or "role" not in msg or not isinstance(msg.get("content"), str):
            raise ValueError(f"conversation {index}, message {m}: expected {{'role': str, 'content': str}}, "
                             f"got {msg!r:.80}")


def render(tokenizer, conversation: list[dict[str, str]], index: int = 0) -> str:
    """The prompt text for one conversation (chat template of the tokenizer, or ChatML)."""
    _check(conversation, index)
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
    continue_final = conversation[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        conversation, chat_template=template, tokenize=False,
        add_generation_prompt=not continue_final, continue_final_message=continue_final,
    )


def ensure_chat_template(tokenizer) -> None:
    """Give a template-less tokenizer the fallback, in place: training renders with the tokenizer's own
    template, so it sees the text the engines render, and the saved tokenizer then carries it."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def encode(tokenizer, text: str) -> list[int]:
    # the template already wrote every special token it wants; a second BOS would shift logits
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer, *extra: Any) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS, `extra` ids (int or list), chat markers."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, *extra):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple, set)):
            ids.update(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


def check_sampling(sampling) -> None:
    """Reject settings both backends would otherwise treat differently (or silently mangle)."""
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"Sampling.top_p must be in (0, 1]; got {sampling.top_p}")
    if sampling.temperature < 0:
        raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy); got {sampling.temperature}")
    if sampling.n < 1 or sampling.max_new_tokens < 0:
        raise ValueError(f"Sampling.n must be >= 1 and max_new_tokens >= 0; got n={sampling.n}, "
                         f"max_new_tokens={sampling.max_new_tokens}")
    if sampling.repetition_penalty <= 0 or sampling.no_repeat_ngram < 0:
        raise ValueError(f"Sampling.repetition_penalty must be > 0 and no_repeat_ngram >= 0; got "
                         f"{sampling.repetition_penalty}, {sampling.no_repeat_ngram}")


def row_seed(seed: int, conversation: list[dict[str, str]], j: int) -> int:
    """A 63-bit seed for output j of one conversation.

    Derived from the content, not the position in the call, so a sampled reply does not
    change when other prompts are added, removed or batched differently (resumed runs and
    several workers produce the same rows).
    """
    key = json.dumps([seed, conversation, j], sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def truncate_left(ids: list[int], keep: int) -> tuple[list[int], int]:
    """The last `keep` tokens of `ids` and how many were dropped (the instructions at the end survive)."""
    keep = max(1, keep)
    if len(ids) <= keep:
        return ids, 0
    return ids[len(ids) - keep:], len(ids) - keep


def encode_prompts(tokenizer, conversations: list, max_context: int, reserve: int,
                   stats=None) -> tuple[list[list[int]], list[int]]:
    """Token ids per conversation, left-truncated so `reserve` tokens still fit the context.

    Returns (ids, tokens dropped per conversation); truncations are counted in `stats` and
    logged once per call, never fatal."""
    ids, dropped = [], []
    for i, conv in enumerate(conversations):
        toks, cut = truncate_left(encode(tokenizer, render(tokenizer, conv, i)), max_context - reserve)
        ids.append(toks)
        dropped.append(cut)
    if n := sum(1 for d in dropped if d):
        if stats is not None:
            stats.truncations += n
        log.warning("%d of %d prompts exceed the context (%d tokens, %d kept for the reply) and lost "
                    "%d tokens from the left", n, len(conversations), max_context, reserve, sum(dropped))
    return ids, dropped


def common_prefix_len(rows: list[list[int]]) -> int:
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n
