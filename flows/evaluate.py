"""Evaluation as a Prefect flow: a trained model against a baseline on held-out prompts.

    cai eval --model runs/harmless-dpo --baseline smollm2-135m --prompts red-team-heldout,benign-heldout

Both models answer every prompt greedily with the same settings (one model loaded at a time).
Then the feedback model (`judge`, by default the baseline) compares the two answers to each
prompt under a few of the constitution's preference principles, in both orders, exactly as
the label flow judges pairs (cai/judge.py). Each answer also goes through the transparent
refusal detector (cai/refusal.py). Refusal rates are reported per prompt set: refusing a
red-team prompt can be right, refusing a benign one is a failure (over-refusal).

One EvalResult row per (prompt, model); a rerun finds them and does no model work. What each row
holds and what the rows add up to are in cai/evaluate.py, the eval's reads in store/eval_queries.py.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from sqlmodel import Session

from cai import evaluate as rules
from cai.budget import Estimate, chat_estimate, choice_estimate, placeholder
from cai.evaluate import ROLES, GenItem, JudgeItem, JudgeOutcome, result_key
from cai.stage_stats import StageStats, stage_summary
from constitution.load import Constitution
from engines import gpu_available
from engines.base import Completion
from engines.bundled import model_fingerprint
from flows.common import UserError, ensure_tags, governance, resolve_constitution, run_logger, taught, worker_id
from flows.configs import EvalConfig
from flows.engine_cache import cached_engine, drop_engines, engine_facts, machine_facts
from flows.orchestration import stage_flow, stage_task
from flows.stage import Stage, run_stage
from store import eval_queries as q
from store.db import session_scope
from store.models import EvalResult, Prompt
from store.queries import prompts_for_tags, rows_by_id, tags_of
from store.runs import recorded_run
from store.upsert import insert_ignore


def load_items(cfg: EvalConfig):
    """(judge constitution, (tag, prompt) items, governance, every tag of each prompt)."""
    with session_scope(cfg.database_url) as s:
        c = resolve_constitution(s, cfg.constitution)
        gov = governance(s, cfg.constitutions)
        ensure_tags(s, cfg.prompts)
    with session_scope(cfg.database_url) as s:
        by_tag = {tag: prompts_for_tags(s, [tag]) for tag in cfg.prompts}
        items = rules.select_items(by_tag, cfg.limit)
        tags = tags_of(s, [p.id for _, p in items])
    return c, items, gov, tags


def comparison_name(cfg: EvalConfig, c: Constitution, fingerprints: dict[str, str], gov) -> str:
    """The eval's name: its label plus a hash of every setting that shapes the results, the
    governing constitutions' versions included (they decide each prompt's stance and which
    replies are refusals)."""
    label = cfg.name or f"{rules.short_name(cfg.model)}-vs-{rules.short_name(cfg.baseline)}"
    return rules.eval_name(label, c, fingerprints, cfg.principles, cfg.seed, cfg.sampling(), cfg.engine.backend,
                           cfg.judge_max_chars, engine_settings(cfg).get("dtype", "auto"),
                           governing=[g.ref for g in gov.constitutions])


def engine_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The engine settings the two models write their replies with: on a machine without a GPU,
    fp32 unless `cpu_dtype` is auto or the settings name a dtype. bf16 kernels round differently
    on different CPUs (AMX against AVX-512) and flip greedy replies, so a bf16 eval is a figure
    about the CPU as much as the model; fp32 gives the same replies on every x86 CPU we measured.
    The judge keeps `engine.settings` as given: it scores two fixed replies (a probability, no
    greedy path to flip), and in bf16 it takes half the time."""
    settings = dict(cfg.engine.settings)
    if cfg.cpu_dtype == "float32" and "dtype" not in settings and not gpu_available():
        settings["dtype"] = "float32"
    return settings


# --- stages and tasks ----------------------------------------------------------------------

def _engine_if_pending(cfg: EvalConfig, spec: str, done, keys: list[str], settings: dict[str, Any],
                       backend: str | None = None):
    """The engine, loaded only when some item is still to do: a rerun (or a dry run) never loads a model.

    Loaded here rather than inside the stage so a model that cannot load stops the flow with
    its message, instead of being recorded as a failure of every item.
    """
    if cfg.runner.dry_run:
        return None
    with session_scope(cfg.database_url) as s:
        if len(done(s, keys)) == len(set(keys)):
            return None
    return cached_engine(spec, backend or cfg.engine.backend, **settings)


def _run(cfg: EvalConfig, run_id: str, stage: Stage, items: list) -> StageStats:
    return run_stage(stage, items, worker=worker_id(), run_id=run_id, url=cfg.database_url, **cfg.runner.model_dump())


def _judge_estimate(cfg: EvalConfig, it: JudgeItem) -> Estimate:
    ests = [choice_estimate(c) for c in rules.judge_conversations(it, cfg.judge_max_chars)[0]]
    return Estimate(sum(e.requests for e in ests), sum(e.prompt_tokens for e in ests),
                    sum(e.completion_tokens for e in ests))


@stage_task(name="eval-generate")
def generate_task(cfg: EvalConfig, name: str, role: str, fingerprint: str, run_id: str) -> StageStats:
    _, items, gov, tags = load_items(cfg)
    spec = cfg.model if role == "model" else cfg.baseline
    sampling, known = cfg.sampling(), taught(gov)
    work = [GenItem(result_key(name, p.id, role, fingerprint, sampling), p, tag, role) for tag, p in items]
    engine = _engine_if_pending(cfg, spec, q.answered, [it.key for it in work], engine_settings(cfg))

    def compute(chunk: list[GenItem]) -> list[Completion]:
        return engine.generate([it.prompt.messages for it in chunk], sampling)

    def write(session: Session, results: list[tuple[GenItem, Completion]]) -> None:
        dtype = engine_facts(engine).get("dtype")  # what the replies were computed in
        insert_ignore(session, EvalResult, [rules.result_row(
            it, comp, name=name, model=spec, fingerprint=fingerprint, sampling=sampling, gov=gov, tags=tags,
            known=known, dtype=dtype, run_id=run_id) for it, comp in results])

    stage = Stage(name=f"eval.generate.{role}", key=lambda it: it.key, done=q.answered, compute=compute,
                  write=write, tokens=lambda comp: comp.outputs[0].completion_tokens,
                  size=lambda it: len(it.prompt.text),
                  estimate=lambda it: chat_estimate(it.prompt.messages, sampling.max_new_tokens))
    return _run(cfg, run_id, stage, work)


@stage_task(name="eval-judge")
def judge_task(cfg: EvalConfig, name: str, fingerprints: dict[str, str], run_id: str) -> StageStats:
    c, items, _, _ = load_items(cfg)
    keys = rules.result_keys(name, [p.id for _, p in items], fingerprints, cfg.sampling())
    with session_scope(cfg.database_url) as s:
        rows = {r.id: r for r in q.results_of(s, name)}
    stand_in = (lambda key: placeholder(key, cfg.max_new_tokens)) if cfg.runner.dry_run else None
    work = rules.judge_work(items, rows, keys, c, cfg.seed, cfg.principles, stand_in)
    judge_eng = cfg.judge_engine or cfg.engine
    engine = _engine_if_pending(cfg, cfg.judge_model, q.judged, [it.key for it in work],
                                dict(judge_eng.settings), judge_eng.backend)

    def compute(chunk: list[JudgeItem]) -> list[JudgeOutcome]:
        return rules.judge_chunk(engine, chunk, cfg.judge_max_chars)

    def write(session: Session, results: list[tuple[JudgeItem, JudgeOutcome]]) -> None:
        for it, res in results:
            model_row, base_row = session.get(EvalResult, it.key), session.get(EvalResult, it.baseline_key)
            rules.record_verdict(model_row, base_row, it, res, cfg.judge_model)
            session.add(model_row)
            session.add(base_row)

    stage = Stage(name="eval.judge", key=lambda it: it.key, done=q.judged, compute=compute, write=write,
                  size=lambda it: len(it.model_text) + len(it.baseline_text),
                  estimate=lambda it: _judge_estimate(cfg, it))
    return _run(cfg, run_id, stage, work)


@stage_task(name="eval-drift")
def drift_task(cfg: EvalConfig, name: str) -> int:
    """Each reply's mean per-token log-prob under the baseline: how far the trained model's text
    has moved from what the base model would write (its own replies score the baseline's level)."""
    with session_scope(cfg.database_url) as s:
        todo = [r for r in q.results_of(s, name) if r.details.get("drift") is None]
    if not todo or not cfg.drift or cfg.runner.dry_run:
        return 0
    from engines.bundled import resolve
    from training.logps import ChatEncoder, batched_logps
    from training.trainer import load_policy

    try:
        path = resolve(cfg.baseline)
        model, tok = load_policy(path)
    except Exception as exc:  # noqa: BLE001 - e.g. a hub id offline: the eval stands without this figure
        run_logger().warning("drift: cannot load baseline %s as a local model (%s); figure left out",
                                 cfg.baseline, str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        return 0
    enc = ChatEncoder(tok, max_length=cfg.max_new_tokens + 384, max_prompt_length=384)
    with session_scope(cfg.database_url) as s:
        prompts = rows_by_id(s, Prompt, {r.prompt_id for r in todo})
    values = batched_logps(model, [enc.encode(prompts[r.prompt_id].messages, r.text) for r in todo], enc.pad_id,
                           dtype=drift_dtype(cfg))
    del model
    with session_scope(cfg.database_url) as s:
        q.set_drift(s, [r.id for r in todo], [lp / n if n else None for lp, n in values])
    return len(todo)


def drift_dtype(cfg: EvalConfig) -> str:
    """Drift is a mean log-prob over fixed text, with no greedy path to flip, so like the judge it
    scores in the engine's dtype: a named one, else bf16 autocast where that is faster on this CPU
    (a third of the fp32 time here), fp32 on a GPU as before."""
    named = cfg.engine.settings.get("dtype")
    if named in ("float32", "bfloat16", "float16"):
        return named
    if named or gpu_available():
        return "float32"
    from engines.vllm import cpu_dtype  # what `auto` means on a CPU, for either engine (no vllm import)

    return cpu_dtype("auto")


def _release_models() -> None:
    """Unload before the next model loads: one model in memory at a time."""
    drop_engines()
    gc.collect()


@stage_flow(name="eval", log_prints=True)
def eval_flow(cfg: EvalConfig) -> dict[str, Any]:
    logger = run_logger()
    t0 = time.perf_counter()
    c, items, gov, _ = load_items(cfg)
    if not items:
        raise UserError(f"no prompts tagged {', '.join(cfg.prompts)}; add some with "
                        "`cai prompts add FILE --tag TAG`")
    # the weights, not the path, identify a model: re-evaluating a retrained runs/<name> is new work
    fingerprints = {role: model_fingerprint(spec) for role, spec in
                    (("model", cfg.model), ("baseline", cfg.baseline), ("judge", cfg.judge_model))}
    name = comparison_name(cfg, c, fingerprints, gov)
    # resolved once: a file edited mid-run cannot mix versions
    cfg = cfg.model_copy(update={"constitution": c.ref, "constitutions": [g.ref for g in gov.constitutions]})
    config = cfg.model_dump() | {"eval_name": name, "machine": machine_facts()}
    with recorded_run("eval", config, model=cfg.model, engine=cfg.engine.backend,
                      constitution=c, url=cfg.database_url) as run:
        logger.info("eval %s: %d prompts (%s), judge %s under %s, run %s", name, len(items),
                    ",".join(cfg.prompts), cfg.judge_model, c.ref, run.id)
        stages = []
        for role in ROLES:
            stages.append(generate_task(cfg, name, role, fingerprints[role], run.id))
            if not (role == "baseline" and cfg.judge_model == cfg.baseline  # the judge reuses it
                    and engine_settings(cfg) == dict(cfg.engine.settings)):
                _release_models()
        if cfg.principles:
            stages.append(judge_task(cfg, name, fingerprints, run.id))
        _release_models()
        drift_task(cfg, name)
        ids = {k for by in rules.result_keys(name, [p.id for _, p in items], fingerprints, cfg.sampling()).values()
               for k in by.values()}
        with session_scope(cfg.database_url) as s:
            rows = [r for r in q.results_of(s, name) if r.id in ids]
        run.summary = {
            "run_id": run.id, "eval_name": name, "model": cfg.model, "baseline": cfg.baseline,
            "judge": cfg.judge_model, "constitution": c.ref, "prompts": len(items), **rules.figures(rows),
            "constitutions": cfg.constitutions,
            "stages": {s.stage: stage_summary(s) for s in stages},
            "computed": sum(s.computed for s in stages), "failed": sum(s.failed for s in stages),
            "total_s": round(time.perf_counter() - t0, 3), **({"dry_run": True} if cfg.runner.dry_run else {}),
        }
        run.timings = {s.stage: round(s.total_s, 3) for s in stages}
    logger.info("eval done: %d rows computed, %d failed, %.1fs", run.summary["computed"], run.summary["failed"],
                run.summary["total_s"])
    return run.summary
