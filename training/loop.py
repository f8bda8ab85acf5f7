"""The training-loop library: what the SFT, DPO and reward-model loops share, written once.

    loop.start(model, cfg.seed)
    total = loop.total_steps(len(rows), cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    opt = loop.optimizer(loop.param_groups(model.parameters(), cfg.lr, cfg.weight_decay), cfg.lr)
    run = loop.begin(model, opt, total, cfg, log, checkpoint_dir=out / "checkpoints", resume=resume)
    sched, params, history, stop, ckpt, start = run                 # start: 0 unless resuming
    batches = loop.batch_stream(lengths, cfg.batch_size, cfg.seed, skip=start * cfg.grad_accum)
    for step in range(start + 1, total + 1):
        n_rows, forwards = loop.step_batches(batches, cfg.grad_accum, lengths, cfg.train_batch_tokens)
        for idx in forwards: ...(loss summed over idx / n_rows).backward()
        loop.optimizer_step(params, opt, sched, cfg.max_grad_norm)
        if reason := run.after_step(step, total, eval_every, model, opt, evaluate): break

Each method keeps its own short loop (training/sft.py, training/trainer.py, training/reward.py) built from these,
so each gets accumulation under a token budget, checkpoint/resume, keep-best and early stop.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from training.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from training.memory import release_freed_memory


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


def batch_stream(lengths: Sequence[int], batch_size: int, seed: int, group: int = 8,
                 skip: int = 0) -> Iterator[list[int]]:
    """Endless stream of batches, epoch e's from epoch_batches(seed + e): any step's batch follows from
    the seed alone, so a resumed run sees the same data order; `skip` drops what it already trained on."""
    def epochs() -> Iterator[list[int]]:
        for epoch in itertools.count():
            yield from epoch_batches(lengths, batch_size, seed + epoch, group)

    stream = epochs()
    for _ in range(skip):
        next(stream)
    return stream


# --- accumulation: a step's rows in micro-batches, each in forwards under a token budget --------

def total_steps(rows: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps of a run: `max_steps` when set, else `epochs` passes over `rows` at
    batch_size * grad_accum rows a step."""
    return max_steps if max_steps is not None else max(1, epochs * math.ceil(rows / (batch_size * grad_accum)))


def token_split(idx: list[int], costs: Sequence[int], budget: int | None) -> list[list[int]]:
    """`idx` in consecutive parts of at most `budget` tokens each (costs[i]: row i's; a longer row
    goes alone); None: one part."""
    if not budget:
        return [idx]
    parts: list[list[int]] = [[]]
    used = 0
    for i in idx:
        if parts[-1] and used + costs[i] > budget:
            parts.append([])
            used = 0
        parts[-1].append(i)
        used += costs[i]
    return parts


def step_batches(stream: Iterator[list[int]], grad_accum: int, costs: Sequence[int],
                 budget: int | None) -> tuple[int, list[list[int]]]:
    """One optimizer step's data: `grad_accum` micro-batches from `stream`, each cut by token_split
    into forwards; returns (rows in the step, the forwards' index lists in order). A loop divides each
    forward's summed loss by the step's rows (or target tokens) before its backward, so the gradient is
    that of one batch of all those rows, however they went through."""
    micro = [next(stream) for _ in range(grad_accum)]
    return sum(len(m) for m in micro), [part for m in micro for part in token_split(m, costs, budget)]


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
    memory back (training/memory.py); returns (grad norm before clipping, the lr this step used)."""
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

    @property
    def best_weights(self) -> dict[str, torch.Tensor] | None:
        """The copy of the best eval's weights (keep_best), until restore() loads it."""
        return self._state

    def state(self) -> dict[str, Any]:
        """What a checkpoint records of the early stop (its metadata; the best weights go beside)."""
        return {"best_eval": self.best, "best_step": self.best_step, "bad_evals": self.bad}

    def load_state(self, saved: dict[str, Any], best_weights: dict[str, torch.Tensor] | None = None) -> None:
        """Continue from a checkpoint's state(), and with keep_best its copy of the best eval's weights."""
        self.best = saved.get("best_eval", math.inf)
        self.best_step, self.bad = saved.get("best_step"), saved.get("bad_evals", 0)
        self._state = best_weights if self.keep_best else None

    def restore(self, model, last_step: int) -> str:
        """Load the best eval's weights if they are not the last step's; returns what to add to the
        stop reason ("" when nothing was restored)."""
        if not self.keep_best or self._state is None or self.best_step == last_step:
            return ""
        model.load_state_dict(self._state)
        self._state = None
        return f"; kept the weights of step {self.best_step}"


# --- checkpoint/resume ---------------------------------------------------------------------------

class Checkpoints:
    """A loop's checkpoints (training/checkpoint.py) under `root`: one every `every` steps (0 or no root:
    none), the newest `keep` kept on disk. Each holds the weights, optimizer, schedule, RNG, the
    history and the early stop (with keep_best, the best eval's weights too), and `meta` (the run ids
    and settings `--resume` checks). With `resume` the loop continues from the newest one."""

    def __init__(self, root: Path | None = None, every: int = 0, keep: int = 2, resume: bool = False,
                 meta: dict[str, Any] | None = None) -> None:
        self.root, self.every, self.keep, self.resume, self.meta = root, every, keep, resume, meta or {}
        self.resumed_from: int | None = None  # the step the run continued from
        self.finished: dict[str, Any] | None = None  # a finished stage's metadata (save_final), when resumed

    def restore(self, model, opt, sched, history: History, stop: EarlyStop) -> int:
        """With `resume`, load the newest checkpoint into the loop's objects (history rows, early stop);
        returns its step, 0 when there is none. A finished stage's checkpoint (save_final) restores the
        weights and history only and sets `finished`: the loop then trains no further."""
        if not (self.resume and self.root is not None):
            return 0
        found = latest_checkpoint(self.root)
        if not found:
            history.logger.info("--resume: no checkpoint under %s, starting from step 0", self.root)
            return 0
        finished = bool(read_meta(found[0]).get("finished"))
        state = load_checkpoint(found[0], model, None if finished else opt, None if finished else sched)
        saved = state["meta"]
        history.rows[:] = saved.get("history", [])
        stop.load_state(saved, state.get("best_weights"))
        self.resumed_from, self.finished = state["step"], saved if finished else None
        history.logger.info("resumed from %s (step %d of %d%s)", found[0], state["step"], history.total,
                            ", finished" if finished else "")
        return state["step"]

    def due(self, step: int, total: int, stopped: bool) -> bool:
        """Whether to save after `step`: every `every` steps, never after the last (the caller saves the
        model) or a stop."""
        return bool(self.root is not None and self.every and step % self.every == 0 and step < total
                    and not stopped)

    def save(self, step: int, model, opt, sched, history: History, stop: EarlyStop) -> Path:
        assert self.root is not None
        best = {"best_weights": stop.best_weights} if stop.best_weights is not None else None
        meta = {**self.meta, "history": history.rows, **stop.state(), "total_steps": history.total}
        path = save_checkpoint(self.root, step, model, opt, sched, meta, self.keep, best)
        history.logger.info("checkpoint %s", path)
        return path

    def save_final(self, step: int, model, history: History, stop: EarlyStop, **result: Any) -> Path | None:
        """The finished stage's weights (kept-best already restored), history and `result` fields, no
        optimizer: for a stage whose model is saved nowhere else (SFT before DPO), so a resumed run
        skips it. Nothing without a root."""
        if self.root is None:
            return None
        meta = {**self.meta, "history": history.rows, **stop.state(), "total_steps": history.total,
                "finished": True, **result}
        path = save_checkpoint(self.root, step, model, None, None, meta, self.keep)
        history.logger.info("checkpoint %s (stage finished)", path)
        return path


class Loop(NamedTuple):
    """What every loop sets up the same way before its first step (`begin`)."""

    sched: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]  # the trainable ones, for clipping
    history: History
    stop: EarlyStop
    ckpt: Checkpoints
    start: int  # the last step already done: 0, or the resumed checkpoint's step

    def after_step(self, step: int, total: int, every: int, model, opt: torch.optim.Optimizer,
                   evaluate: Callable[[], dict[str, float]] | None, name: str = "") -> str | None:
        """End of `step`: evaluate when due (every `every` steps and the last; early stop may end the
        loop here), then checkpoint when due. Returns the stop reason, None to go on."""
        reason = None
        if evaluate is not None and (step % every == 0 or step == total):
            reason = self.stop.check(self.history, step, evaluate(), model, name)
        if self.ckpt.due(step, total, reason is not None):
            self.ckpt.save(step, model, opt, self.sched, self.history, self.stop)
        return reason


def begin(model, opt: torch.optim.Optimizer, total: int, cfg: Any,
          logger: logging.Logger | logging.LoggerAdapter, prefix: str = "",
          on_metrics: Callable[[int, str, dict[str, float]], None] | None = None, *,
          checkpoint_dir: Path | None = None, resume: bool = False, meta: dict[str, Any] | None = None) -> Loop:
    """The schedule, history, early stop and checkpoints of a loop of `total` steps from its settings
    (`cfg`: warmup_ratio, scheduler, early_stop_patience, keep_best, checkpoint_every,
    keep_checkpoints), restored from the newest checkpoint when resuming."""
    sched = schedule(opt, total, cfg.warmup_ratio, cfg.scheduler)
    history = History(total, logger, prefix, on_metrics)
    stop = EarlyStop(cfg.early_stop_patience, cfg.keep_best)
    ckpt = Checkpoints(checkpoint_dir, cfg.checkpoint_every, cfg.keep_checkpoints, resume, meta)
    start = ckpt.restore(model, opt, sched, history, stop)
    return Loop(sched, [p for p in model.parameters() if p.requires_grad], history, stop, ckpt, start)
