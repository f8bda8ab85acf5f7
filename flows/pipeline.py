"""The main job: [redteam ->] generate -> contrast -> label -> export -> train -> eval -> report, one Prefect flow.

    cai run --constitution harmless --prompts red-team --rounds 1 --stage sft
    make demo          # the same on the bundled model and prompts, sized for a 2-core CPU

Each stage is a subflow reading and writing the same store, so a rerun resumes stage by stage:
generate, contrast, label and eval redo nothing that is stored; export is deterministic; training
is skipped when its output directory already holds a finished run on the same pairs (same
selection hash) and the same settings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlmodel import select

from cai.redteam import HIT_TAG
from constitution.load import split_ref
from flows.common import resolve_constitution, run_logger
from flows.configs import (
    ContrastConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    LabelConfig,
    PipelineConfig,
    RedteamConfig,
    ReportConfig,
    SamplingConfig,
    TrainConfig,
)
from flows.contrast import contrast_flow
from flows.evaluate import eval_flow
from flows.export import export_flow
from flows.generate import generate_flow
from flows.label import label_flow
from flows.orchestration import run_flow, stage_flow
from flows.redteam import redteam_flow
from flows.report import report_flow
from flows.train import train_flow
from store.db import database_url, session_scope
from store.models import TrainingRun
from store.queries import has_tag


def _paths(cfg: PipelineConfig) -> dict[str, Path]:
    name = Path(split_ref(cfg.constitution)[0]).stem
    export = Path(cfg.export_dir or f"exports/{name}")
    others = [stem for c in cfg.constitutions if (stem := Path(split_ref(c)[0]).stem) != name]
    return {"export": export, "export_helpful": export.parent / (others[0] if others else f"{name}-helpful"),
            "model": Path(cfg.model_dir or f"runs/{name}-cai"),
            "report": Path(cfg.report_dir)}


def stage_configs(cfg: PipelineConfig) -> dict[str, BaseModel]:
    """The typed config of every stage, derived from the pipeline's: what `cai run` will do."""
    paths = _paths(cfg)
    judge = cfg.judge or cfg.model
    s = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    cons = ContrastConfig(prompts=cfg.contrast_prompts, constitutions=cfg.constitutions,
                          refuse_limit=cfg.refuse_limit, answer_limit=cfg.answer_limit,
                          model=cfg.model, engine=cfg.engine, seed=cfg.seed,
                          runner=cfg.runner, sampling={"temperature": 0.0, "max_new_tokens": cfg.contrast_new_tokens})
    return {
        "redteam": RedteamConfig(per_category=max(cfg.redteam, 1), model=cfg.model, engine=cfg.engine, seed=cfg.seed,
                                 runner=cfg.runner, campaign_new_tokens=cfg.eval_new_tokens),
        "generate": GenerateConfig(constitution=cfg.constitution, prompts=cfg.prompts, limit=cfg.limit,
                                   model=cfg.model, engine=cfg.engine, rounds=cfg.rounds, seed=cfg.seed,
                                   initial=s, critique=s, revision=s, runner=cfg.runner),
        "contrast": cons,
        "label": LabelConfig(constitution=cfg.constitution, prompts=cfg.prompts, limit=cfg.limit, policy=cfg.model,
                             judge=judge, engine=cfg.engine, source=cfg.label_source, samples=cfg.samples,
                             principles_per_pair=cfg.principles_per_pair, max_new_tokens=cfg.max_new_tokens,
                             seed=cfg.seed, runner=cfg.runner),
        "export": ExportConfig(constitution=cfg.constitution, out=paths["export"]),
        "export_helpful": ExportConfig(constitution=paths["export_helpful"].name, out=paths["export_helpful"]),
        # every constitution's pairs (refusals alone teach a small model to refuse everything), of the
        # versions the run uses (pipeline_flow pins them)
        "train": TrainConfig(base=cfg.model, constitution=",".join(cfg.constitutions), stage=cfg.stage,
                             dpo_helpful_ratio=cfg.dpo_helpful_ratio, dpo_mine=cfg.dpo_mine,
                             mine_repeat=cfg.mine_repeat,
                             sft=cfg.sft.model_copy(update={"seed": cfg.seed}),
                             trainer=cfg.trainer.model_copy(update={"seed": cfg.seed}), out=str(paths["model"])),
        "eval": EvalConfig(model=str(paths["model"]), baseline=cfg.model, judge=judge, prompts=cfg.eval_prompts,
                           constitution=cfg.constitution, constitutions=cfg.constitutions, limit=cfg.eval_limit,
                           max_new_tokens=cfg.eval_new_tokens,
                           principles=cfg.eval_principles, cpu_dtype=cfg.eval_cpu_dtype,
                           engine=cfg.engine, seed=cfg.seed, runner=cfg.runner),
        "report": ReportConfig(out=paths["report"]),
    }


def _finished_training(tcfg: TrainConfig) -> dict[str, Any] | None:
    """The summary of a completed run into the same directory with the same settings, if any."""
    out = Path(tcfg.out)
    # full weights (config.json) or, for --stage dpo with LoRA, the adapter alone (adapter_config.json)
    if not any((out / name).exists() for name in ("config.json", "adapter_config.json")):
        return None
    from flows.pair_selection import load_examples
    from training.data import selection_hash

    want = tcfg.model_dump(mode="json")
    try:
        pairs_hash = selection_hash(load_examples(tcfg)[0])
    except Exception:  # noqa: BLE001 - no pairs yet: nothing finished can match
        return None
    with session_scope() as s:
        runs = s.exec(select(TrainingRun).where(TrainingRun.out_dir.in_([str(out), str(out.resolve())]),
                                                TrainingRun.status == "completed")
                      .order_by(TrainingRun.finished_at.desc())).all()
    for r in runs:
        # the stored config has the same nested shape (trainer: {...}): equal settings, equal dicts
        got = {k: v for k, v in r.config.items() if k in want}
        # the same settings on other pairs (new rows, an edited principle) is new training
        if r.data_selection.get("pairs_hash") != pairs_hash:
            continue
        if all(got.get(k) == v for k, v in want.items() if k not in ("resume", "database_url")):
            return {"training_run_id": r.id, "out": str(out), "skipped": True, "final_metrics": r.final_metrics}
    return None


def current_refs(cfg: PipelineConfig) -> list[str]:
    """name@version of every constitution the run uses, resolved once (and recorded in the store):
    training learns from the pairs of exactly these versions, so an edited principle's old pairs
    are not taught beside its new ones."""
    with session_scope() as s:
        refs = [resolve_constitution(s, ref).ref for ref in [cfg.constitution, *cfg.constitutions]]
    by_name: dict[str, str] = {}
    for ref in refs:
        by_name.setdefault(split_ref(ref)[0], ref)
    return list(by_name.values())


@stage_flow(name="pipeline", log_prints=True)
def pipeline_flow(cfg: PipelineConfig) -> dict[str, Any]:
    logger = run_logger()
    cfgs = stage_configs(cfg)
    cfgs["train"] = cfgs["train"].model_copy(update={"constitution": ",".join(current_refs(cfg))})
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        logger.info("stage %s starting", name)
        results[name] = run_flow(fn, *args)  # a subflow under Prefect, else a plain call
        timings[name] = round(time.perf_counter() - t0, 1)
        logger.info("stage %s done in %.1fs", name, timings[name])

    if cfg.redteam:
        timed("redteam", redteam_flow, cfgs["redteam"])
        with session_scope() as s:
            hits = has_tag(s, HIT_TAG)
        if hits:  # what got through is what generate and label should work on next
            for name in ("generate", "label"):
                prompts = cfgs[name].prompts + [HIT_TAG]
                cfgs[name] = cfgs[name].model_copy(update={"prompts": prompts})
    timed("generate", generate_flow, cfgs["generate"])
    if cfg.contrast:
        timed("contrast", contrast_flow, cfgs["contrast"])
    timed("label", label_flow, cfgs["label"])
    timed("export", export_flow, cfgs["export"])
    if cfg.contrast:
        timed("export_helpful", export_flow, cfgs["export_helpful"])
    previous = None if cfg.retrain else _finished_training(cfgs["train"])
    if previous:
        logger.info("train: %s already holds a finished run on the same settings; skipping", previous["out"])
        results["train"], timings["train"] = previous, 0.0
    else:
        timed("train", train_flow, cfgs["train"])
    timed("eval", eval_flow, cfgs["eval"])
    timed("report", report_flow, cfgs["report"])
    paths = _paths(cfg)
    return {
        "database": database_url(),
        "dataset": str(paths["export"]) + (f", {paths['export_helpful']}" if cfg.contrast else ""),
        "model": str(paths["model"]),
        "report": str(paths["report"] / "index.html"),
        "timings_s": timings,
        "results": results,
    }
