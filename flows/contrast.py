"""Contrastive pairs and helpfulness pairs from the constitution, as a flow (the method: cai/contrast.py).

    cai contrast --prompts red-team,benign --constitutions harmless,helpful-honest

Each prompt is governed by one principle of the constitutions (constitution/govern.py: by tag,
by category, or the default for uncategorized prompts). One plain reply per prompt (greedy,
with repetition controls) and one steered side: the governing principle's example (a prompt to
refuse: the example is chosen, method `contrastive`) or counter-example (a prompt to answer: the
plain reply is chosen over the needless refusal, method `helpful`). A prompt nothing governs
makes no pair, and the run says how many and of which categories. Every pair records its
principle and goes through the quality gates (cai/quality.py), which know the constitutions'
own refusals; a chosen reply that loops, is empty or takes the wrong stance keeps its pair out.
Resumable like every stage: rows are keyed by what made them.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from sqlmodel import Session

from cai import contrast
from cai.budget import chat_estimate
from cai.errors import UserError
from cai.quality import finish, pair_status
from cai.stage_stats import StageStats, stage_totals
from engines.base import Completion
from flows.common import governance, load_prompts, run_logger, taught, worker_id
from flows.configs import ContrastConfig
from flows.engine_cache import cached_engine, engine_facts
from flows.orchestration import stage_flow, stage_task
from flows.stage import Stage, run_stage
from store.db import session_scope
from store.models import PreferencePair, Response
from store.queries import existing_ids, note_rederived, rows_by_id, tags_of
from store.runs import recorded_run
from store.upsert import insert_ignore


def _engine(cfg: ContrastConfig):
    return cached_engine(cfg.model, cfg.engine.backend, **cfg.engine.settings)


def load_inputs(cfg: ContrastConfig):
    """(governance, one plan per governed prompt, the prompts by id, ungoverned categories counted).

    `refuse_limit` / `answer_limit` keep the first N prompts (by id) of each stance: the balance
    of refusal and helpfulness pairs is what decides over-refusal."""
    prompts = load_prompts(cfg.database_url, cfg.prompts, None)
    with session_scope(cfg.database_url) as s:
        gov = governance(s, cfg.constitutions)
        tags = tags_of(s, [p.id for p in prompts])
    sampling = cfg.sampling.sampling(cfg.seed).to_dict()
    caps = {True: cfg.refuse_limit or cfg.limit, False: cfg.answer_limit or cfg.limit}
    kept: Counter[bool] = Counter()
    plans, by_id, ungoverned = [], {}, Counter()
    for p in prompts:
        rule = gov.rule(p.category, tags[p.id])
        if rule is None:
            ungoverned[p.category or "(no category)"] += 1
            continue
        if caps[rule.refuse] and kept[rule.refuse] >= caps[rule.refuse]:
            continue
        plan = contrast.plan_prompt(p.id, p.messages, rule, model=cfg.model, sampling=sampling, seed=cfg.seed,
                                    continue_tokens=cfg.continue_tokens)
        if plan is None:  # the principle has no example to steer with: `cai constitution lint` says so
            ungoverned[f"{p.category or '(no category)'} ({rule.ref} has no texts)"] += 1
            continue
        kept[rule.refuse] += 1
        plans.append(plan)
        by_id[p.id] = p
    return gov, plans, by_id, ungoverned


def _row(cfg: ContrastConfig, plan: contrast.PromptPlan, side: contrast.Side, text: str, quality: dict,
         run_id: str, comp: Completion | None) -> Response:
    c, principle = plan.rule.constitution, plan.rule.principle
    steered = side.steering is not None
    return Response(
        id=side.key, prompt_id=side.prompt_id, kind=side.kind, conversation=side.conversation, text=text,
        model=cfg.model, sampling=cfg.sampling.sampling(cfg.seed).to_dict(), seed=cfg.seed,
        constitution=c.name if steered else None, constitution_version=c.version if steered else None,
        principle_id=principle.id if steered else None, principle_hash=principle.hash if steered else None,
        run_id=run_id, quality=quality, steering=side.steering,
        prompt_tokens=comp.prompt_tokens if comp else 0,
        completion_tokens=comp.outputs[0].completion_tokens if comp else 0,
        finish_reason=comp.outputs[0].finish_reason if comp else "stop")


def _wanted(plan: contrast.PromptPlan, which: str) -> contrast.Side | None:
    """The side of `plan` that stage `which` computes, if the model has to write it."""
    side = plan.plain if which == "plain" else plan.steered
    if not side.needs_model:
        return None
    if which == "plain":
        return side
    completes = side.steering["kind"] == "completed-opening"
    return side if completes == (which == "completed") else None


@stage_task(name="contrast-generate")
def generate_task(cfg: ContrastConfig, run_id: str, which: str) -> StageStats:
    """The plain replies (which="plain"), the counter-openings the model completes into a needless
    refusal naming the prompt's topic (which="completed"), or the model-continued steered sides
    (which="steered", with `continue_tokens`)."""
    gov, plans, prompts, _ = load_inputs(cfg)
    known = taught(gov)
    sides = [(p, s) for p in plans if (s := _wanted(p, which)) is not None]
    plan_of = {s.key: p for p, s in sides}
    sampling = cfg.sampling.sampling(cfg.seed)
    if which == "steered":  # a short continuation: one sentence at most is kept
        sampling = type(sampling)(**{**sampling.__dict__, "max_new_tokens": cfg.continue_tokens,
                                     "stop": ("\n", " But", " However", ":")})
    if which == "completed":  # the rest of the opening's sentence
        sampling = type(sampling)(**{**sampling.__dict__, "max_new_tokens": contrast.OPENING_TOKENS,
                                     "stop": ("\n",)})

    def compute(items: list[contrast.Side]) -> list[Completion | Exception]:
        outs = _engine(cfg).generate([s.conversation for s in items], sampling)
        if which == "completed":  # no sentence after the opening: a failed item, retried by a rerun
            return [c if contrast.completed_text(s.steering["text"], c.text) else
                    ValueError(f"the model did not finish the sentence {s.steering['text']!r}: {c.text[:80]!r}")
                    for s, c in zip(items, outs, strict=True)]
        return [c if c.text.strip() or which == "steered" else ValueError("empty output from the model")
                for c in outs]

    def write(session: Session, results: list[tuple[contrast.Side, Completion]]) -> None:
        rows = []
        for side, comp in results:
            plan = plan_of[side.key]
            request = prompts[plan.prompt_id].text
            if which == "steered":
                text = contrast.steered_text(side.steering["text"], comp.text)
                _, quality = finish(request, text, "stop", known)
            elif which == "completed":
                text = contrast.completed_text(side.steering["text"], comp.text) or ""
                _, quality = finish(request, text, "stop", known)
            else:
                text, quality = finish(request, comp.text, comp.outputs[0].finish_reason, known)
            rows.append(_row(cfg, plan, side, text, quality, run_id, comp))
        insert_ignore(session, Response, rows)

    stage = Stage(name=f"contrast.{which}", key=lambda s: s.key,
                  done=lambda session, keys: existing_ids(session, Response.id, keys), compute=compute,
                  write=write, tokens=lambda comp: comp.outputs[0].completion_tokens,
                  size=lambda s: sum(len(m["content"]) for m in s.conversation),
                  estimate=lambda s: chat_estimate(s.conversation, sampling.max_new_tokens))
    return run_stage(stage, [s for _, s in sides], worker=worker_id(), run_id=run_id, url=cfg.database_url,
                     **cfg.runner.model_dump())


@stage_task(name="contrast-openings")
def openings_task(cfg: ContrastConfig, run_id: str) -> int:
    """The steered sides that are the constitution's text alone: no model call."""
    gov, plans, prompts, _ = load_inputs(cfg)
    known = taught(gov)
    rows = []
    for p in plans:
        if not p.steered.needs_model:
            text = p.steered.steering["text"]
            _, quality = finish(prompts[p.prompt_id].text, text, "stop", known)
            rows.append(_row(cfg, p, p.steered, text, quality, run_id, None))
    with session_scope(cfg.database_url) as s:
        return insert_ignore(s, Response, rows)


@stage_task(name="contrast-pairs")
def pairs_task(cfg: ContrastConfig, run_id: str) -> dict[str, Any]:
    """One pair per prompt whose two sides exist, with its principle and gate status."""
    gov, plans, prompts, _ = load_inputs(cfg)
    known = taught(gov)
    counts: dict[str, int] = {}
    per_principle: Counter[str] = Counter()
    with session_scope(cfg.database_url) as s:
        have = rows_by_id(s, Response, [k for p in plans for k in (p.plain.key, p.steered.key)])
        rows = []
        for p in plans:
            plain, steered = have.get(p.plain.key), have.get(p.steered.key)
            if plain is None or steered is None:  # a side failed (and is recorded as a failure)
                continue
            chosen, rejected = contrast.chosen_rejected(p, plain, steered)
            status = pair_status(prompts[p.prompt_id], chosen, rejected, p.refuse, known)
            counts[f"{p.method}/{status}"] = counts.get(f"{p.method}/{status}", 0) + 1
            per_principle[f"{p.rule.ref}/{status}"] += 1
            rows.append(contrast.pair_row(p, plain, steered, status=status, policy_model=cfg.model, run_id=run_id))
        counts["new_pairs"] = insert_ignore(s, PreferencePair, rows)
        counts["carried_over"] = note_rederived(s, rows)  # unchanged pairs of an edited principle
    return counts | {"per_principle": dict(sorted(per_principle.items()))}


@stage_flow(name="contrast", log_prints=True)
def contrast_flow(cfg: ContrastConfig) -> dict[str, Any]:
    logger = run_logger()
    t0 = time.perf_counter()
    gov, plans, _, ungoverned = load_inputs(cfg)
    if not plans:
        why = (f"; none is governed by a principle of {', '.join(cfg.constitutions)} (categories: "
               + ", ".join(f"{k} {v}" for k, v in ungoverned.most_common()) + "): add the category or a tag "
               "to a principle's `governs`, with `stance: refuse` or `stance: answer`") if ungoverned else ""
        raise UserError(f"no prompts to pair in {','.join(cfg.prompts)}{why}")
    # resolved once: a constitution file edited mid-run cannot mix versions in one run
    cfg = cfg.model_copy(update={"constitutions": [c.ref for c in gov.constitutions]})
    with recorded_run("contrast", cfg.model_dump(), model=cfg.model, engine=cfg.engine.backend,
                      constitution=gov.constitutions[0], url=cfg.database_url) as run:
        n_refuse = sum(p.refuse for p in plans)
        logger.info("contrast on %d prompts to refuse and %d to answer (%s), model %s, run %s", n_refuse,
                    len(plans) - n_refuse, ", ".join(cfg.constitutions), cfg.model, run.id)
        if ungoverned:
            logger.warning("%d prompts are governed by no principle and make no pair: %s", sum(ungoverned.values()),
                           ", ".join(f"{k} {v}" for k, v in ungoverned.most_common()))
        stages = [generate_task(cfg, run.id, "plain")]
        if any(p.steered.steering["kind"] == "completed-opening" for p in plans):
            stages.append(generate_task(cfg, run.id, "completed"))
        if cfg.continue_tokens:
            stages.append(generate_task(cfg, run.id, "steered"))
        dry = cfg.runner.dry_run  # writes nothing, not even the rows that need no model
        fixed = 0 if dry else openings_task(cfg, run.id)
        pairs = {"per_principle": {}} if dry else pairs_task(cfg, run.id)
        run.summary = {"run_id": run.id, "prompts": len(plans), "refuse": n_refuse, "fixed_openings": fixed,
                       "pairs": {k: v for k, v in pairs.items() if k != "per_principle"},
                       "per_principle": pairs["per_principle"], "ungoverned": dict(ungoverned),
                       **stage_totals(stages), "total_s": round(time.perf_counter() - t0, 3)}
        if any(s.computed for s in stages):
            run.summary["engine"] = engine_facts(_engine(cfg))
        run.timings = {s.stage: round(s.total_s, 3) for s in stages}
    logger.info("contrast done: %s", ", ".join(f"{k} {v}" for k, v in sorted(run.summary["pairs"].items())))
    return run.summary
