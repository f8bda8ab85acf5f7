"""Train a reward model on the store's preference pairs, and score replies with it.

    cai reward train --base smollm2-135m --constitution harmless --out runs/reward
    cai reward score --model runs/reward --input replies.jsonl --out scored.jsonl

Training reads the pairs `cai train` would (flows/pair_selection.py), holds out a split by prompt
hash, fits a Bradley-Terry head and body (training/reward.py) and writes the model plus metrics.png to
--out; the store gets a TrainingRun (stage "reward") with one TrainingStep per step and split.
With `--checkpoint-every N` checkpoints go to out/checkpoints, and `--resume` continues from the newest.
Scoring writes one JSON line per row and, for pairs, the share ranked as their label does.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cai.prompts import json_lines
from engines.bundled import resolve as resolve_base
from engines.chat import ensure_chat_template
from flows.common import UserError, run_logger
from flows.configs import RewardScoreConfig, RewardTrainConfig
from flows.engine_cache import machine_facts
from flows.orchestration import stage_flow
from flows.output_dir import fresh_sibling, swap_in
from flows.pair_selection import load_examples, pair_filter
from flows.training_record import checkpoint_dir, recorded_training, training_inputs, write_record
from store.training_runs import complete_training_run, step_writer
from training.data import prompt_messages
from training.trainer import plot_metrics

log = logging.getLogger("cai.train")  # the name these lines had beside `cai train`'s: filters keep matching


def run_reward_training(cfg: RewardTrainConfig, url: str | None = None) -> dict[str, Any]:
    """Bradley-Terry reward model on the selected pairs; stored as a TrainingRun (stage "reward")
    with one TrainingStep per step and split; returns a summary with the held-out accuracy."""
    from training.reward import load_reward_model, save_reward_model, train_reward

    url = url or cfg.database_url
    logger = run_logger(log)
    t0 = time.perf_counter()
    examples, refs, train, held_out = training_inputs(cfg, url)
    out = Path(cfg.out)
    base_path = resolve_base(cfg.base)
    with recorded_training(cfg, examples, refs, url, flow="reward") as rec:
        run_id, training_run_id, selection = rec.run.id, rec.training_run_id, rec.selection
        logger.info("reward model on %s: %d pairs (%d train, %d held out) [%s], run %s", cfg.base, len(examples),
                    len(train), len(held_out), pair_filter(cfg).describe(), run_id)
        try:
            model, tokenizer = load_reward_model(base_path, cfg.device, cfg.reward)
        except OSError as exc:
            raise UserError(f"cannot load base model {cfg.base!r} ({str(exc).splitlines()[0]})") from None
        ensure_chat_template(tokenizer)
        from engines.precision import resolve

        device = next(model.parameters()).device
        cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(
            update={"dtype": resolve(cfg.reward.dtype, device)})})
        compute = {"dtype": {"reward": cfg.reward.dtype}, "machine": machine_facts() | {"device": str(device)}}
        logger.info("training dtype reward %s", cfg.reward.dtype)
        result = train_reward(model, tokenizer, train, held_out, cfg.reward,
                              on_metrics=step_writer(training_run_id, url, prefix="reward-"), logger=logger,
                              checkpoint_dir=checkpoint_dir(cfg), resume=cfg.resume, meta=rec.checkpoint_meta)
        tmp = rec.partial = fresh_sibling(out)  # swapped in below: nothing of an earlier model stays beside this one
        save_reward_model(model, tokenizer, tmp)
        plot = plot_reward(result.history, tmp / "metrics.png")
        selection |= {"train": len(train), "eval": len(held_out), "eval_fraction": cfg.eval_fraction}
        summary = {"run_id": run_id, "training_run_id": training_run_id, "out": str(out),
                   "plot": str(out / plot.name) if plot else "", "pairs": len(examples), "stage": "reward",
                   **result.to_dict()}
        summary.pop("history")
        write_record(tmp, cfg, selection, summary)
        swap_in(tmp, out, keep=("checkpoints",))  # the checkpoints of this run (--resume refuses a finished one)
        complete_training_run(training_run_id, url, selection, {
            "stage": "reward", "train": result.final_train, "eval": result.final_eval, "steps": result.steps,
            "total_steps": result.total_steps, "compute": compute})
        rec.run.summary = summary
        rec.run.timings = result.timings | {"total": round(time.perf_counter() - t0, 3)}
    acc = result.final_eval.get("accuracy")
    logger.info("reward model done: %d steps, held-out accuracy %s on %d pairs, model in %s", result.steps,
                f"{acc:.3f}" if acc is not None else "n/a", len(held_out), out)
    return summary


def plot_reward(history: list[dict[str, Any]], path: Path) -> Path | None:
    """The reward model's loss, held-out pair accuracy and score margin per step."""
    return plot_metrics(history, path, panels=(("loss", ("loss",)), ("accuracy", ("accuracy",)),
                                               ("margin", ("margin",))))


def _score_rows(cfg: RewardScoreConfig, url: str | None) -> list[dict[str, Any]]:
    """{prompt (messages), response} or {prompt, chosen, rejected} rows to score."""
    if not cfg.input:
        examples, _ = load_examples(cfg, url)
        return [{"id": e.id, "prompt": list(e.prompt), "chosen": e.chosen, "rejected": e.rejected,
                 "label_prob": e.label_prob, "method": e.method} for e in examples]
    path = Path(cfg.input)
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    rows = []
    for n, row in json_lines(path):
        expected = ("expected {prompt, response} or {prompt, chosen, rejected} (prompt: text or a list of "
                    "chat messages)")
        if not isinstance(row, dict) or "prompt" not in row or not (
                isinstance(row.get("response"), str)
                or (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str))):
            raise UserError(f"{path}:{n}: {expected}")
        try:
            prompt = list(prompt_messages(row["prompt"], f"{path}:{n}: prompt"))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        rows.append(row | {"prompt": prompt})
    if not rows:
        raise UserError(f"--input {path}: no rows")
    return rows


def score_rewards(cfg: RewardScoreConfig, url: str | None = None) -> dict[str, Any]:
    """Scores for every row (written to cfg.out as JSON lines); for pairs, the share the model
    ranks as their label does."""
    from training.config import RewardConfig
    from training.reward import is_reward_model_dir, load_reward_model, score

    url = url or cfg.database_url
    path = Path(cfg.model).expanduser()
    if not is_reward_model_dir(path):  # a causal LM would load with a zero head and score everything 0
        raise UserError(f"--model {path}: not a reward model directory; train one with "
                        f"`cai reward train --out {path}`")
    rows = _score_rows(cfg, url)
    model, tok = load_reward_model(path, cfg.device)
    rc = RewardConfig(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    items = [(r["prompt"], text) for r in rows for text in
             ([r["response"]] if "response" in r else [r["chosen"], r["rejected"]])]
    values = iter(score(model, tok, items, rc))
    scored, pairs, right = [], 0, 0
    for r in rows:
        if "response" in r:
            scored.append(r | {"reward": next(values)})
        else:
            c, rj = next(values), next(values)
            pairs += 1
            right += c > rj
            scored.append(r | {"reward_chosen": c, "reward_rejected": rj, "margin": c - rj})
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        with Path(cfg.out).open("w", encoding="utf-8") as f:
            for r in scored:
                f.write(json.dumps(r, default=str) + "\n")
    return {"model": str(path), "rows": len(rows), "pairs": pairs,
            "accuracy": right / pairs if pairs else None, "scored": scored, "out": cfg.out}


@stage_flow(name="reward", log_prints=True)
def reward_flow(cfg: RewardTrainConfig) -> dict[str, Any]:
    return run_reward_training(cfg)
