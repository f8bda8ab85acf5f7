"""The training-loop library: what the SFT, DPO and reward-model loops share, written once.

    loop.start(model, cfg.seed)
    opt = loop.optimizer(loop.param_groups(model.parameters(), cfg.lr, cfg.weight_decay), cfg.lr)
    sched = loop.schedule(opt, total, cfg.warmup_ratio, cfg.scheduler)
    history, stop = loop.History(total, log), loop.EarlyStop(cfg.early_stop_patience, keep_best=True)
    for idx in epoch_batches([len(e) for e in encoded], batch_size=8, seed=cfg.seed + epoch):
        ...loss.backward(); loop.optimizer_step(params, opt, sched, cfg.max_grad_norm)

Each method keeps its own short loop (dpo/sft.py, dpo/trainer.py, dpo/reward.py) built from these.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dpo.memory import release_freed_memory


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, group: int = 8) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle, then rows of similar length batched together within
    windows of `group` batches, then the batches in a seeded order.

    A batch costs its longest row times its size, so a short refusal batched with long answers
    is mostly padding. Sorting within windows removes most of it while every batch still comes
    from a random slice of the data (a global sort would put all the short rows in the same steps)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if group <= 1:  # plain shuffled batches, in the order drawn
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * group
    out: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


# --- the step: optimizer, schedule, clipping ---------------------------------------------------

def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def disable_dropout(model) -> None:
    """Dropout off (LoRA's own stays a setting): with it on, policy != reference at step 0 and the DPO
    loss starts off ln 2 for no reason; SFT and reward-model runs become repeatable."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in name:
            m.p = 0.0


def start(model, seed: int) -> None:
    """What every loop does first: the seed, and dropout off."""
    torch.manual_seed(seed)
    disable_dropout(model)


def param_groups(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable `params`: weight decay on matrices, none on norms and biases."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"params": no_decay, "lr": lr, "weight_decay": 0.0}) if g["params"]]


def optimizer(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW over `groups` (param_groups, or several with their own lr), fused where torch has it:
    one kernel per step and no foreach temporaries the size of the model."""
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def schedule(opt: torch.optim.Optimizer, total: int, warmup_ratio: float, kind: str
             ) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over ceil(warmup_ratio * total) steps, then `kind` decay (linear | cosine | constant)."""
    warmup = math.ceil(warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, kind))


def optimizer_step(params, opt, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Clip (0: no clipping), step, advance the schedule, drop the gradients and give freed heap
    memory back (dpo/memory.py); returns (grad norm before clipping, the lr this step used)."""
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = opt.param_groups[0]["lr"]
    opt.step()
    scheduler.step()
    opt.zero_grad(set_to_none=True)
    release_freed_memory()  # else the heap keeps this step's activations' pages
    return grad_norm, lr


# --- what the loops record, and when they stop ------------------------------------------------

class History:
    """Every train and eval row of a run, each also logged and passed to the caller's hook."""

    def __init__(self, total: int, logger: logging.Logger | logging.LoggerAdapter, prefix: str = "",
                 on_metrics: Callable[[int, str, dict[str, float]], None] | None = None,
                 rows: list[dict[str, Any]] | None = None) -> None:
        self.total, self.logger, self.prefix, self.on_metrics = total, logger, prefix, on_metrics
        self.rows: list[dict[str, Any]] = rows if rows is not None else []

    def emit(self, step: int, split: str, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, "split": split, **metrics})
        if self.on_metrics:
            self.on_metrics(step, split, metrics)
        self.logger.info("%sstep %d/%d %s: %s", self.prefix, step, self.total, split,
                         ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def last(self, split: str, step: int | None = None) -> dict[str, float]:
        """The metrics of the last `split` row (of `step`, when given and recorded)."""
        rows = [h for h in self.rows if h["split"] == split]
        if step is not None:
            rows = [h for h in rows if h["step"] == step] or rows
        return {k: v for k, v in (rows[-1] if rows else {}).items() if k not in ("step", "split")}


MIN_DELTA = 1e-4  # a held-out loss counts as lower only by more than this: noise is not progress


class EarlyStop:
    """Held-out loss tracking: stop after `patience` evals without a lower loss (None: never), and
    with `keep_best` hold a copy of the best eval's weights to restore at the end."""

    def __init__(self, patience: int | None, keep_best: bool = False, best: float = math.inf,
                 best_step: int | None = None, bad: int = 0) -> None:
        self.patience, self.keep_best = patience, keep_best
        self.best, self.best_step, self.bad = best, best_step, bad
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, step: int, loss: float, model) -> bool:
        """Record the eval of `step`; True when training should stop here."""
        if loss < self.best - MIN_DELTA:
            self.best, self.best_step, self.bad = loss, step, 0
            if self.keep_best:
                self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.bad += 1
        return bool(self.patience and self.bad >= self.patience)

    def check(self, history: History, step: int, metrics: dict[str, float], model, name: str = "") -> str | None:
        """Record the eval of `step` in `history`; the stop reason (logged) when training stops here."""
        history.emit(step, "eval", metrics)
        if not self.update(step, metrics["loss"], model):
            return None
        reason = self.reason(step)
        history.logger.info("%s%s", f"{name} " if name else "", reason)
        return reason

    def reason(self, step: int) -> str:
        return (f"early stop at step {step}: held-out loss has not improved on {self.best:.4f} "
                f"(step {self.best_step}) for {self.bad} evals")

    def restore(self, model, last_step: int) -> str:
        """Load the best eval's weights if they are not the last step's; returns what to add to the
        stop reason ("" when nothing was restored)."""
        if not self.keep_best or self._state is None or self.best_step == last_step:
            return ""
        model.load_state_dict(self._state)
        self._state = None
        return f"; kept the weights of step {self.best_step}"
