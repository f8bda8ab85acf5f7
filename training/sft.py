"""Supervised fine-tuning on (prompt, response) rows: the SL-CAI stage before preference training.

    model, tok = load_policy("/path/to/hf-model")
    result = train_sft(model, tok, train_rows, held_out_rows, SFTConfig(lr=2e-5, epochs=2))

The Constitutional AI recipe fine-tunes the model on its own revised (here: gated, chosen)
replies before RL. The loss is the mean negative log-likelihood of the response tokens (the
prompt is context, not a target). Guards: a held-out slice is scored every `eval_every`
steps; training stops when its loss has not improved for `early_stop_patience` evals, and
with `keep_best` the weights of the best eval are restored at the end. The result records
why training stopped. Accumulation (`grad_accum`, `train_batch_tokens`) and checkpoints
(`checkpoint_every`, `resume=True`) work as in DPO: the loop library's (training/loop.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import loop
from training.config import SFTConfig
from training.logps import ChatEncoder, Encoded, autocast_for, batched_logps, collate, scored_tokens, sequence_logps

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
    resumed_from: int | None = None  # the checkpoint step this run continued from

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
              logger: logging.Logger | logging.LoggerAdapter | None = None, checkpoint_dir: Path | None = None,
              resume: bool = False, meta: dict[str, Any] | None = None, final_checkpoint: bool = False) -> SFTResult:
    """Fine-tune `model` in place on `train`; returns what happened and why it stopped. Every
    cfg.checkpoint_every steps a checkpoint goes under `checkpoint_dir` (with `meta`: run ids); with
    `resume` the run continues from the newest. `final_checkpoint` also saves the finished stage, which
    a resumed run loads instead of training again (SFT before DPO: its model is saved nowhere else)."""
    if not train:
        raise ValueError("no SFT rows to train on")
    t0 = time.perf_counter()
    loop.start(model, cfg.seed)
    enc = ChatEncoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    tr = [enc.encode(e.prompt, e.response, e.ended) for e in train]
    ev = [enc.encode(e.prompt, e.response, e.ended) for e in held_out]
    total = loop.total_steps(len(tr), cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    eval_every = cfg.eval_every or max(1, total // 3)
    model.train()
    frozen = freeze_bottom(model, cfg.freeze_layers)
    opt = loop.optimizer(loop.param_groups(model.parameters(), cfg.lr, cfg.weight_decay), cfg.lr)
    run = loop.begin(model, opt, total, cfg, logger or log, "sft ", on_metrics, checkpoint_dir=checkpoint_dir,
                     resume=resume, meta=meta)
    sched, params, history, stop, ckpt, start = run
    if ev and not start:  # the start is measured; if no step beats it, the start is what keep_best keeps
        first = eval_loss(model, ev, enc.pad_id, cfg)
        history.emit(0, "eval", first)
        stop.update(0, first["loss"], model)
    stop_reason = ckpt.finished["stop_reason"] if ckpt.finished else "max steps"
    end, step = start if ckpt.finished else total, start
    lengths = [len(e) for e in tr]
    batches = loop.batch_stream(lengths, cfg.batch_size, cfg.seed, cfg.length_grouping, skip=start * cfg.grad_accum)
    for step in range(start + 1, end + 1):
        _, forwards = loop.step_batches(batches, cfg.grad_accum, lengths, cfg.train_batch_tokens)
        n = max(sum(scored_tokens(tr[i]) for idx in forwards for i in idx), 1)
        loss = 0.0
        for idx in forwards:
            nll, _ = _nll(model, [tr[i] for i in idx], enc.pad_id, cfg.dtype)
            (nll / n).backward()  # the step's mean over response tokens, however it is split
            loss += float(nll.detach())
        norm, lr = loop.optimizer_step(params, opt, sched, cfg.max_grad_norm)
        history.emit(step, "train", {"loss": loss / n, "grad_norm": norm, "lr": lr,
                                     "epoch": step * cfg.batch_size * cfg.grad_accum / len(tr)})
        if reason := run.after_step(step, total, eval_every, model, opt,
                                    (lambda: eval_loss(model, ev, enc.pad_id, cfg)) if ev else None, "sft"):
            stop_reason = reason
            break
    del opt, sched, params, run  # run holds the schedule, which holds the optimizer
    for p in frozen:  # what trains next (DPO, adapters) decides for itself
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    stop_reason += stop.restore(model, step)
    if final_checkpoint and not ckpt.finished:
        ckpt.save_final(step, model, history, stop, stop_reason=stop_reason)
    model.eval()
    kept = stop.best_step if cfg.keep_best else None
    return SFTResult(steps=step, total_steps=total, stop_reason=stop_reason, best_step=stop.best_step,
                     n_train=len(tr), n_eval=len(ev), truncated=sum(e.truncated for e in tr + ev),
                     final_train=history.last("train"), final_eval=history.last("eval", kept),
                     history=history.rows, timings={"train_s": round(time.perf_counter() - t0, 3)},
                     resumed_from=ckpt.resumed_from)
