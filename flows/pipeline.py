"""The main job: generate -> label -> export -> train -> eval -> report, one Prefect flow.

    cai run --constitution harmless --prompts red-team --rounds 2 --train-steps 50
    make demo          # the same on the bundled model and prompts, sized for a 2-core CPU

Each stage is a subflow reading and writing the same store, so a rerun resumes stage by stage:
generate, label and eval redo nothing that is stored; export is deterministic; training is
skipped when its output directory already holds a finished run on the same pairs and settings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field
from sqlmodel import select

from flows.evaluate import EvalConfig, eval_flow
from flows.export import ExportConfig, export_flow
from flows.generate import GenerateConfig, SamplingConfig, generate_flow
from flows.label import LabelConfig, label_flow
from flows.report import ReportConfig, report_flow
from flows.train import TrainConfig, train_flow
from store.db import database_url, session_scope
from store.models import TrainingRun


class PipelineConfig(BaseModel):
    constitution: str = "harmless"  # name, name@version or a path; every stage uses the same one
    prompts: list[str] = Field(default_factory=lambda: ["red-team"])  # tags for generate and label
    limit: int | None = 32  # prompts used: the bundled 70 take ~2x longer; None for all
    model: str = "smollm2-135m"  # policy for generation, base for DPO, baseline for eval
    judge: str | None = None  # feedback model for labelling and eval; None = the same model
    engine: str = "auto"  # hf | vllm | auto
    rounds: int = 2  # critique/revision rounds
    max_new_tokens: int = 96  # per generated answer, critique and revision: CPU time is linear in it
    # store: judge each prompt's initial answer vs its final revision; samples: fresh policy samples
    label_source: Literal["store", "samples"] = "store"
    samples: int = 2  # policy samples per prompt when label_source = samples
    principles_per_pair: int = 4  # judge ensemble size (both orders each)
    train_steps: int = 50  # DPO optimizer steps
    batch_size: int = 4  # pairs per step
    lr: float = 5e-6  # small steps: the DPO reward is a log-ratio against the base model
    beta: float = 0.1  # DPO KL strength
    eval_prompts: list[str] = Field(default_factory=lambda: ["red-team-heldout", "benign-heldout"])
    eval_limit: int | None = None  # held-out prompts per set; None for all
    export_dir: str | None = None  # default exports/<constitution>
    model_dir: str | None = None  # default runs/<constitution>-dpo
    report_dir: str = "reports/latest"
    retrain: bool = False  # train again even if model_dir holds a finished run on the same data
    seed: int = 0  # one seed for every stage


def _paths(cfg: PipelineConfig) -> dict[str, Path]:
    name = Path(cfg.constitution.split("@")[0]).stem
    return {"export": Path(cfg.export_dir or f"exports/{name}"),
            "model": Path(cfg.model_dir or f"runs/{name}-dpo"),
            "report": Path(cfg.report_dir)}


def stage_configs(cfg: PipelineConfig) -> dict[str, BaseModel]:
    """The typed config of every stage, derived from the pipeline's: what `cai run` will do."""
    paths = _paths(cfg)
    judge = cfg.judge or cfg.model
    s = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    return {
        "generate": GenerateConfig(constitution=cfg.constitution, prompts=cfg.prompts, limit=cfg.limit,
                                   model=cfg.model, engine=cfg.engine, rounds=cfg.rounds, seed=cfg.seed,
                                   initial=s, critique=s, revision=s),
        "label": LabelConfig(constitution=cfg.constitution, prompts=cfg.prompts, limit=cfg.limit, policy=cfg.model,
                             judge=judge, engine=cfg.engine, source=cfg.label_source, samples=cfg.samples,
                             principles_per_pair=cfg.principles_per_pair, max_new_tokens=cfg.max_new_tokens,
                             seed=cfg.seed),
        "export": ExportConfig(constitution=cfg.constitution, out=paths["export"]),
        "train": TrainConfig(base=cfg.model, constitution=cfg.constitution, max_steps=cfg.train_steps,
                             batch_size=cfg.batch_size, lr=cfg.lr, beta=cfg.beta, seed=cfg.seed,
                             out=str(paths["model"])),
        "eval": EvalConfig(model=str(paths["model"]), baseline=cfg.model, judge=judge, prompts=cfg.eval_prompts,
                           constitution=cfg.constitution, limit=cfg.eval_limit, max_new_tokens=cfg.max_new_tokens,
                           engine=cfg.engine, seed=cfg.seed),
        "report": ReportConfig(out=paths["report"]),
    }


def _finished_training(tcfg: TrainConfig) -> dict[str, Any] | None:
    """The summary of a completed run into the same directory with the same settings, if any."""
    out = Path(tcfg.out)
    if not (out / "config.json").exists():
        return None
    want = tcfg.model_dump(mode="json")
    with session_scope() as s:
        runs = s.exec(select(TrainingRun).where(TrainingRun.out_dir.in_([str(out), str(out.resolve())]),
                                                TrainingRun.status == "completed")
                      .order_by(TrainingRun.finished_at.desc())).all()
    for r in runs:
        got = {k: v for k, v in r.config.items() if k in want}
        if all(got.get(k) == v for k, v in want.items() if k not in ("resume", "database_url")):
            return {"training_run_id": r.id, "out": str(out), "skipped": True, "final_metrics": r.final_metrics}
    return None


@flow(name="pipeline", log_prints=True)
def pipeline_flow(cfg: PipelineConfig) -> dict[str, Any]:
    logger = get_run_logger()
    cfgs = stage_configs(cfg)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}

    def timed(name: str, fn, *args):
        t0 = time.perf_counter()
        logger.info("stage %s starting", name)
        results[name] = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 1)
        logger.info("stage %s done in %.1fs", name, timings[name])

    timed("generate", generate_flow, cfgs["generate"])
    timed("label", label_flow, cfgs["label"])
    timed("export", export_flow, cfgs["export"])
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
        "dataset": str(paths["export"]),
        "model": str(paths["model"]),
        "report": str(paths["report"] / "index.html"),
        "timings_s": timings,
        "results": results,
    }
