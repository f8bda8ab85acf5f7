"""Supervised fine-tuning on (prompt, response) rows: the SL-CAI stage before preference training.

    model, tok = load_policy("/path/to/hf-model")
    result = train_sft(model, tok, train_rows, held_out_rows, SFTConfig(lr=2e-5, epochs=2))

The Constitutional AI recipe fine-tunes the model on its own revised (here: gated, chosen)
replies before RL. The loss is the mean negative log-likelihood of the response tokens (the
prompt is context, not a target). Guards: a held-out slice is scored every `eval_every`
steps; training stops when its loss has not improved for `early_stop_patience` evals, and
with `keep_best` the weights of the best eval are restored at the end. The result records
why training stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo.config import SFTConfig
from dpo.logps import ChatEncoder, Encoded, autocast_for, batched_logps, collate, sequence_logps
from dpo.loop import epoch_batches
from dpo.trainer import _disable_dropout, _optimizer, lr_factor, optimizer_step

log = logging.getLogger("cai.sft")


@dataclass(frozen=True)
class SFTExample:
    id: str
    prompt: list[dict[str, str]]
    response: str
    kind: str = ""  # e.g. harmful / benign: counted in the run's data selection
    ended: bool = True  # False: the token limit cut this reply; no end-of-turn is learned after it


@dataclass
class SFTResult:
    steps: int
    total_steps: int
    stop_reason: str  # "max steps" | "early stop (...)"
    best_step: int | None
    n_train: int
    n_eval: int
    truncated: int
    final_train: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)  # the kept (best) eval when keep_best
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def freeze_bottom(model, layers: int) -> list[torch.nn.Parameter]:
    """Stop training the input embeddings and the bottom `layers` decoder layers (their parameters
    get requires_grad False, so autograd stops above them); returns what was frozen. With tied
    embeddings the output head is the same tensor and stays as it is too."""
    if layers <= 0:
        return []
    decoder = model.get_decoder()
    blocks = list(decoder.layers)
    if layers > len(blocks):
        raise ValueError(f"freeze_layers {layers}: the model has {len(blocks)} decoder layers")
    frozen = [p for p in decoder.embed_tokens.parameters() if p.requires_grad]
    for block in blocks[:layers]:
        frozen += [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _nll(model, seqs: Sequence[Encoded], pad_id: int, dtype: str) -> tuple[torch.Tensor, int]:
    """Summed NLL of the response tokens of `seqs` and how many tokens that is."""
    with autocast_for(model, dtype):
        logps, counts = sequence_logps(model, collate(seqs, pad_id))
    return -logps.sum(), int(counts.sum())


def eval_loss(model, seqs: Sequence[Encoded], pad_id: int, cfg: SFTConfig) -> dict[str, float]:
    """Held-out mean token NLL (and perplexity), in length-sorted batches under a token budget."""
    values = batched_logps(model, seqs, pad_id, cfg.ref_batch_tokens, cfg.dtype)
    tokens = sum(n for _, n in values)
    loss = -sum(lp for lp, _ in values) / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(tokens)}


def train_sft(model, tokenizer, train: Sequence[SFTExample], held_out: Sequence[SFTExample], cfg: SFTConfig, *,
              on_metrics: Callable[[int, str, dict[str, float]], None] | None = None,
              logger: logging.Logger | logging.LoggerAdapter | None = None) -> SFTResult:
    """Fine-tune `model` in place on `train`; returns what happened and why it stopped."""
    if not train:
        raise ValueError("no SFT rows to train on")
    logger = logger or log
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    _disable_dropout(model)
    enc = ChatEncoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    tr = [enc.encode(e.prompt, e.response, e.ended) for e in train]
    ev = [enc.encode(e.prompt, e.response, e.ended) for e in held_out]
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = cfg.max_steps or max(1, cfg.epochs * steps_per_epoch)
    warmup = math.ceil(cfg.warmup_ratio * total)
    eval_every = cfg.eval_every or max(1, total // 3)
    model.train()
    frozen = freeze_bottom(model, cfg.freeze_layers)
    opt = _optimizer(model, cfg)  # reads lr and weight_decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.scheduler))
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, Any]] = []

    def emit(step: int, split: str, metrics: dict[str, float]) -> None:
        history.append({"step": step, "split": split, **metrics})
        if on_metrics:
            on_metrics(step, split, metrics)
        logger.info("sft step %d/%d %s: %s", step, total, split, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    best, best_step, best_state, bad = math.inf, None, None, 0
    if ev:
        first = eval_loss(model, ev, enc.pad_id, cfg)
        emit(0, "eval", first)
        best, best_step = first["loss"], 0
        if cfg.keep_best:  # if no step beats the start, the start is what is kept
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stop_reason, step, epoch, batches = "max steps", 0, -1, []
    lengths = [len(e) for e in tr]
    for step in range(1, total + 1):
        if not batches:
            epoch += 1
            batches = epoch_batches(lengths, cfg.batch_size, cfg.seed + epoch, cfg.length_grouping)
        idx = batches.pop(0)
        nll, n = _nll(model, [tr[i] for i in idx], enc.pad_id, cfg.dtype)
        (nll / max(n, 1)).backward()
        norm, lr = optimizer_step(params, opt, sched, cfg.max_grad_norm)
        emit(step, "train", {"loss": float(nll.detach()) / max(n, 1), "grad_norm": norm, "lr": lr,
                             "epoch": step * cfg.batch_size / len(tr)})
        if ev and (step % eval_every == 0 or step == total):
            m = eval_loss(model, ev, enc.pad_id, cfg)
            emit(step, "eval", m)
            if m["loss"] < best - 1e-4:
                best, best_step, bad = m["loss"], step, 0
                if cfg.keep_best:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if cfg.early_stop_patience and bad >= cfg.early_stop_patience:
                    stop_reason = (f"early stop: held-out loss has not improved on {best:.4f} (step {best_step}) "
                                   f"for {bad} evals")
                    logger.info("sft %s", stop_reason)
                    break
    del opt, sched, params
    for p in frozen:  # what trains next (DPO, adapters) decides for itself
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    if cfg.keep_best and best_state is not None and best_step != step:
        model.load_state_dict(best_state)
        stop_reason += f"; kept the weights of step {best_step}"
    model.eval()

    def last(split: str) -> dict[str, float]:
        rows = [h for h in history if h["split"] == split]
        if split == "eval" and cfg.keep_best and best_step is not None:
            rows = [h for h in rows if h["step"] == best_step] or rows
        return {k: v for k, v in (rows[-1] if rows else {}).items() if k not in ("step", "split")}

    return SFTResult(steps=step, total_steps=total, stop_reason=stop_reason, best_step=best_step,
                     n_train=len(tr), n_eval=len(ev), truncated=sum(e.truncated for e in tr + ev),
                     final_train=last("train"), final_eval=last("eval"), history=history,
                     timings={"train_s": round(time.perf_counter() - t0, 3)})

