"""Train a model on the store's preference pairs with the built-in DPO step.

    cai train --base smollm2-135m --constitution harmless --method revision,ai --beta 0.1 \\
        --epochs 1 --lr 5e-6 --out runs/harmless-dpo

Reads the pairs (filtered by constitution, method, status, label probability), holds out a
split by prompt hash, computes the reference log-probs once (cached in store.RefLogp), trains,
and writes a HF model directory plus metrics.png to --out. The store gets a TrainingRun row
(config, data selection, constitution versions, final metrics) and one TrainingStep row per
step and split. `--resume` continues from out/checkpoints/step-N.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from cai import review
from cai.prompts import load_saved_dataset, saved_dataset_error
from cai.refusal import expected_stance, stance_errors
from dpo.checkpoint import latest_checkpoint, read_meta
from dpo.data import (
    PairExample,
    StoreRefCache,
    cap_method,
    constitution_versions,
    examples_from_records,
    repeat_prompts,
    select_pairs,
    selection_hash,
    split_eval,
)
from dpo.lora import apply_lora, merge, trainable_parameters
from dpo.sft import SFTExample, SFTResult, train_sft
from dpo.trainer import TrainResult, load_policy, plot_metrics, save_model, train_dpo
from engines.bundled import DEFAULT_SPEC, model_fingerprint
from flows.common import UserError, machine_facts, run_logger
from flows.configs import RewardScoreConfig, RewardTrainConfig, TrainConfig
from flows.orchestration import stage_flow, stage_task
from store.db import session_scope
from store.keys import content_hash
from store.models import Run, TrainingRun, TrainingStep, utcnow
from store.reviews import verdict_rows
from store.runs import finish_run, start_run
from store.stop import is_stop
from store.upsert import insert_ignore, upsert

log = logging.getLogger("cai.train")


def _read_records(cfg: TrainConfig) -> list[dict[str, Any]]:
    path = Path(cfg.dataset or "")
    if not path.exists():
        raise UserError(f"--dataset {path}: no such file or directory")
    if path.is_dir():  # save_to_disk output, e.g. `cai export --out DIR`
        from pyarrow import ArrowException

        expected = ("a directory written by `cai export --out DIR` (format arrow) or Dataset.save_to_disk, "
                    "or a JSONL file of preference pairs")
        ds = load_saved_dataset(path, "--dataset ", expected)
        if hasattr(ds, "keys"):
            if cfg.dataset_split not in ds:
                raise UserError(f"--dataset {path}: no split {cfg.dataset_split!r} "
                                f"(has {', '.join(ds.keys())})")
            ds = ds[cfg.dataset_split]
        try:  # arrow files are memory-mapped: a damaged one can fail only as its rows are read
            return list(ds)
        except (OSError, ArrowException) as exc:
            raise saved_dataset_error(path, exc, "--dataset ", expected) from None
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{n}: not JSON ({exc.msg})") from None
    return records


def _record_matches(r: dict[str, Any], cfg: TrainConfig) -> bool:
    """The store filters, applied to exported rows (which carry the same provenance columns)."""
    if cfg.methods and r.get("method") and r["method"] not in cfg.methods:
        return False
    if cfg.statuses and r.get("status") and r["status"] not in cfg.statuses:
        return False
    p = r.get("label_prob")
    if cfg.min_label_prob is not None and p is not None and p < cfg.min_label_prob:
        return False
    if cfg.constitution and r.get("constitution"):
        refs = [ref.strip().partition("@") for ref in cfg.constitution.split(",") if ref.strip()]
        if not any(r["constitution"] == name and str(r.get("constitution_version") or "").startswith(version)
                   for name, _, version in refs):
            return False
    return True


def load_examples(cfg: TrainConfig, url: str | None = None) -> tuple[list[PairExample], list[str]]:
    """The selected pairs (from the store, or cfg.dataset) and the constitution versions
    (name@version) they were made under; a one-line UserError if nothing matches."""
    if cfg.dataset:
        records = [r for r in _read_records(cfg) if _record_matches(r, cfg)]
        try:
            examples = reviewed_examples(examples_from_records(records), cfg, url)[:cfg.limit or None]
        except ValueError as exc:
            raise UserError(f"--dataset {cfg.dataset}: {exc}") from None
        used = {e.id for e in examples}
        refs = sorted({f"{r['constitution']}@{r.get('constitution_version', '')}" for r in records
                       if r.get("constitution") and str(r.get("id") or r.get("pair_id") or "") in used})
        where = f"{cfg.dataset} (split {cfg.dataset_split})"
    else:
        with session_scope(url) as s:
            examples = reviewed_examples(select_pairs(s, cfg.pair_filter()), cfg, url, s)[:cfg.limit or None]
            refs = constitution_versions(s, [e.id for e in examples])
        where = "the store"
    if not examples:
        reviewed = f", reviewed {cfg.reviewed}" if cfg.reviewed != "any" else ""
        raise UserError(f"no preference pairs match {cfg.pair_filter().describe()}{reviewed} in {where}; "
                        "make some with `cai generate` / `cai label`, or loosen the filters")
    return examples, refs


def reviewed_examples(examples: list[PairExample], cfg: TrainConfig | RewardTrainConfig | RewardScoreConfig,
                      url: str | None = None, session=None) -> list[PairExample]:
    """The pairs `--reviewed` keeps, by their pair ids' verdicts in the store (cai review); a pair
    people flipped, with `--people-order`, swapped, its label the share of people preferring it."""
    if cfg.reviewed == "any" and not cfg.people_order:
        return examples
    if session is None:
        with session_scope(url) as s:
            return reviewed_examples(examples, cfg, url, s)
    ids = [e.id for e in examples]
    decision = review.decide(ids, map(review.verdict_from_row, verdict_rows(session, pair_ids=ids)),
                             cfg.reviewed, cfg.people_order)
    out = []
    for e in examples:
        if e.id in decision.flip:
            out.append(replace(e, chosen=e.rejected, rejected=e.chosen, chosen_ended=e.rejected_ended,
                               rejected_ended=e.chosen_ended, label_prob=decision.flip[e.id]))
        elif e.id in decision.keep:
            out.append(e)
    return out


def _resolve_base(spec: str) -> Path | str:
    from engines.bundled import resolve

    return resolve(spec)


def _step_writer(training_run_id: str, url: str | None, prefix: str = ""):
    def write(step: int, split: str, metrics: dict[str, float]) -> None:
        with session_scope(url) as s:
            upsert(s, TrainingStep, [TrainingStep(training_run_id=training_run_id, step=step, split=prefix + split,
                                                  metrics=metrics)], update=["metrics", "created_at"])
    return write


def _begin(cfg: TrainConfig | RewardTrainConfig, examples: list[PairExample], refs: list[str], url: str | None,
           flow: str = "train") -> tuple[str, str, dict[str, Any]]:
    """Run and TrainingRun rows; a resumed run keeps its TrainingRun (its steps continue)."""
    names = sorted({r.split("@", 1)[0] for r in refs})
    versions = sorted({r.split("@", 1)[1] for r in refs})
    constitution = (",".join(ref.strip().split("@", 1)[0] for ref in cfg.constitution.split(",")) if cfg.constitution
                    else ",".join(names) or None)
    pairs_hash = selection_hash(examples)
    resumed_id = None
    found = latest_checkpoint(Path(cfg.out) / "checkpoints") if getattr(cfg, "resume", False) else None
    if found:
        meta = read_meta(found[0])
        if meta.get("pairs_hash") not in (None, pairs_hash):
            raise UserError(f"--resume: {found[0]} was trained on other pairs than these filters select "
                            f"({cfg.pair_filter().describe()}); drop --resume or pick another --out")
        resumed_id = meta.get("training_run_id")
    run_id = start_run(flow, cfg.model_dump(), model=cfg.base, engine="dpo" if flow == "train" else flow, url=url)
    with session_scope(url) as s:
        run = s.get(Run, run_id)
        run.constitution, run.constitution_version = constitution or "", ",".join(versions)
        s.add(run)
    training_run_id = resumed_id or run_id
    by_method: dict[str, int] = {}
    for e in examples:
        by_method[e.method or "?"] = by_method.get(e.method or "?", 0) + 1
    selection = {"source": cfg.dataset or "store",
                 "filters": asdict(cfg.pair_filter()) | {"limit": cfg.limit, "reviewed": cfg.reviewed,
                                                         "people_order": cfg.people_order},
                 "pairs": len(examples),
                 "pairs_hash": pairs_hash, "by_method": by_method, "constitution_versions": refs}
    with session_scope(url) as s:
        insert_ignore(s, TrainingRun, [TrainingRun(
            id=training_run_id, base_model=cfg.base, out_dir=str(Path(cfg.out).resolve()),
            config=cfg.model_dump(), data_selection=selection, constitution=constitution,
            constitution_version=",".join(versions) or None, run_id=run_id)])
        row = s.get(TrainingRun, training_run_id)
        row.status, row.run_id, row.config = "running", run_id, cfg.model_dump()
        s.add(row)
    return run_id, training_run_id, selection


def _finish(training_run_id: str, status: str, url: str | None, selection: dict[str, Any] | None = None,
            metrics: dict[str, Any] | None = None) -> None:
    with session_scope(url) as s:
        row = s.get(TrainingRun, training_run_id)
        if row is None:
            return
        row.status, row.finished_at = status, utcnow()
        if metrics is not None:
            row.final_metrics = metrics
        if selection is not None:
            row.data_selection = selection
        s.add(row)


def mine_errors(model, tokenizer, pairs: list[PairExample], cfg: TrainConfig, logger) -> dict[str, Any]:
    """Probe `model` (greedy) on every prompt whose pairs teach a stance (cai.refusal.expected_stance)
    and return which prompts it gets wrong, with counts and a few examples, for the run's record."""
    import copy

    import torch

    from engines.base import Sampling
    from engines.hf import HFEngine

    expected: dict[str, bool] = {}
    prompts: dict[str, list[dict[str, str]]] = {}
    for e in pairs:
        stance = expected_stance(e.chosen, e.rejected)
        if stance is not None and e.prompt_key not in expected:
            expected[e.prompt_key], prompts[e.prompt_key] = stance, list(e.prompt)
    t0 = time.perf_counter()
    was_training = model.training
    # decoding in bf16 where training autocasts to it: a copy, the fp32 weights stay the master
    probe = copy.deepcopy(model).to(torch.bfloat16) if cfg.trainer.dtype == "bfloat16" else model  # resolved
    keys = list(expected)
    engine = HFEngine.from_model(probe, tokenizer, name="dpo-start")
    outs = engine.generate([prompts[k] for k in keys],
                           Sampling(temperature=0.0, max_new_tokens=cfg.mine_new_tokens, seed=cfg.trainer.seed))
    replies = {k: o.outputs[0].text for k, o in zip(keys, outs, strict=True)}
    engine.close()
    del probe, engine
    model.train(was_training)
    errors = stance_errors(expected, replies)
    refused = sorted(k for k, want in errors.items() if not want)
    answered = sorted(k for k, want in errors.items() if want)
    info = {"probed": len(keys), "new_tokens": cfg.mine_new_tokens, "errors": refused + answered,
            "refused_should_answer": len(refused), "answered_should_refuse": len(answered),
            "should_answer": sum(not w for w in expected.values()), "should_refuse": sum(expected.values()),
            "examples": [{"prompt": prompts[k][-1]["content"], "reply": replies[k], "should_refuse": errors[k]}
                         for k in (refused[:3] + answered[:3])],
            "seconds": round(time.perf_counter() - t0, 3)}
    logger.info("probe of the DPO start model on %d training prompts (%.0fs): refuses %d of %d it should "
                "answer, answers %d of %d it should refuse; their pairs come first", len(keys), info["seconds"],
                len(refused), info["should_answer"], len(answered), info["should_refuse"])
    return info


def _resolve_dtypes(cfg: TrainConfig, device) -> tuple[TrainConfig, dict[str, Any]]:
    """`dtype: auto` of each stage made concrete once, by the probe generation uses
    (engines/precision.py), and what the run records about how it computed: the dtype each
    stage used and the machine."""
    from engines.precision import cpu_bf16_speedup, resolve

    sft = cfg.sft.model_copy(update={"dtype": resolve(cfg.sft.dtype, device)})
    trainer = cfg.trainer.model_copy(update={"dtype": resolve(cfg.trainer.dtype, device)})
    dtypes = {}
    if cfg.stage in ("sft", "sft+dpo"):
        dtypes["sft"] = sft.dtype
    if cfg.stage in ("dpo", "sft+dpo"):
        dtypes["dpo"] = trainer.dtype
    machine = machine_facts() | {"device": str(device)}
    if device.type == "cpu" and "auto" in (cfg.sft.dtype, cfg.trainer.dtype):
        machine["bf16_matmul_speedup"] = round(cpu_bf16_speedup(), 3)
    return cfg.model_copy(update={"sft": sft, "trainer": trainer}), {"dtype": dtypes, "machine": machine}


def sft_examples(pairs: list[PairExample]) -> list[SFTExample]:
    """The chosen reply of every pair, each (prompt, reply) once: what the supervised stage learns."""
    seen: dict[tuple[str, str], SFTExample] = {}
    for e in pairs:
        key = (e.prompt_key, e.chosen)
        if key not in seen:
            seen[key] = SFTExample(e.id, list(e.prompt), e.chosen, e.method, e.chosen_ended)
    return list(seen.values())


def run_training(cfg: TrainConfig, url: str | None = None) -> dict[str, Any]:
    """Select pairs, train, save; returns a summary. What `cai train` and the flow call."""
    url = url or cfg.database_url
    logger = run_logger(log)
    t0 = time.perf_counter()
    if cfg.resume and cfg.stage != "dpo":
        raise UserError(f"--resume continues a DPO checkpoint; it cannot be combined with --stage {cfg.stage}")
    examples, refs = load_examples(cfg, url)
    train, held_out = split_eval(examples, cfg.eval_fraction)
    base_path = _resolve_base(cfg.base)
    run_id, training_run_id, selection = _begin(cfg, examples, refs, url)
    logger.info("train %s on %d pairs (%d train, %d eval) [%s], run %s, training run %s", cfg.base,
                len(examples), len(train), len(held_out), cfg.pair_filter().describe(), run_id,
                training_run_id)
    logger.info("constitution versions %s; config %s", ", ".join(refs) or "unknown",
                json.dumps(cfg.model_dump(), sort_keys=True))
    out = Path(cfg.out)
    try:
        t_load = time.perf_counter()
        try:
            model, tokenizer = load_policy(base_path, cfg.device)
        except OSError as exc:
            raise UserError(f"cannot load base model {cfg.base!r} ({str(exc).splitlines()[0]}); pass a "
                            f"local HF directory or `{DEFAULT_SPEC}`") from None
        if getattr(tokenizer, "chat_template", None) is None:
            from engines.chat import FALLBACK_CHAT_TEMPLATE

            # the engines render template-less models with this; training must see the same text
            # (and the saved tokenizer then carries it)
            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        load_s = time.perf_counter() - t_load
        cfg, compute = _resolve_dtypes(cfg, next(model.parameters()).device)
        logger.info("training dtype %s (%s)", ", ".join(f"{k} {v}" for k, v in compute["dtype"].items()),
                    ", ".join(f"{k} {v}" for k, v in compute["machine"].items()))
        ref_id = model_fingerprint(base_path)
        lora = cfg.trainer.lora
        sft: SFTResult | None = None
        if cfg.stage in ("sft", "sft+dpo"):
            sft_train, sft_held = sft_examples(train), sft_examples(held_out)
            logger.info("sft on %d chosen replies (%d held out)", len(sft_train), len(sft_held))
            sft = train_sft(model, tokenizer, sft_train, sft_held, cfg.sft,
                            on_metrics=_step_writer(training_run_id, url, prefix="sft-"), logger=logger)
            # DPO's reference is the model it starts from: the fine-tuned weights, not the base
            ref_id += "+sft:" + content_hash(selection["pairs_hash"], cfg.sft.model_dump(), length=12)
        result: TrainResult | None = None
        if cfg.stage in ("dpo", "sft+dpo"):
            if cfg.dpo_mine:  # before the adapters: the probe decodes the plain model
                selection["mined"] = mine_errors(model, tokenizer, train, cfg, logger)
            wrong = set(selection.get("mined", {}).get("errors", ()))
            dpo_train = repeat_prompts(cap_method(train, "helpful", cfg.dpo_helpful_ratio, prefer=wrong),
                                       wrong, cfg.mine_repeat)
            dpo_held = cap_method(held_out, "helpful", cfg.dpo_helpful_ratio)
            if lora.enabled:  # after SFT: the adapters train DPO, the SFT weights are their base and reference
                try:
                    model = apply_lora(model, lora, seed=cfg.trainer.seed)
                except ValueError as exc:
                    raise UserError(f"--lora-target-modules: {exc}") from None
                n_train, n_all = trainable_parameters(model)
                logger.info("LoRA r=%d alpha=%g on %s: %d trainable parameters of %d (%.2f%%)", lora.r,
                            lora.alpha, ",".join(lora.target_modules), n_train, n_all, 100 * n_train / n_all)
            if cfg.dpo_helpful_ratio is not None:
                logger.info("dpo on %d of %d pairs (at most %g helpful pairs per other pair)", len(dpo_train),
                            len(train), cfg.dpo_helpful_ratio)
                selection |= {"dpo_train": len(dpo_train), "dpo_eval": len(dpo_held)}
            result = train_dpo(
                model, tokenizer, dpo_train, dpo_held, cfg.trainer, out_dir=out,
                ref_model_id=ref_id, ref_cache=StoreRefCache(url),
                on_metrics=_step_writer(training_run_id, url), resume=cfg.resume,
                meta={"training_run_id": training_run_id, "pairs_hash": selection["pairs_hash"]}, logger=logger)
        t_save = time.perf_counter()
        if lora.enabled and sft is not None:
            # the adapters' base is the SFT model, which exists only here: save the two merged
            model = merge(model)
        save_model(model, tokenizer, out)  # LoRA: the adapter alone (adapter_model.safetensors, MBs)
        if lora.enabled and cfg.merge_lora and sft is None:
            save_model(merge(model), tokenizer, out / "merged")
        history = (result.history if result else []) + [h | {"split": "sft-" + h["split"]}
                                                          for h in (sft.history if sft else [])]
        plot = plot_metrics(history, out / "metrics.png")
        save_s = time.perf_counter() - t_save
    except BaseException as exc:
        status = "stopped" if is_stop(exc) else "failed"
        _finish(training_run_id, status, url)
        finish_run(run_id, status, summary={status: f"{exc.__class__.__name__}: {exc}"}, url=url)
        raise
    selection |= {"train": len(train), "eval": len(held_out), "eval_fraction": cfg.eval_fraction,
                  "truncated_sequences": (result.truncated if result else 0) + (sft.truncated if sft else 0)}
    if sft:
        selection |= {"sft_train": sft.n_train, "sft_eval": sft.n_eval}
    final: dict[str, Any] = {"stage": cfg.stage, "compute": compute}
    if result:
        final |= {"train": result.final_train, "eval": result.final_eval, "steps": result.steps,
                  "total_steps": result.total_steps, "stopped_early": result.stopped_early,
                  "stop_reason": result.stop_reason}
    if sft:
        final["sft"] = {"train": sft.final_train, "eval": sft.final_eval, "steps": sft.steps,
                        "total_steps": sft.total_steps, "stop_reason": sft.stop_reason, "best_step": sft.best_step}
    _finish(training_run_id, "completed", url, selection, final)
    timings = {"load": round(load_s, 3), "ref_logps": result.timings["ref_s"] if result else 0.0,
               "train": (result.timings["train_s"] if result else 0.0) + (sft.timings["train_s"] if sft else 0.0),
               "save": round(save_s, 3), "total": round(time.perf_counter() - t0, 3)}
    summary = {"run_id": run_id, "training_run_id": training_run_id, "out": str(out), "plot": str(plot or ""),
               "pairs": len(examples), "stage": cfg.stage, "compute": compute}
    if lora.enabled:
        summary["lora"] = {"r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules,
                           "trainable_parameters": n_train, "parameters": n_all,
                           "adapter_mb": round(sum(f.stat().st_size for f in out.glob("adapter_model.*")) / 2**20, 3),
                           "merged": (str(out) if sft is not None else
                                      str(out / "merged") if cfg.merge_lora else None)}
    if result:
        summary |= result.to_dict()
    else:  # sft alone: the same keys, from the supervised run
        summary |= {"steps": sft.steps, "total_steps": sft.total_steps, "n_train": sft.n_train, "n_eval": sft.n_eval,
                    "final_train": sft.final_train, "final_eval": sft.final_eval, "ref_computed": 0, "ref_reused": 0,
                    "stop_reason": sft.stop_reason}
    if sft:
        summary["sft"] = sft.to_dict()
    finish_run(run_id, "completed", summary=summary, timings=timings, url=url)
    record = {"config": cfg.model_dump(), "data_selection": selection, "summary": summary}
    (out / "training_run.json").write_text(json.dumps(record, indent=2, default=str))
    logger.info("train done (%s): %d steps, final %s, model in %s", cfg.stage, summary["steps"],
                ", ".join(f"{k}={v:.4g}" for k, v in summary["final_train"].items()
                          if k in ("loss", "rewards/accuracies", "rewards/margins")), out)
    return summary


@stage_task(name="dpo")
def train_task(cfg: TrainConfig) -> dict[str, Any]:
    # the model is loaded inside: tasks take configs, never models
    return run_training(cfg)


@stage_flow(name="train", log_prints=True)
def train_flow(cfg: TrainConfig) -> dict[str, Any]:
    return train_task(cfg)


# --- the reward model: `cai reward train`, `cai reward score` --------------------------------

def run_reward_training(cfg: RewardTrainConfig, url: str | None = None) -> dict[str, Any]:
    """Bradley-Terry reward model on the selected pairs; stored as a TrainingRun (stage "reward")
    with one TrainingStep per step and split; returns a summary with the held-out accuracy."""
    from dpo.reward import load_reward_model, save_reward_model, train_reward

    url = url or cfg.database_url
    logger = run_logger(log)
    t0 = time.perf_counter()
    examples, refs = load_examples(cfg, url)
    train, held_out = split_eval(examples, cfg.eval_fraction)
    base_path = _resolve_base(cfg.base)
    run_id, training_run_id, selection = _begin(cfg, examples, refs, url, flow="reward")
    logger.info("reward model on %s: %d pairs (%d train, %d held out) [%s], run %s", cfg.base, len(examples),
                len(train), len(held_out), cfg.pair_filter().describe(), run_id)
    out = Path(cfg.out)
    try:
        try:
            model, tokenizer = load_reward_model(base_path, cfg.device, cfg.reward)
        except OSError as exc:
            raise UserError(f"cannot load base model {cfg.base!r} ({str(exc).splitlines()[0]})") from None
        if getattr(tokenizer, "chat_template", None) is None:
            from engines.chat import FALLBACK_CHAT_TEMPLATE

            tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        from engines.precision import resolve

        device = next(model.parameters()).device
        cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(
            update={"dtype": resolve(cfg.reward.dtype, device)})})
        compute = {"dtype": {"reward": cfg.reward.dtype}, "machine": machine_facts() | {"device": str(device)}}
        logger.info("training dtype reward %s", cfg.reward.dtype)
        result = train_reward(model, tokenizer, train, held_out, cfg.reward,
                              on_metrics=_step_writer(training_run_id, url, prefix="reward-"), logger=logger)
        save_reward_model(model, tokenizer, out)
        plot = plot_reward(result.history, out / "metrics.png")
    except BaseException as exc:
        status = "stopped" if is_stop(exc) else "failed"
        _finish(training_run_id, status, url)
        finish_run(run_id, status, summary={status: f"{exc.__class__.__name__}: {exc}"}, url=url)
        raise
    selection |= {"train": len(train), "eval": len(held_out), "eval_fraction": cfg.eval_fraction}
    final = {"stage": "reward", "train": result.final_train, "eval": result.final_eval, "steps": result.steps,
             "total_steps": result.total_steps, "compute": compute}
    _finish(training_run_id, "completed", url, selection, final)
    summary = {"run_id": run_id, "training_run_id": training_run_id, "out": str(out), "plot": str(plot or ""),
               "pairs": len(examples), "stage": "reward", **result.to_dict()}
    summary.pop("history")
    finish_run(run_id, "completed", summary=summary, timings=result.timings | {
        "total": round(time.perf_counter() - t0, 3)}, url=url)
    (out / "training_run.json").write_text(json.dumps({"config": cfg.model_dump(), "data_selection": selection,
                                                       "summary": summary}, indent=2, default=str))
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
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not JSON ({exc.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ok = isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)
        if not ok or not (isinstance(row.get("response"), str)
                          or (isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str))):
            raise UserError(f"{path}:{n}: expected {{prompt, response}} or {{prompt, chosen, rejected}} "
                            "(prompt: text or a list of chat messages)")
        rows.append(row | {"prompt": prompt})
    if not rows:
        raise UserError(f"--input {path}: no rows")
    return rows


def score_rewards(cfg: RewardScoreConfig, url: str | None = None) -> dict[str, Any]:
    """Scores for every row (written to cfg.out as JSON lines); for pairs, the share the model
    ranks as their label does."""
    from dpo.config import RewardConfig
    from dpo.reward import load_reward_model, score

    url = url or cfg.database_url
    rows = _score_rows(cfg, url)
    path = Path(cfg.model)
    if not (path / "config.json").exists():
        raise UserError(f"--model {path}: not a reward model directory (train one with `cai reward train`)")
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
