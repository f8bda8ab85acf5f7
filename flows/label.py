"""RL-CAI as a Prefect flow: candidate responses -> judgments in both orders -> soft-labelled pairs.

    cai label --constitution harmless --prompts red-team --policy smollm2-135m \
        --judge smollm2-135m --samples 2 --principles-per-pair 4 [--source store] [--cot]
    cai label --label-source best-of-n --samples 4 --reward-model runs/reward

Stages, each batched over every pending item and resumable (rows are keyed by what made them):
sample (k policy samples per prompt; skipped with --source store) -> cot (optional reasoning)
-> judge ((A)/(B) log-probs per pair x principle x order) -> pair (the averaged soft label).
With `--label-source best-of-n` the judge is not asked: sample (N per prompt) -> reward (the
reward model scores all N; best vs worst, soft label sigmoid(margin), cai/best_of_n.py). Its
pairs (method "best-of-n") get their status from the same quality gates as judged pairs.

Its inputs and plans are read in flows/label_inputs.py. The pure parts live in cai/: the plan and
keys in cai/rl_cai.py, prompts, draws and probabilities in cai/judge.py, the stored rows in
cai/label_rows.py; the reads in store/label_queries.py.
"""

from __future__ import annotations

import time
from typing import Any

from sqlmodel import Session

from cai import best_of_n, judge, rl_cai
from cai import label_rows as rows_of
from cai.budget import chat_estimate, choice_estimate
from cai.errors import validated
from cai.quality import pair_status
from cai.rl_cai import Candidate, JudgmentItem, PairItem, cot_key
from cai.stage_stats import StageStats, stage_totals
from engines.base import Completion
from flows.common import UserError, run_logger, worker_id
from flows.configs import LabelConfig
from flows.engine_cache import cached_engine, loaded_engine_facts
from flows.label_inputs import counts, load_inputs, plan_best_of_n, plan_pairs, reward_model_dir, stances
from flows.orchestration import stage_flow, stage_task
from flows.stage import Stage, run_stage
from store import label_queries as q
from store.db import session_scope
from store.models import Judgment, PreferencePair, Prompt, Response
from store.queries import rows_by_id
from store.runs import recorded_run
from store.upsert import insert_ignore


def make_config(**fields: Any) -> LabelConfig:
    """A LabelConfig from keyword settings; a rejected one is a one-line UserError (what tests and scripts build)."""
    return validated(LabelConfig, **fields)


# --- engines and stages --------------------------------------------------------------------

_JOB: dict[str, Any] = {}  # the running flow's job size (rl_cai.job_size), for `engine: auto`'s choice


def _engine(cfg: LabelConfig, spec: str):
    # called inside `compute`, so a rerun with nothing pending never loads a model; the first
    # stage that needs one counts its loading time as engine seconds
    return cached_engine(spec, cfg.engine.backend, **_JOB, **cfg.engine.settings)


def _judge_engine(cfg: LabelConfig):
    """The judge's engine: `judge_engine` when set (say a hosted API), else the policy's `engine`."""
    eng = cfg.judge_engine or cfg.engine
    return cached_engine(cfg.judge, eng.backend, **_JOB, **eng.settings)


def _run(cfg: LabelConfig, run_id: str, stage: Stage, items: list) -> StageStats:
    return run_stage(stage, items, worker=worker_id(), run_id=run_id, url=cfg.database_url, **cfg.runner.model_dump())


def _tokens(comp: Completion) -> int:
    return sum(o.completion_tokens for o in comp.outputs)


def _gate(session: Session, prompt_id: str, chosen: str, rejected: str, stance: tuple[dict, Any]) -> str:
    """A confident pair's status: "ok", or the quality gate its chosen reply fails."""
    refuse, known = stance
    return pair_status(session.get(Prompt, prompt_id), session.get(Response, chosen), session.get(Response, rejected),
                       refuse.get(prompt_id), known)


# --- tasks: thin wrappers; each loads its engine itself, only when work is pending ----------

@stage_task(name="sample")
def sample_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)

    def write(session: Session, done: list[tuple[tuple[str, Prompt, int], Completion]]) -> None:
        insert_ignore(session, Response, [rows_of.sample_row(
            key, p, i, comp, model=cfg.policy, sampling=cfg.sampling(i), seed=cfg.seed, c=c, run_id=run_id)
            for (key, p, i), comp in done])

    stage = Stage(name="label.sample", key=lambda it: it[0], done=q.responses_done, write=write, tokens=_tokens,
                  compute=lambda items: rl_cai.generate_samples(_engine(cfg, cfg.policy), items, cfg.sampling),
                  size=lambda it: sum(len(m["content"]) for m in it[1].messages),
                  estimate=lambda it: chat_estimate(it[1].messages, cfg.max_new_tokens))
    return _run(cfg, run_id, stage, rl_cai.sample_items(cfg, prompts))


@stage_task(name="cot")
def cot_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = rl_cai.judgment_plan(cfg, c, plan_pairs(cfg, c, prompts))
    sampling = cfg.cot_sampling()

    def compute(chunk: list[JudgmentItem]) -> list[Completion | Exception]:
        return rl_cai.nonempty(_judge_engine(cfg).generate(
            [judge.cot_conversation(it.question) for it in chunk], sampling))

    def write(session: Session, done: list[tuple[JudgmentItem, Completion]]) -> None:
        insert_ignore(session, Response, [rows_of.cot_row(
            it, comp, model=cfg.judge, sampling=sampling, seed=cfg.seed, c=c, run_id=run_id) for it, comp in done])

    stage = Stage(name="label.cot", key=lambda it: cot_key(it.key), done=q.responses_done, compute=compute,
                  write=write, tokens=_tokens, size=lambda it: it.size,
                  estimate=lambda it: chat_estimate(judge.cot_conversation(it.question), sampling.max_new_tokens))
    return _run(cfg, run_id, stage, items)


@stage_task(name="judge")
def judge_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = rl_cai.judgment_plan(cfg, c, plan_pairs(cfg, c, prompts))
    reasoning: dict[str, str] = {}
    if cfg.cot:  # judgments whose reasoning is missing (quarantined) wait for a later run
        with session_scope(cfg.database_url) as s:
            reasoning.update({k: r.text for k, r in rows_by_id(s, Response, [cot_key(it.key) for it in items]).items()})
        items = [it for it in items if cot_key(it.key) in reasoning]
    bounds = cfg.cot_clamp if cfg.cot else None
    priors: dict[str, float] | None = {} if cfg.calibrate else None  # principle id -> the judge's content-free P(A)

    def conversation(it: JudgmentItem) -> list[dict[str, str]]:
        return judge.answer_conversation(it.question, reasoning[cot_key(it.key)] if cfg.cot else None)

    def compute(chunk: list[JudgmentItem]) -> list[tuple[judge.Scored, float | None]]:
        return judge.score_calibrated(_judge_engine(cfg), [conversation(it) for it in chunk],
                                      [it.order for it in chunk], [it.principle for it in chunk], bounds,
                                      cfg.max_chars, priors)

    def write(session: Session, done: list[tuple[JudgmentItem, tuple[judge.Scored, float | None]]]) -> None:
        insert_ignore(session, Judgment, [rows_of.judgment_row(
            it, r, cal, conversation=conversation(it), reasoning=reasoning.get(cot_key(it.key)),
            judge_model=cfg.judge, c=c, run_id=run_id) for it, (r, cal) in done])

    stage = Stage(name="label.judge", key=lambda it: it.key,
                  done=q.judgments_done, compute=compute, write=write,
                  size=lambda it: it.size,
                  estimate=lambda it: choice_estimate(judge.answer_conversation(it.question, reasoning.get(
                      cot_key(it.key), "x" * 4 * cfg.cot_max_new_tokens) if cfg.cot else None)))
    return _run(cfg, run_id, stage, items)


@stage_task(name="pair")
def pair_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = rl_cai.pair_plan(cfg, c, plan_pairs(cfg, c, prompts))
    with session_scope(cfg.database_url) as s:  # a pair waits until every judgment of it exists
        have = q.judgments_done(s, [k for it in items for k in it.judgments])
    items = [it for it in items if all(k in have for k in it.judgments)]
    stance = stances(cfg, c, prompts)

    def compute(chunk: list[PairItem]) -> list[tuple[judge.PairLabel, list[str]]]:
        with session_scope(cfg.database_url) as s:
            rows = rows_by_id(s, Judgment, [k for it in chunk for k in it.judgments])
        return [rows_of.pair_label([rows[k] for k in it.judgments], cfg.min_margin) for it in chunk]

    def write(session: Session, done: list[tuple[PairItem, tuple[judge.PairLabel, list[str]]]]) -> None:
        def status(it: PairItem, lab: judge.PairLabel) -> str:  # the judge's, then the quality gates'
            chosen, rejected = rows_of.chosen_rejected(it, lab)
            return lab.status if lab.status != "ok" else _gate(session, it.pair.prompt_id, chosen.id, rejected.id,
                                                                stance)

        policy = cfg.policy if cfg.source == "samples" else None
        insert_ignore(session, PreferencePair, [rows_of.ai_pair_row(
            it, lab, scoring, status=status(it, lab), c=c, policy=policy, judge_model=cfg.judge,
            source=cfg.source, settings=cfg.pair_settings(), run_id=run_id) for it, (lab, scoring) in done])

    stage = Stage(name="label.pair", key=lambda it: it.id, done=q.pairs_done, compute=compute, write=write)
    return _run(cfg, run_id, stage, items)


@stage_task(name="reward")
def best_of_n_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = plan_best_of_n(cfg, c, prompts)
    stance = stances(cfg, c, prompts)
    loaded: dict[str, Any] = {}

    def compute(chunk: list[tuple[str, Prompt, list[Candidate]]]) -> list[dict[str, float]]:
        from training.config import RewardConfig
        from training.reward import load_reward_model, score

        if "model" not in loaded:  # once per task, and only when something is pending
            loaded["model"], loaded["tok"] = load_reward_model(reward_model_dir(cfg), "auto")
        flat = [(p.messages, x.text) for _, p, cands in chunk for x in cands]
        values = iter(score(loaded["model"], loaded["tok"], flat, RewardConfig()))
        return [{x.id: next(values) for x in cands} for _, _, cands in chunk]

    def write(session: Session, done: list[tuple[tuple[str, Prompt, list[Candidate]], dict[str, float]]]) -> None:
        rows = []
        for (key, p, cands), scores in done:
            picked = best_of_n.pick(scores, cfg.min_margin)
            # the same gates as every other pair: a degenerate "best" is gated
            status = _gate(session, p.id, picked.chosen, picked.rejected, stance) if picked.status == "ok" \
                else picked.status
            rows.append(rows_of.best_of_n_row(key, p, len(cands), scores, picked, status=status, c=c,
                                              policy=cfg.policy, reward_model=cfg.reward_model,
                                              min_margin=cfg.min_margin, run_id=run_id))
        insert_ignore(session, PreferencePair, rows)

    stage = Stage(name="label.reward", key=lambda it: it[0], done=q.pairs_done, compute=compute, write=write,
                  size=lambda it: sum(len(x.text) for x in it[2]))
    return _run(cfg, run_id, stage, items)


@stage_flow(name="label", log_prints=True)
def label_flow(cfg: LabelConfig) -> dict[str, Any]:
    logger = run_logger()
    t0 = time.perf_counter()
    c, prompts = load_inputs(cfg)
    if not prompts:
        raise UserError(f"no prompts tagged {','.join(cfg.prompts)}")
    cfg = cfg.model_copy(update={"constitution": c.ref})  # resolved once: a file edited mid-run cannot mix versions
    with recorded_run("label", cfg.model_dump(), model=cfg.reward_model if cfg.source == "best-of-n" else cfg.judge,
                      engine=cfg.engine.backend, constitution=c,
                      url=cfg.database_url) as run:
        logger.info("label %s on %d prompts (%s), source %s, judge %s, run %s", c.ref, len(prompts),
                    ",".join(cfg.prompts), cfg.source, cfg.judge, run.id)
        _JOB.clear()
        _JOB.update(rl_cai.job_size(cfg, len(prompts)))
        try:
            stages = [sample_task(cfg, run.id)] if cfg.source in ("samples", "best-of-n") else []
            if cfg.source == "best-of-n":
                stages.append(best_of_n_task(cfg, run.id))
            else:
                if cfg.cot:
                    stages.append(cot_task(cfg, run.id))
                stages.append(judge_task(cfg, run.id))
                stages.append(pair_task(cfg, run.id))
        finally:
            _JOB.clear()
        found = counts(cfg, c, prompts)
        run.summary = {"run_id": run.id, "constitution": c.ref, "prompts": len(prompts), "source": cfg.source,
                       **found, **stage_totals(stages), "total_s": round(time.perf_counter() - t0, 3)}
        # how the judge (and the policy, for fresh samples) computes; absent when no model was loaded
        judge_eng = cfg.judge_engine or cfg.engine
        if cfg.source != "best-of-n" and (facts := loaded_engine_facts(cfg.judge, judge_eng.backend,
                                                                       **judge_eng.settings)):
            run.summary["engine"] = facts
        if cfg.source in ("samples", "best-of-n") and (facts := loaded_engine_facts(cfg.policy, cfg.engine.backend,
                                                                     **cfg.engine.settings)):
            run.summary["policy_engine"] = facts
        run.timings = {s.stage: round(s.total_s, 3) for s in stages}
    logger.info("label done: %d pairs (%d ok, %d ties, %d position-inconsistent), %d judgments, %.1fs",
                found["pairs"], found["ok"], found["tie"], found["position-inconsistent"], found["judgments"],
                run.summary["total_s"])
    return run.summary
