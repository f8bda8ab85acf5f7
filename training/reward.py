"""A Bradley-Terry reward model from preference pairs: the base model with a scalar head.

    model, tok = load_reward_model("/path/to/hf-model")          # + a fresh 1-output head
    result = train_reward(model, tok, train_pairs, held_out, RewardConfig(epochs=2))
    save_reward_model(model, tok, Path("runs/reward"))           # AutoModelForSequenceClassification
    scores = score(model, tok, [(messages, reply), ...], RewardConfig())

The reward of a reply is the head applied to the last hidden state of its final token (the
template's end of turn), read at the last real position of a right-padded row. Training fits
P(chosen beats rejected) = sigmoid(r_c - r_r) to the pair's label: 1 for revision pairs, the
judge's soft label_prob for AI pairs (use_soft_labels), as binary cross-entropy on the margin;
a small (r_c + r_r)^2 term keeps scores centred. Held-out pair accuracy (r_c > r_r) is what
tells whether it learned anything; `cai reward train` prints it. Accumulation (`grad_accum`,
`train_batch_tokens`) and checkpoints (`checkpoint_every`, `resume=True`) work as in DPO: the loop
library's (training/loop.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training import loop
from training.config import RewardConfig
from training.data import PairExample
from training.logps import ChatEncoder, Encoded, autocast_for
from training.lora import apply_lora, backbone, is_peft, merge

log = logging.getLogger("cai.reward")
Message = dict[str, str]


@dataclass
class RewardResult:
    steps: int
    total_steps: int
    n_train: int
    n_eval: int
    stop_reason: str = "max steps"  # or "early stop at step N: ..." (RewardConfig.early_stop_patience)
    best_step: int | None = None  # the lowest held-out loss's step
    final_train: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)  # accuracy, margin, loss on held-out pairs
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    train_pairs_per_s: float = 0.0
    resumed_from: int | None = None  # the checkpoint step this run continued from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_reward_model_dir(path: str | Path) -> bool:
    """Whether `path` holds a trained reward model (a ForSequenceClassification config), as `cai reward
    train` writes it: a causal LM would load too, with a fresh zero head that scores everything 0."""
    import json

    try:
        arch = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        arch = []
    return isinstance(arch, list) and any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                          for a in arch)


def load_reward_model(path: str | Path, device: str = "auto", cfg: RewardConfig | None = None):
    """(model, tokenizer): a saved reward model as it is, or a causal LM with a new zero head
    (every reward starts at 0, so the first loss is ln 2); LoRA on the body when cfg.lora.r > 0."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    config = AutoConfig.from_pretrained(str(path))
    trained = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    if not trained:
        torch.nn.init.zeros_(_head(model).weight)
        if getattr(_head(model), "bias", None) is not None:
            torch.nn.init.zeros_(_head(model).bias)
    model.to(device)
    if cfg is not None and cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, seed=cfg.seed, task_type="SEQ_CLS", modules_to_save=["score"])
    return model, tok


def _head(model):
    return backbone(model).score


def save_reward_model(model, tokenizer, out_dir: Path):
    """A plain HF directory (adapters merged in): AutoModelForSequenceClassification reads it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = merge(model) if is_peft(model) else model
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return plain


def _batch(seqs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per row: the head on the hidden state of the row's last real token."""
    body = backbone(model)
    device = next(body.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden = body.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    last = mask.sum(dim=1) - 1
    picked = hidden[torch.arange(ids.shape[0], device=device), last]
    return _head(model)(picked).squeeze(-1).float()


def _targets(examples: Sequence[PairExample], cfg: RewardConfig) -> torch.Tensor:
    return torch.tensor([e.label_prob if cfg.use_soft_labels and e.method != "revision" else 1.0
                         for e in examples], dtype=torch.float32)


def bt_loss(r_c: torch.Tensor, r_r: torch.Tensor, target: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry loss towards P(chosen wins) = target, plus the centring term."""
    losses = F.binary_cross_entropy_with_logits(r_c - r_r, target.to(r_c.device), reduction="none")
    return losses + center * (r_c + r_r) ** 2 if center else losses


def _metrics(r_c: torch.Tensor, r_r: torch.Tensor, losses: torch.Tensor) -> dict[str, float]:
    return {"loss": float(losses.mean()), "accuracy": float((r_c > r_r).float().mean()),
            "margin": float((r_c - r_r).mean()), "reward/chosen": float(r_c.mean()),
            "reward/rejected": float(r_r.mean())}


@torch.no_grad()
def score_encoded(model, seqs: Sequence[Encoded], pad_id: int, max_batch_tokens: int = 8192,
                  dtype: str = "float32") -> list[float]:
    """Rewards of many sequences: sorted by length, packed under a token budget, in input order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and (j + 1 - i) * len(seqs[order[j]]) <= max_batch_tokens:
                j += 1
            chunk = order[i:j]
            with autocast_for(model, dtype):
                values = rewards(model, _batch([seqs[k] for k in chunk], pad_id))
            for k, v in zip(chunk, values.tolist(), strict=True):
                out[k] = v
            i = j
    finally:
        model.train(was_training)
    return out


def score(model, tokenizer, items: Sequence[tuple[Sequence[Message], str]], cfg: RewardConfig) -> list[float]:
    """Reward of each (prompt messages, reply)."""
    enc = ChatEncoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    return score_encoded(model, [enc.encode(m, r) for m, r in items], enc.pad_id, cfg.ref_batch_tokens, cfg.dtype)


def evaluate_pairs(model, tokenizer, pairs: Sequence[PairExample], cfg: RewardConfig) -> dict[str, float]:
    """Held-out loss, pair accuracy and mean margin under the current weights."""
    items = [(e.prompt, e.chosen) for e in pairs] + [(e.prompt, e.rejected) for e in pairs]
    values = torch.tensor(score(model, tokenizer, items, cfg))
    r_c, r_r = values[:len(pairs)], values[len(pairs):]
    return _metrics(r_c, r_r, bt_loss(r_c, r_r, _targets(pairs, cfg), cfg.center_rewards))


def _optimizer(model, cfg: RewardConfig) -> torch.optim.Optimizer:
    """The body at `lr` (loop.param_groups: no decay on norms and biases), the fresh head at `head_lr`."""
    head_ids = {id(p) for p in _head(model).parameters()}
    body = loop.param_groups((p for p in model.parameters() if id(p) not in head_ids), cfg.lr, cfg.weight_decay)
    head = [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]
    return loop.optimizer(body + ([{"params": head, "lr": cfg.head_lr, "weight_decay": 0.0}] if head else []),
                          cfg.lr)


def train_reward(model, tokenizer, train: Sequence[PairExample], held_out: Sequence[PairExample],
                 cfg: RewardConfig, *, on_metrics: Callable[[int, str, dict[str, float]], None] | None = None,
                 logger: logging.Logger | logging.LoggerAdapter | None = None, checkpoint_dir: Path | None = None,
                 resume: bool = False, meta: dict[str, Any] | None = None) -> RewardResult:
    """Fit `model` (from load_reward_model) in place to the pairs' preferences. Every
    cfg.checkpoint_every steps a checkpoint goes under `checkpoint_dir` (with `meta`: run ids); with
    `resume` the run continues from the newest."""
    if not train:
        raise ValueError("no training pairs")
    t0 = time.perf_counter()
    loop.start(model, cfg.seed)
    enc = ChatEncoder(tokenizer, cfg.max_length, cfg.max_prompt_length)
    encoded = [(enc.encode(e.prompt, e.chosen), enc.encode(e.prompt, e.rejected)) for e in train]
    targets = _targets(train, cfg)
    total = loop.total_steps(len(train), cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.max_steps)
    eval_every = cfg.eval_every or max(1, total // 4)
    model.train()
    opt = _optimizer(model, cfg)
    run = loop.begin(model, opt, total, cfg, logger or log, "reward ", on_metrics, checkpoint_dir=checkpoint_dir,
                     resume=resume, meta=meta)
    sched, params, history, stop, ckpt, start = run
    lengths = [len(c) + len(r) for c, r in encoded]
    batches = loop.batch_stream(lengths, cfg.batch_size, cfg.seed, cfg.length_grouping, skip=start * cfg.grad_accum)
    stop_reason, step, train_s, pairs_seen = "max steps", start, 0.0, 0
    for step in range(start + 1, total + 1):
        t_step = time.perf_counter()
        n_pairs, forwards = loop.step_batches(batches, cfg.grad_accum, lengths, cfg.train_batch_tokens)
        parts = []
        for idx in forwards:
            seqs = [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx]
            with autocast_for(model, cfg.dtype):
                values = rewards(model, _batch(seqs, enc.pad_id))
            r_c, r_r = values[:len(idx)], values[len(idx):]
            losses = bt_loss(r_c, r_r, targets[idx], cfg.center_rewards)
            (losses.mean() * (len(idx) / n_pairs)).backward()  # the step's mean over pairs, however it is split
            parts.append((r_c.detach(), r_r.detach(), losses.detach()))
        grad_norm, lr = loop.optimizer_step(params, opt, sched, cfg.max_grad_norm)
        train_s += time.perf_counter() - t_step
        pairs_seen += n_pairs
        history.emit(step, "train", _metrics(*(torch.cat([p[i] for p in parts]) for i in range(3)))
                     | {"grad_norm": grad_norm, "lr": lr})
        if reason := run.after_step(step, total, eval_every, model, opt,
                                    (lambda: evaluate_pairs(model, tokenizer, held_out, cfg)) if held_out else None,
                                    "reward"):
            stop_reason = reason
            break
    del opt, sched, params, run  # run holds the schedule, which holds the optimizer
    stop_reason += stop.restore(model, step)
    model.eval()
    return RewardResult(steps=step, total_steps=total, n_train=len(train), n_eval=len(held_out),
                        stop_reason=stop_reason, best_step=stop.best_step, final_train=history.last("train"),
                        final_eval=history.last("eval", stop.best_step if cfg.keep_best else None),
                        history=history.rows,
                        timings={"train_s": round(train_s, 3), "total_s": round(time.perf_counter() - t0, 3)},
                        train_pairs_per_s=round(pairs_seen / train_s, 3) if train_s else 0.0,
                        resumed_from=ckpt.resumed_from)
