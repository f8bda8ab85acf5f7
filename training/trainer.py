"""The DPO training loop: one policy in memory, reference log-probs computed once up front.

    model, tok = load_policy("/path/to/hf-model")
    result = train_dpo(model, tok, train_pairs, eval_pairs, TrainerConfig(beta=0.1),
                       out_dir=Path("runs/x"), ref_model_id="smollm2-135m", ref_cache=MemoryRefCache())
    save_model(model, tok, Path("runs/x"))

The reference model is the base model, so before the first update the same weights score
every (prompt, response) once (no grad, sorted by length, big batches) and the numbers go to
the cache (store.RefLogp in the flow). Training then holds the policy alone: no second copy
of the weights, no second forward per step. A rerun on the same pairs finds every reference
log-prob cached and skips that pass. On `resume` the pass runs (if anything is missing) before
the checkpoint's weights are loaded, so it always sees the base weights.

Chosen and rejected of a micro-batch go through one forward (packed), so the step pays the
per-call overhead once and pads both to one width. With `train_batch_tokens` a batch goes through
in forwards of at most that many tokens (same gradients, less activation memory, more time); the
MLP blocks keep less for backward, and freed heap memory goes back to the OS after every step
(training/memory.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import loop
from training.config import TrainerConfig
from training.data import PairExample, RefCache, RefValue, ref_key
from training.logps import ChatEncoder, Encoded, autocast_for, batched_pair_logps, pair_batch, sequence_logps
from training.lora import reference
from training.loss import dpo_loss, pair_metrics
from training.memory import release_freed_memory, training_memory

log = logging.getLogger("cai.dpo")


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in total (including before a resume)
    total_steps: int  # what the schedule was planned for
    resumed_from: int | None  # checkpoint step this run continued from
    stopped_early: bool
    stop_reason: str  # "max steps" | "early stop: ..."
    ref_computed: int  # reference log-probs computed by this run
    ref_reused: int  # found in the cache
    truncated: int  # sequences cut to max_length / max_prompt_length
    n_train: int
    n_eval: int
    final_train: dict[str, float] = field(default_factory=dict)  # last step's metrics
    final_eval: dict[str, float] = field(default_factory=dict)  # last eval's metrics
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "split", **metrics}
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    train_pairs_per_s: float = 0.0  # pairs through the optimizer per second of training

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


MetricsHook = Callable[[int, str, dict[str, float]], None]


def load_policy(path: str | Path, device: str = "auto"):
    """The model in fp32 (master weights) and its tokenizer, on `device` (auto: cuda if present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    return model, tokenizer


def save_model(model, tokenizer, out_dir: Path) -> None:
    """HF format (safetensors + tokenizer + generation config): from_pretrained and vLLM read it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def weights_fingerprint(model) -> str:
    """SHA-256 (16 hex digits) of every parameter and buffer, names included: the identity of weights
    that exist only in memory (the SFT model DPO starts from), for the reference log-prob cache."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _activation_checkpointing(model, on: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*; 4.x has the old names
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


class _Pairs:
    """Encoded pairs with their reference log-probs and per-pair label smoothing, as tensors."""

    def __init__(self, enc: list[tuple[Encoded, Encoded]], ref_c: list[float], ref_r: list[float],
                 eps: list[float]) -> None:
        self.enc = enc
        self.ref_c = torch.tensor(ref_c, dtype=torch.float32)
        self.ref_r = torch.tensor(ref_r, dtype=torch.float32)
        self.eps = torch.tensor(eps, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.enc)


def _label_eps(e: PairExample, cfg: TrainerConfig) -> float:
    if cfg.use_soft_labels and e.method != "revision" and e.label_prob < 1.0:
        return min(0.5, max(0.0, 1.0 - e.label_prob))
    return cfg.label_smoothing


def prepare_pairs(model, encoder: ChatEncoder, examples: Sequence[PairExample], cfg: TrainerConfig,
                  ref_model_id: str, ref_cache: RefCache) -> tuple[_Pairs, int, int, int]:
    """Encode pairs and get their reference log-probs: cached ones read, the rest computed now
    with `model`'s current weights. Returns (pairs, computed, reused, truncated sequences)."""
    enc = [(encoder.encode(e.prompt, e.chosen, e.chosen_ended), encoder.encode(e.prompt, e.rejected, e.rejected_ended))
           for e in examples]
    settings = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "dtype": cfg.dtype}
    keys = [(ref_key(ref_model_id, settings, e.prompt, e.chosen, e.chosen_ended),
             ref_key(ref_model_id, settings, e.prompt, e.rejected, e.rejected_ended)) for e in examples]
    known = ref_cache.get([k for pair in keys for k in pair])
    todo = [i for i, (c, r) in enumerate(keys) if c not in known or r not in known]
    computed: dict[str, RefValue] = {}
    if todo:
        with reference(model):  # LoRA: the base with adapters off; a plain model: itself before training
            values = batched_pair_logps(model, [enc[i] for i in todo], encoder.pad_id, cfg.ref_batch_tokens,
                                        cfg.dtype)
        for i, ((lp_c, n_c), (lp_r, n_r)) in zip(todo, values, strict=True):
            (kc, kr), (ec, er) = keys[i], enc[i]
            for key, lp, n, seq in ((kc, lp_c, n_c, ec), (kr, lp_r, n_r, er)):
                if key not in known:
                    computed[key] = RefValue(lp, n, seq.truncated)
        ref_cache.put(ref_model_id, computed)
        known = {**known, **computed}
    pairs = _Pairs(enc, [known[c].logp for c, _ in keys], [known[r].logp for _, r in keys],
                   [_label_eps(e, cfg) for e in examples])
    truncated = sum(c.truncated + r.truncated for c, r in enc)
    return pairs, len(computed), len({k for pair in keys for k in pair}) - len(computed), truncated


def _pair_forward(model, pairs: _Pairs, idx: list[int], pad_id: int, cfg: TrainerConfig):
    chosen_rejected = [pairs.enc[i] for i in idx]
    with autocast_for(model, cfg.dtype):
        logps, counts = sequence_logps(model, pair_batch(model, chosen_rejected, pad_id))
    pi_c, pi_r = logps[:len(idx)], logps[len(idx):]
    dev = logps.device
    losses, rc, rr = dpo_loss(pi_c, pi_r, pairs.ref_c[idx].to(dev), pairs.ref_r[idx].to(dev), beta=cfg.beta,
                              loss_type=cfg.loss_type, label_smoothing=pairs.eps[idx].to(dev),
                              rpo_alpha=cfg.rpo_alpha, chosen_tokens=counts[:len(idx)])
    tokens = sum(len(c) + len(r) for c, r in chosen_rejected)  # as two sequences, however they were packed
    return losses, rc, rr, pi_c, pi_r, tokens


@torch.no_grad()
def evaluate(model, pairs: _Pairs, pad_id: int, cfg: TrainerConfig) -> dict[str, float]:
    """Held-out metrics under the current weights (no grad, length-sorted batches)."""
    values = batched_pair_logps(model, pairs.enc, pad_id, cfg.ref_batch_tokens, cfg.dtype)
    pi_c = torch.tensor([c for (c, _), _ in values], dtype=torch.float32)
    pi_r = torch.tensor([r for _, (r, _) in values], dtype=torch.float32)
    losses, rc, rr = dpo_loss(pi_c, pi_r, pairs.ref_c, pairs.ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                              label_smoothing=pairs.eps)
    return pair_metrics(losses, rc, rr, pi_c, pi_r)


def train_dpo(model, tokenizer, train: Sequence[PairExample], held_out: Sequence[PairExample],
              cfg: TrainerConfig, *, out_dir: Path, ref_model_id: str, ref_cache: RefCache,
              on_metrics: MetricsHook | None = None, resume: bool = False, meta: dict[str, Any] | None = None,
              logger: logging.Logger | logging.LoggerAdapter | None = None) -> TrainResult:
    """Train `model` in place on `train`; `meta` is stored in every checkpoint (run ids etc.)."""
    if not train:
        raise ValueError("no training pairs")
    logger = logger or log
    t_start = time.perf_counter()
    loop.start(model, cfg.seed)
    encoder = ChatEncoder(tokenizer, cfg.max_length, cfg.max_prompt_length)

    t0 = time.perf_counter()
    train_pairs, c1, r1, tr1 = prepare_pairs(model, encoder, train, cfg, ref_model_id, ref_cache)
    eval_pairs, c2, r2, tr2 = (prepare_pairs(model, encoder, held_out, cfg, ref_model_id, ref_cache)
                               if held_out else (None, 0, 0, 0))
    ref_s = time.perf_counter() - t0
    release_freed_memory()
    logger.info("reference log-probs: %d computed, %d reused from the cache (%.1fs); %d sequences truncated",
                c1 + c2, r1 + r2, ref_s, tr1 + tr2)

    micro_per_step = cfg.grad_accum
    total = loop.total_steps(len(train_pairs), cfg.batch_size, micro_per_step, cfg.epochs, cfg.max_steps)
    eval_every = cfg.eval_every or max(1, total // 10)

    if cfg.gradient_checkpointing:
        _activation_checkpointing(model, True)
    model.train()
    optimizer = loop.optimizer(loop.param_groups(model.parameters(), cfg.lr, cfg.weight_decay), cfg.lr)
    run = loop.begin(model, optimizer, total, cfg, logger, on_metrics=on_metrics,
                     checkpoint_dir=out_dir / "checkpoints", resume=resume, meta=meta)
    scheduler, params, history, stop, ckpt, start = run
    emit = history.emit

    costs = [len(c) + len(r.completion_ids) for c, r in train_pairs.enc]  # one packed row: prompt + both replies
    # the batches the checkpoint already trained on are skipped: a resumed run sees the same data order
    batches = loop.batch_stream(costs, cfg.batch_size, cfg.seed, cfg.length_grouping, skip=start * micro_per_step)
    train_s, stopped_early, step, pairs_trained = 0.0, False, start, 0
    stop_reason = "max steps"
    # MLP blocks keep less for backward (training/memory.py); full checkpointing already keeps nothing
    with training_memory(model, cfg.recompute_mlp and not cfg.gradient_checkpointing):
        for step in range(start + 1, total + 1):
            t_step = time.perf_counter()
            n_pairs, forwards = loop.step_batches(batches, micro_per_step, costs, cfg.train_batch_tokens)
            pairs_trained += n_pairs
            parts, tokens = [], 0
            for idx in forwards:
                losses, rc, rr, pi_c, pi_r, n_tok = _pair_forward(model, train_pairs, idx, encoder.pad_id, cfg)
                (losses.sum() / n_pairs).backward()  # the step's mean over pairs, however it is split
                parts.append((losses.detach(), rc, rr, pi_c.detach(), pi_r.detach()))
                tokens += n_tok
            grad_norm, lr = loop.optimizer_step(params, optimizer, scheduler, cfg.max_grad_norm)
            dt = time.perf_counter() - t_step
            train_s += dt
            metrics = pair_metrics(*(torch.cat([p[i] for p in parts]) for i in range(5)))
            metrics.update({"grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens / dt,
                            "epoch": step * cfg.batch_size * micro_per_step / len(train_pairs)})
            emit(step, "train", metrics)

            held = (lambda: evaluate(model, eval_pairs, encoder.pad_id, cfg)) if eval_pairs is not None else None
            if reason := run.after_step(step, total, eval_every, model, optimizer, held):
                stopped_early, stop_reason = True, reason
                break

    # the optimizer state is twice the model: free it before the caller saves the weights
    del optimizer, scheduler, params, run
    model.zero_grad(set_to_none=True)
    if cfg.gradient_checkpointing:
        _activation_checkpointing(model, False)
    stop_reason += stop.restore(model, step)
    model.eval()
    last = history.last

    return TrainResult(
        steps=step, total_steps=total, resumed_from=ckpt.resumed_from,
        stopped_early=stopped_early, stop_reason=stop_reason, ref_computed=c1 + c2, ref_reused=r1 + r2,
        truncated=tr1 + tr2,
        n_train=len(train_pairs), n_eval=len(eval_pairs) if eval_pairs is not None else 0,
        final_train=last("train"), final_eval=last("eval", stop.best_step if cfg.keep_best else None),
        history=history.rows,
        timings={"ref_s": round(ref_s, 3), "train_s": round(train_s, 3),
                 "total_s": round(time.perf_counter() - t_start, 3)},
        train_pairs_per_s=round(pairs_trained / train_s, 3) if train_s else 0.0)


DPO_PANELS = (("loss", ("loss",)), ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
              ("reward accuracy", ("rewards/accuracies",)), ("log-probs", ("logps/chosen", "logps/rejected")),
              ("grad norm", ("grad_norm",)), ("learning rate", ("lr",)))


def plot_metrics(history: Sequence[dict[str, Any]], path: Path,
                 panels: Sequence[tuple[str, Sequence[str]]] = DPO_PANELS) -> Path | None:
    """Per-step metrics, train and eval, one panel per (title, keys), three panels a row, to one PNG.

    The default panels are the DPO loop's: loss, reward margins/accuracy, log-probs, grad norm, lr.
    """
    if not history:
        return None
    # a bare Figure renders with Agg and leaves pyplot's global backend alone (no display on servers)
    from matplotlib.figure import Figure

    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 4 * rows_n))
    axes = list(fig.subplots(rows_n, cols, squeeze=False).flat)
    for ax in axes[len(panels):]:  # a last row that is not full
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes, panels, strict=False):
        for split, style in (("train", "-"), ("eval", "o--")):  # one colour per metric, eval dashed
            rows = [h for h in history if h["split"] == split]
            for colour, key in enumerate(keys):
                pts = [(h["step"], h[key]) for h in rows if key in h]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, color=f"C{colour}", label=f"{split} {key}", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
