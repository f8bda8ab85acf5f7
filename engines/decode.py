"""The hf engine's decode loop: left-padded batches on a KV cache, shared-prefix reuse, per-row sampling.

Layout of one batch in the KV cache (P = shared prefix, S = longest suffix):

    [ prefix tokens (P, identical for every row) | left pads | row suffix ] + generated tokens

The attention mask is 0 on the pads and 1 elsewhere; position ids are the running count of
unmasked tokens, so every row sees positions 0, 1, 2, ... exactly as if it ran alone. The
prefix is computed once (batch of 1) and its keys/values are copied over the batch, which is
what makes a long shared few-shot block cheap.

Used by engines/hf.py; nothing here knows about chat templates or Completion objects.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), batch 1


@dataclass
class Row:
    ids: list[int]  # prompt tokens, already truncated to fit
    max_new: int  # tokens this row may generate (0 = none)
    generator: torch.Generator | None = None  # None = greedy


@dataclass
class Result:
    tokens: list[int]  # generated ids, without the end-of-turn token that stopped the row
    finish_reason: str  # "stop" | "length"
    n_generated: int  # tokens produced, the stopping end-of-turn token included


@functools.cache
def _cache_arg(model_type: type) -> str:
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(model) -> str:
    """The forward() keyword for the KV cache: `cache` from transformers 5.x (where the old
    `past_key_values` still works but warns on every call), `past_key_values` before."""
    return _cache_arg(type(model))


class PrefixStore:
    """KV caches of token prefixes computed during one call; a longer prefix extends a shorter one.

    `root` is the prefix every prompt of the call shares; it is computed once, on first use,
    and kept. Batch-specific extensions of it are evicted oldest first beyond `keep`, since
    each costs ~50 KB per token for a 135M model.
    """

    def __init__(self, model, root: list[int] | None = None, keep: int = 4) -> None:
        self.model = model
        self.root = root or []
        self.keep = keep
        self.entries: dict[tuple[int, ...], KV] = {}  # insertion order = age
        self.usable = True  # false for models whose cache is not plain full-attention layers

    def get(self, tokens: list[int]) -> KV | None:
        key = tuple(tokens)
        if self.root and len(key) > len(self.root) and tuple(self.root) not in self.entries:
            self.get(self.root)  # later batches extend it instead of recomputing it
        if key in self.entries:
            if key != next(iter(self.entries)):  # the root stays first; others move to the young end
                self.entries[key] = self.entries.pop(key)
            return self.entries[key]
        if not self.usable:
            return None
        base = max((k for k in self.entries if len(k) < len(key) and key[: len(k)] == k), key=len, default=())
        cache = DynamicCache(self.entries[base]) if base else DynamicCache(config=self.model.config)
        ids = torch.tensor([list(key[len(base):])], device=self.model.device)
        # no mask needed: one row, no padding; positions continue after the cached part
        self.model(input_ids=ids, **{cache_arg(self.model): cache}, use_cache=True, logits_to_keep=1)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            self.usable = False  # sliding-window / hybrid caches cannot be spliced this way
            return None
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.entries[key] = kv
        while len(self.entries) > self.keep + 1:
            del self.entries[list(self.entries)[1]]  # the oldest after the root
        return kv


class AppendLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into spare room instead of re-concatenating.

    DynamicLayer.update does torch.cat of the whole cache for every generated token, copying
    all cached keys and values each step (quadratic traffic, ~10% of a batched CPU decode).
    Here the buffer is sized once for prompt + `room` new tokens; keys/values are views of it.
    """

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self.used = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        n = key_states.shape[-2]
        if self._k is None or self.used + n > self._k.shape[-2]:
            self._grow(key_states, value_states, self.used + n + self.room)
        self._k[..., self.used:self.used + n, :] = key_states
        self._v[..., self.used:self.used + n, :] = value_states
        self.used += n
        self._views()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, size: int) -> None:
        b, h, _, d = key_states.shape
        k = key_states.new_empty((b, h, size, d))
        v = value_states.new_empty((b, h, size, value_states.shape[-1]))
        if self.used:
            k[..., : self.used, :] = self._k[..., : self.used, :]
            v[..., : self.used, :] = self._v[..., : self.used, :]
        self._k, self._v = k, v

    def _views(self) -> None:
        self.keys = self._k[..., : self.used, :]
        self.values = self._v[..., : self.used, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()


def new_cache(model, room: int, prefix: KV | None = None, batch: int = 1) -> Cache:
    """A cache with room for `room` more tokens per row, optionally holding `prefix` for every row."""
    layers = DynamicCache(config=model.config).layers  # what transformers would use for this model
    if not all(type(layer) is DynamicLayer for layer in layers):
        # sliding-window / hybrid models keep their own layers (PrefixStore never serves them)
        return DynamicCache(config=model.config)
    cache = Cache(layers=[AppendLayer(room) for _ in layers])
    if prefix is not None:
        for i, (k, v) in enumerate(prefix):
            cache.layers[i].update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
    return cache


def positions(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Position ids of the last `width` columns: count of real tokens before each one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -width:]


def forward(model, tokens: torch.Tensor, mask: torch.Tensor, cache: Cache, keep: int = 1):
    """One forward over a [B, S] segment appended to `cache`; `mask` spans cache + segment."""
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions(mask, tokens.shape[1]),
                **{cache_arg(model): cache}, use_cache=True, logits_to_keep=keep)
    return out.logits


def prefill(model, rows: list[list[int]], pad_id: int, prefix: KV | None, prefix_len: int,
            room: int, keep: int = 1) -> tuple[Cache, torch.Tensor, torch.Tensor]:
    """Run the prompts; returns (cache, attention mask, logits of the last `keep` positions)."""
    device = model.device
    b = len(rows)
    suffixes = [r[prefix_len:] for r in rows]
    width = max(len(s) for s in suffixes)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    pad_mask = torch.zeros((b, width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        if s:
            tokens[i, width - len(s):] = torch.tensor(s)
            pad_mask[i, width - len(s):] = 1
    tokens, pad_mask = tokens.to(device), pad_mask.to(device)
    # the prefix is copied once into every row; the room then covers the suffixes and the reply
    cache = new_cache(model, room + (width if prefix is not None else 0), prefix, b)
    if prefix is not None:
        mask = torch.cat([torch.ones((b, prefix_len), dtype=torch.long, device=device), pad_mask], dim=1)
    else:
        mask = pad_mask
    logits = forward(model, tokens, mask, cache, keep=keep)
    return cache, mask, logits


NUCLEUS_HEAD = 256  # top-p looks at this many best tokens first; a full sort only when they fall short


def _draw(probs: torch.Tensor, ids: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative mass exceeds u * total."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1)
    return pick.squeeze(-1) if ids is None else ids.gather(-1, pick).squeeze(-1)


def _nucleus(vals: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sorted probabilities with every token past the smallest head of mass >= top_p zeroed."""
    return vals.masked_fill((vals.cumsum(-1) - vals) >= top_p, 0.0)


def _choose(logits: torch.Tensor, rows: list[Row], temperature: float, top_p: float) -> list[int]:
    """Next token per row: argmax when greedy, else a draw from that row's own generator.

    Each row draws exactly one uniform number per step from its own generator, and every
    tensor op here works row by row, so a row's tokens depend only on its seed and logits,
    never on the other rows of the batch. (torch.multinomial was avoided: it draws one random
    number per vocabulary entry, ~50k per token, and is slow on CPU.)
    """
    if temperature <= 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = torch.stack([torch.rand((), generator=r.generator, device=probs.device) for r in rows])
    if top_p >= 1.0:
        return _draw(probs, None, u).tolist()
    out = torch.empty(len(rows), dtype=torch.long, device=probs.device)
    vals, ids = probs.topk(min(NUCLEUS_HEAD, probs.shape[-1]), dim=-1)
    short = vals.sum(-1) < top_p  # rows whose nucleus is wider than the head need a full sort
    if (~short).any():
        out[~short] = _draw(_nucleus(vals[~short], top_p), ids[~short], u[~short])
    if short.any():
        vals, ids = probs[short].sort(-1, descending=True)
        out[short] = _draw(_nucleus(vals, top_p), ids, u[short])
    return out.tolist()


class Repetition:
    """Per-row repetition controls with Hugging Face's semantics, over prompt + generated tokens.

    penalty: every token id already seen has its logit divided by the penalty when positive and
    multiplied by it when negative. ngram: a token that would complete an n-gram already present
    is banned. Both work row by row, so a row's text never depends on its batch neighbours.
    """

    def __init__(self, rows: list[Row], penalty: float, ngram: int) -> None:
        self.penalty, self.ngram = penalty, ngram
        self.seqs = [list(r.ids) for r in rows]
        self.seen = [set(r.ids) for r in rows] if penalty != 1.0 else []
        self.tables: list[dict[tuple[int, ...], set[int]]] = []
        if ngram > 0:
            for seq in self.seqs:
                table: dict[tuple[int, ...], set[int]] = {}
                for k in range(len(seq) - ngram + 1):
                    table.setdefault(tuple(seq[k:k + ngram - 1]), set()).add(seq[k + ngram - 1])
                self.tables.append(table)

    @property
    def active(self) -> bool:
        return self.penalty != 1.0 or self.ngram > 0

    def push(self, i: int, tok: int) -> None:
        seq = self.seqs[i]
        seq.append(tok)
        if self.seen:
            self.seen[i].add(tok)
        if self.ngram > 0 and len(seq) >= self.ngram:
            self.tables[i].setdefault(tuple(seq[-self.ngram:-1]), set()).add(tok)

    def apply(self, logits: torch.Tensor, live: list[int]) -> torch.Tensor:
        logits = logits.float().clone()
        for slot, i in enumerate(live):
            row = logits[slot]
            if self.seen:
                idx = torch.tensor(sorted(self.seen[i]), device=row.device, dtype=torch.long)
                vals = row[idx]
                row[idx] = torch.where(vals > 0, vals / self.penalty, vals * self.penalty)
            if self.ngram > 0 and len(self.seqs[i]) >= self.ngram - 1:
                banned = self.tables[i].get(tuple(self.seqs[i][len(self.seqs[i]) - self.ngram + 1:]))
                if banned:
                    row[torch.tensor(sorted(banned), device=row.device, dtype=torch.long)] = float("-inf")
        return logits


def decode(model, rows: list[Row], *, pad_id: int, stop_ids: set[int], temperature: float, top_p: float,
           stop_texts: tuple[str, ...] = (), tokenizer=None, prefix: KV | None = None,
           prefix_len: int = 0, repetition_penalty: float = 1.0, no_repeat_ngram: int = 0) -> list[Result]:
    """Generate for one batch of rows; finished rows leave the batch so they stop costing compute."""
    results: list[Result | None] = [None] * len(rows)
    live = [i for i, r in enumerate(rows) if r.max_new > 0]
    for i, r in enumerate(rows):
        if r.max_new <= 0:
            results[i] = Result([], "length", 0)
    if not live:
        return results  # type: ignore[return-value]
    room = max(rows[i].max_new for i in live)
    cache, mask, logits = prefill(model, [rows[i].ids for i in live], pad_id, prefix, prefix_len, room)
    logits = logits[:, -1]
    generated: list[list[int]] = [[] for _ in rows]
    rep = Repetition(rows, repetition_penalty, no_repeat_ngram)
    while True:
        if rep.active:
            logits = rep.apply(logits, live)
        chosen = _choose(logits, [rows[i] for i in live], temperature, top_p)
        keep: list[int] = []
        for slot, (i, tok) in enumerate(zip(live, chosen, strict=True)):
            gen = generated[i]
            gen.append(tok)
            if rep.active:
                rep.push(i, tok)
            if tok in stop_ids:
                results[i] = Result(gen[:-1], "stop", len(gen))
            elif stop_texts and _hit_stop(tokenizer, gen, stop_texts):
                results[i] = Result(gen, "stop", len(gen))
            elif len(gen) >= rows[i].max_new:
                results[i] = Result(gen, "length", len(gen))
            else:
                keep.append(slot)
        if not keep:
            break
        tokens = torch.tensor([[chosen[s]] for s in keep], device=mask.device)
        if len(keep) < len(live):
            idx = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(idx)
            mask = mask[idx]
            live = [live[s] for s in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        logits = forward(model, tokens, mask, cache)[:, -1]
    return results  # type: ignore[return-value]


def _hit_stop(tokenizer, generated: list[int], stop_texts: tuple[str, ...]) -> bool:
    # a stop string can span token boundaries, so look at the decoded tail; the tail is long
    # enough for any stop string (a token decodes to at least one character, or to nothing)
    longest = max(len(s) for s in stop_texts)
    tail = tokenizer.decode(generated[-(longest + 8):], skip_special_tokens=True)
    return any(s and s in tail for s in stop_texts)


def score_choices(model, prompts: list[list[int]], choices: list[list[int]], pad_id: int,
                  prefix: KV | None, prefix_len: int) -> torch.Tensor:
    """Sum of log p(choice tokens | prompt) for every (prompt, choice): a [len(prompts), len(choices)] tensor.

    The prompt runs once per conversation; its cache is then repeated once per choice and the
    choice tokens (left-padded to the longest choice) run as one more segment.
    """
    b, c = len(prompts), len(choices)
    longest = max(len(ch) for ch in choices)
    cache, mask, logits = prefill(model, prompts, pad_id, prefix, prefix_len, room=longest)
    first = torch.log_softmax(logits[:, -1].float(), dim=-1)  # predicts each choice's first token
    first_ids = torch.tensor([ch[0] for ch in choices], device=first.device)
    scores = first[:, first_ids]  # [b, c]
    if longest == 1:
        return scores
    width = longest - 1  # the last choice token is only ever predicted, never fed in
    cache.batch_repeat_interleave(c)
    seg = torch.full((c, width), pad_id, dtype=torch.long)
    seg_mask = torch.zeros((c, width), dtype=torch.long)
    targets = torch.zeros((c, width), dtype=torch.long)
    valid = torch.zeros((c, width), dtype=torch.bool)
    for j, ch in enumerate(choices):
        m = len(ch) - 1
        if m:
            seg[j, width - m:] = torch.tensor(ch[:-1])
            seg_mask[j, width - m:] = 1
            targets[j, width - m:] = torch.tensor(ch[1:])
            valid[j, width - m:] = True
    device = mask.device
    seg, seg_mask, targets, valid = (t.to(device).repeat(b, 1) for t in (seg, seg_mask, targets, valid))
    full_mask = torch.cat([mask.repeat_interleave(c, dim=0), seg_mask], dim=1)
    out = forward(model, seg, full_mask, cache, keep=0)  # [b*c, width, vocab]
    logp = torch.log_softmax(out.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rest = torch.where(valid, logp, 0.0).sum(-1).view(b, c)
    return scores + rest
