"""`cai train` and `cai reward ...`: DPO (and SFT) on the selected pairs, and a Bradley-Terry reward
model on the same selection (flows/train.py, flows/reward.py).

    cai train --stage sft+dpo --lora-r 16 --out runs/harmless-cai
    cai reward train --out runs/reward && cai reward score --model runs/reward --input replies.jsonl

Options, defaults and help come from the flow configs through `opt` (flows/cli/options.py).
flows/cli/__init__.py registers the commands, in the order `cai --help` lists them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cai.errors import UserError
from flows.cli.common import check_writable, console, guarded, preflight_model, split_commas
from flows.cli.options import configured, opt
from flows.cli.render import esc
from flows.configs import RewardScoreConfig, RewardTrainConfig, TrainConfig
from flows.orchestration import run_flow

reward_app = typer.Typer(help="A Bradley-Terry reward model on the store's pairs.", no_args_is_help=True)


@guarded
@configured(TrainConfig)
def train(
    cfg: TrainConfig,
    base: str | None = opt(TrainConfig, "base"),
    stage: str | None = opt(TrainConfig, "stage"),
    constitution: str | None = opt(TrainConfig, "constitution"),
    method: list[str] | None = opt(TrainConfig, "methods", "--method", convert=split_commas),
    status: list[str] | None = opt(TrainConfig, "statuses", "--status", convert=split_commas),
    min_label_prob: float | None = opt(TrainConfig, "min_label_prob"),
    reviewed: str | None = opt(TrainConfig, "reviewed"),
    people_order: bool | None = opt(TrainConfig, "people_order", "--people-order"),
    soft_labels: bool | None = opt(TrainConfig, "trainer.use_soft_labels", "--soft-labels/--hard-labels"),
    dataset: str | None = opt(TrainConfig, "dataset"),
    split: str | None = opt(TrainConfig, "dataset_split", "--split"),
    limit: int | None = opt(TrainConfig, "limit"),
    beta: float | None = opt(TrainConfig, "trainer.beta", "--beta"),
    loss_type: str | None = opt(TrainConfig, "trainer.loss_type", "--loss-type"),
    epochs: int | None = opt(TrainConfig, "trainer.epochs", "--epochs"),
    max_steps: int | None = opt(TrainConfig, "trainer.max_steps", "--max-steps"),
    lr: float | None = opt(TrainConfig, "trainer.lr", "--lr"),
    batch_size: int | None = opt(TrainConfig, "trainer.batch_size", "--batch-size"),
    grad_accum: int | None = opt(TrainConfig, "trainer.grad_accum", "--grad-accum"),
    scheduler: str | None = opt(TrainConfig, "trainer.scheduler", "--scheduler"),
    warmup_ratio: float | None = opt(TrainConfig, "trainer.warmup_ratio", "--warmup-ratio"),
    max_length: int | None = opt(TrainConfig, "trainer.max_length", "--max-length"),
    max_prompt_length: int | None = opt(TrainConfig, "trainer.max_prompt_length", "--max-prompt-length"),
    dtype: str | None = opt(TrainConfig, "trainer.dtype", "--dtype"),
    seed: int | None = opt(TrainConfig, "trainer.seed", "--seed"),
    eval_fraction: float | None = opt(TrainConfig, "eval_fraction"),
    early_stop_patience: int | None = opt(TrainConfig, "trainer.early_stop_patience", "--early-stop-patience"),
    checkpoint_every: int | None = opt(TrainConfig, "trainer.checkpoint_every", "--checkpoint-every"),
    gradient_checkpointing: bool | None = opt(TrainConfig, "trainer.gradient_checkpointing",
                                              "--gradient-checkpointing/--no-gradient-checkpointing"),
    lora_r: int | None = opt(TrainConfig, "trainer.lora.r", "--lora-r"),
    lora_alpha: float | None = opt(TrainConfig, "trainer.lora.alpha", "--lora-alpha"),
    lora_target_modules: list[str] | None = opt(TrainConfig, "trainer.lora.target_modules",
                                                "--lora-target-modules", convert=split_commas),
    merge_lora: bool | None = opt(TrainConfig, "merge_lora", "--merge-lora/--no-merge-lora"),
    out: str | None = opt(TrainConfig, "out"),
    resume: bool | None = opt(TrainConfig, "resume", "--resume"),
) -> None:
    """DPO on the stored preference pairs; writes a HF model directory and metrics.png to OUT."""
    from flows.pair_selection import load_examples

    check_writable(cfg.out)  # the model is written after training: check where it goes first
    load_examples(cfg)  # no pairs / bad dataset / unreachable database: fail before Prefect starts
    preflight_model(cfg.base)
    from flows.train import train_flow

    s = run_flow(train_flow, cfg)
    final = s.get("final_train", {})
    console.print(esc(f"trained {s['steps']} steps on {s['n_train']} pairs ({s['n_eval']} held out); "
                      f"reference log-probs {s['ref_computed']} computed, {s['ref_reused']} reused; "
                      f"final loss {final.get('loss', float('nan')):.4f}, reward accuracy "
                      f"{final.get('rewards/accuracies', float('nan')):.2f}; model in {s['out']}, "
                      f"plot {s['plot']}"),
                  highlight=False)
    if lora := s.get("lora"):
        merged = f"; merged model in {lora['merged']}" if lora["merged"] else " (add --merge-lora for vLLM)"
        console.print(esc(f"LoRA r={lora['r']}: {lora['trainable_parameters']:,} of {lora['parameters']:,} "
                          f"parameters trained, adapter {lora['adapter_mb']:.2f} MB{merged}"), highlight=False)


@reward_app.command("train")
@guarded
@configured(RewardTrainConfig)
def reward_train(
    cfg: RewardTrainConfig,
    base: str | None = opt(RewardTrainConfig, "base"),
    constitution: str | None = opt(RewardTrainConfig, "constitution"),
    method: list[str] | None = opt(RewardTrainConfig, "methods", "--method", convert=split_commas),
    status: list[str] | None = opt(RewardTrainConfig, "statuses", "--status", convert=split_commas),
    min_label_prob: float | None = opt(RewardTrainConfig, "min_label_prob"),
    dataset: str | None = opt(RewardTrainConfig, "dataset"),
    limit: int | None = opt(RewardTrainConfig, "limit"),
    eval_fraction: float | None = opt(RewardTrainConfig, "eval_fraction"),
    epochs: int | None = opt(RewardTrainConfig, "reward.epochs", "--epochs"),
    max_steps: int | None = opt(RewardTrainConfig, "reward.max_steps", "--max-steps"),
    lr: float | None = opt(RewardTrainConfig, "reward.lr", "--lr"),
    head_lr: float | None = opt(RewardTrainConfig, "reward.head_lr", "--head-lr"),
    batch_size: int | None = opt(RewardTrainConfig, "reward.batch_size", "--batch-size"),
    grad_accum: int | None = opt(RewardTrainConfig, "reward.grad_accum", "--grad-accum"),
    max_length: int | None = opt(RewardTrainConfig, "reward.max_length", "--max-length"),
    max_prompt_length: int | None = opt(RewardTrainConfig, "reward.max_prompt_length", "--max-prompt-length"),
    soft_labels: bool | None = opt(RewardTrainConfig, "reward.use_soft_labels", "--soft-labels/--hard-labels"),
    lora_r: int | None = opt(RewardTrainConfig, "reward.lora.r", "--lora-r"),
    lora_alpha: float | None = opt(RewardTrainConfig, "reward.lora.alpha", "--lora-alpha"),
    seed: int | None = opt(RewardTrainConfig, "reward.seed", "--seed"),
    checkpoint_every: int | None = opt(RewardTrainConfig, "reward.checkpoint_every", "--checkpoint-every"),
    out: str | None = opt(RewardTrainConfig, "out"),
    resume: bool | None = opt(RewardTrainConfig, "resume", "--resume"),
) -> None:
    """Train a reward model (scalar head, Bradley-Terry on soft labels); prints held-out pair accuracy."""
    from flows.pair_selection import load_examples

    check_writable(cfg.out)
    load_examples(cfg)
    preflight_model(cfg.base)
    from flows.reward import reward_flow

    s = run_flow(reward_flow, cfg)
    ev = s.get("final_eval") or {}
    held = (f"held-out pair accuracy {ev['accuracy']:.3f} on {s['n_eval']} pairs (margin {ev['margin']:.3f}, "
            f"loss {ev['loss']:.4f})" if ev else "no held-out pairs (raise --eval-fraction)")
    console.print(esc(f"reward model: {s['steps']} steps on {s['n_train']} pairs; {held}; "
                      f"train accuracy {s['final_train'].get('accuracy', float('nan')):.3f}; model in {s['out']}"),
                  highlight=False)


@reward_app.command("score")
@guarded
@configured(RewardScoreConfig)
def reward_score(
    cfg: RewardScoreConfig,
    model: str | None = opt(RewardScoreConfig, "model"),
    input: str | None = opt(RewardScoreConfig, "input"),  # noqa: A002 - the flag's name
    constitution: str | None = opt(RewardScoreConfig, "constitution"),
    method: list[str] | None = opt(RewardScoreConfig, "methods", "--method", convert=split_commas),
    status: list[str] | None = opt(RewardScoreConfig, "statuses", "--status", convert=split_commas),
    limit: int | None = opt(RewardScoreConfig, "limit"),
    out: str | None = opt(RewardScoreConfig, "out"),
) -> None:
    """Score replies (a JSONL file, or the store's pairs) with a reward model; pairs get an accuracy."""
    if cfg.out:
        if Path(cfg.out).is_dir():  # found only after all the scoring, before
            raise UserError(f"--out {cfg.out}: is a directory; name the file the scores go to, e.g. "
                            f"{Path(cfg.out) / 'scores.jsonl'}")
        check_writable(Path(cfg.out).parent)
    from flows.reward import score_rewards

    s = score_rewards(cfg)
    for r in s["scored"][:10]:
        text = r.get("response") or r.get("chosen", "")
        value = r.get("reward", r.get("margin"))
        label = "reward" if "reward" in r else "margin"
        console.print(esc(f"{label} {value:+.3f}  {text[:70]!r}"), highlight=False)
    acc = f"; pair accuracy {s['accuracy']:.3f} on {s['pairs']} pairs" if s["pairs"] else ""
    console.print(esc(f"scored {s['rows']} rows with {s['model']}{acc}" + (f"; wrote {s['out']}" if s["out"] else "")),
                  highlight=False)
