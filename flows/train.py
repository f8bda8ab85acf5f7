"""Train a model on the store's preference pairs with the built-in DPO step.

    cai train --base smollm2-135m --constitution harmless --method revision,ai --beta 0.1 \\
        --epochs 1 --lr 5e-6 --out runs/harmless-dpo

Reads the pairs (flows/pair_selection.py: filtered by constitution, method, status, label
probability), holds out a split by prompt hash, optionally fine-tunes on the chosen replies first
(--stage sft+dpo), computes the reference log-probs once (cached in store.RefLogp), trains, and
writes a HF model directory plus metrics.png to --out. The store gets a TrainingRun row (config,
data selection, constitution versions, final metrics; flows/training_record.py) and one
TrainingStep row per step and split. `--resume` continues from out/checkpoints/step-N (DPO) or
out/checkpoints/sft/step-N (SFT; under sft+dpo a finished SFT stage is loaded, not trained again).
The reward model is flows/reward.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cai.dataset_schema import teaches_reply
from cai.refusal import probe_report, stance_probe
from engines.bundled import DEFAULT_SPEC, model_fingerprint
from engines.bundled import resolve as resolve_base
from engines.chat import ensure_chat_template
from flows.common import UserError, run_logger
from flows.configs import TrainConfig
from flows.engine_cache import machine_facts
from flows.orchestration import stage_flow, stage_task
from flows.output_dir import fresh_sibling, swap_in
from flows.pair_selection import pair_filter
from flows.training_record import checkpoint_dir, recorded_training, training_inputs, write_record
from store.db import mask_secrets
from store.training_runs import complete_training_run, step_writer
from training.data import PairExample, StoreRefCache, cap_method, repeat_prompts
from training.lora import apply_lora, merge, trainable_parameters
from training.sft import SFTExample, SFTResult, train_sft
from training.trainer import TrainResult, load_policy, plot_metrics, save_model, train_dpo, weights_fingerprint

log = logging.getLogger("cai.train")


def mine_errors(model, tokenizer, pairs: list[PairExample], cfg: TrainConfig, logger) -> dict[str, Any]:
    """Probe `model` (greedy) on every prompt whose pairs teach a stance (cai.refusal.stance_probe)
    and return which prompts it gets wrong, with counts and a few examples, for the run's record."""
    import copy

    import torch

    from engines.base import Sampling
    from engines.hf import HFEngine

    expected, prompts = stance_probe(pairs)
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
    info = probe_report(expected, prompts, replies, cfg.mine_new_tokens) | {
        "seconds": round(time.perf_counter() - t0, 3)}
    logger.info("probe of the DPO start model on %d training prompts (%.0fs): refuses %d of %d it should "
                "answer, answers %d of %d it should refuse; their pairs come first", len(keys), info["seconds"],
                info["refused_should_answer"], info["should_answer"], info["answered_should_refuse"],
                info["should_refuse"])
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
    """The chosen reply of every pair whose chosen side is a reply to teach (the rule of the export's
    *_sft rows, dataset_schema.teaches_reply: not an AI label's), each (prompt, reply) once: what the
    supervised stage learns."""
    seen: dict[tuple[str, str], SFTExample] = {}
    for e in pairs:
        key = (e.prompt_key, e.chosen)
        if teaches_reply(e.method) and key not in seen:
            seen[key] = SFTExample(e.id, list(e.prompt), e.chosen, e.method, e.chosen_ended)
    return list(seen.values())


def run_training(cfg: TrainConfig, url: str | None = None) -> dict[str, Any]:
    """Select pairs, train, save; returns a summary. What `cai train` and the flow call."""
    url = url or cfg.database_url
    logger = run_logger(log)
    t0 = time.perf_counter()
    examples, refs, train, held_out = training_inputs(cfg, url)
    out = Path(cfg.out)
    sft_train = sft_examples(train) if cfg.stage != "dpo" else []
    if cfg.stage != "dpo" and not sft_train:
        methods = ", ".join(sorted({e.method or "(none)" for e in train}))
        raise UserError(f"--stage {cfg.stage}: none of the {len(train)} training pairs has a reply to teach (SFT "
                        f"learns the chosen side of revision, contrastive and helpful pairs; these are {methods}): "
                        "use --stage dpo, or select pairs of those methods")
    base_path = resolve_base(cfg.base)
    with recorded_training(cfg, examples, refs, url) as rec:
        run_id, training_run_id, selection = rec.run.id, rec.training_run_id, rec.selection
        logger.info("train %s on %d pairs (%d train, %d eval) [%s], run %s, training run %s", cfg.base,
                    len(examples), len(train), len(held_out), pair_filter(cfg).describe(), run_id,
                    training_run_id)
        logger.info("constitution versions %s; config %s", ", ".join(refs) or "unknown",
                    json.dumps(mask_secrets(cfg.model_dump()), sort_keys=True))
        t_load = time.perf_counter()
        try:
            model, tokenizer = load_policy(base_path, cfg.device)
        except OSError as exc:
            raise UserError(f"cannot load base model {cfg.base!r} ({str(exc).splitlines()[0]}); pass a "
                            f"local HF directory or `{DEFAULT_SPEC}`") from None
        ensure_chat_template(tokenizer)
        load_s = time.perf_counter() - t_load
        cfg, compute = _resolve_dtypes(cfg, next(model.parameters()).device)
        logger.info("training dtype %s (%s)", ", ".join(f"{k} {v}" for k, v in compute["dtype"].items()),
                    ", ".join(f"{k} {v}" for k, v in compute["machine"].items()))
        ref_id = model_fingerprint(base_path)
        lora = cfg.trainer.lora
        sft: SFTResult | None = None
        if cfg.stage in ("sft", "sft+dpo"):
            sft_held = sft_examples(held_out)
            logger.info("sft on %d chosen replies (%d held out)", len(sft_train), len(sft_held))
            # under sft+dpo its model exists nowhere else: with checkpoints on, the finished stage is one too
            final = cfg.stage == "sft+dpo" and bool(cfg.sft.checkpoint_every or cfg.trainer.checkpoint_every)
            sft = train_sft(model, tokenizer, sft_train, sft_held, cfg.sft,
                            on_metrics=step_writer(training_run_id, url, prefix="sft-"), logger=logger,
                            checkpoint_dir=checkpoint_dir(cfg, "sft"), resume=cfg.resume,
                            meta=rec.checkpoint_meta, final_checkpoint=final)
            # DPO's reference is the model it starts from: the fine-tuned weights, not the base; keyed by
            # those weights themselves (its rows depend on the split, eval_fraction, the seed, ...)
            ref_id += "+sft:" + weights_fingerprint(model)
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
                on_metrics=step_writer(training_run_id, url), resume=cfg.resume, meta=rec.checkpoint_meta,
                logger=logger)
        t_save = time.perf_counter()
        if lora.enabled and sft is not None:
            # the adapters' base is the SFT model, which exists only here: save the two merged
            model = merge(model)
        # a fresh directory, swapped in at the end: an earlier run's files (full weights beside a new
        # adapter, an adapter beside new full weights, merged/) would otherwise be loaded with the new ones
        tmp = rec.partial = fresh_sibling(out)
        save_model(model, tokenizer, tmp)  # LoRA: the adapter alone (adapter_model.safetensors, MBs)
        if lora.enabled and cfg.merge_lora and sft is None:
            save_model(merge(model), tokenizer, tmp / "merged")
        history = (result.history if result else []) + [h | {"split": "sft-" + h["split"]}
                                                          for h in (sft.history if sft else [])]
        plot = plot_metrics(history, tmp / "metrics.png")
        adapter_mb = round(sum(f.stat().st_size for f in tmp.glob("adapter_model.*")) / 2**20, 3)
        save_s = time.perf_counter() - t_save
        summary = _summarize(cfg, out, plot, examples, train, held_out, selection, result, sft, run_id,
                             training_run_id, compute, lora, n_train if lora.enabled else 0,
                             n_all if lora.enabled else 0, adapter_mb, url)
        timings = {"load": round(load_s, 3), "ref_logps": result.timings["ref_s"] if result else 0.0,
                   "train": (result.timings["train_s"] if result else 0.0)
                   + (sft.timings["train_s"] if sft else 0.0),
                   "save": round(save_s, 3), "total": round(time.perf_counter() - t0, 3)}
        write_record(tmp, cfg, selection, summary)
        swap_in(tmp, out, keep=("checkpoints",))  # the checkpoints of this run (--resume refuses a finished one)
        rec.run.summary, rec.run.timings = summary, timings
    logger.info("train done (%s): %d steps, final %s, model in %s", cfg.stage, summary["steps"],
                ", ".join(f"{k}={v:.4g}" for k, v in summary["final_train"].items()
                          if k in ("loss", "rewards/accuracies", "rewards/margins")), out)
    return summary


def _summarize(cfg, out, plot, examples, train, held_out, selection, result, sft, run_id, training_run_id, compute,
               lora, n_train, n_all, adapter_mb, url) -> dict[str, Any]:
    """The run's summary; completes its TrainingRun row (selection and final metrics)."""
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
    complete_training_run(training_run_id, url, selection, final)
    summary = {"run_id": run_id, "training_run_id": training_run_id, "out": str(out),
               "plot": str(out / plot.name) if plot else "", "pairs": len(examples), "stage": cfg.stage,
               "compute": compute}
    if lora.enabled:
        summary["lora"] = {"r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules,
                           "trainable_parameters": n_train, "parameters": n_all, "adapter_mb": adapter_mb,
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
    return summary


@stage_task(name="dpo")
def train_task(cfg: TrainConfig) -> dict[str, Any]:
    # the model is loaded inside: tasks take configs, never models
    return run_training(cfg)


@stage_flow(name="train", log_prints=True)
def train_flow(cfg: TrainConfig) -> dict[str, Any]:
    return train_task(cfg)
