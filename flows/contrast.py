"""Contrastive refusal pairs and helpfulness pairs as a Prefect flow (the method: cai/contrast.py).

    cai contrast --harmful-prompts red-team,red-team-more --benign-prompts benign,benign-more,benign-forms

One plain reply per prompt (greedy, with repetition controls) and one steered side (a refusal
opening, drawn per prompt). On a harmful prompt the refusal is chosen (method `contrastive`,
under the harmless constitution); on a benign one the plain reply is chosen (method `helpful`,
under helpful-honest). Every pair goes through the quality gates (cai/quality.py): a chosen
reply that loops, is empty, or takes the wrong stance keeps the pair out of training.
Resumable like every stage: rows are keyed by what made them.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlmodel import Session

from cai import contrast
from cai.errors import UserError
from cai.quality import finish
from constitution.load import Constitution
from engines.base import Completion
from flows.common import cached_engine, engine_facts, load_prompts, pair_status, resolve_constitution, worker_id
from flows.configs import ContrastConfig
from flows.stage import Stage, StageStats, run_stage, stage_totals
from store.db import session_scope
from store.models import PreferencePair, Prompt, Response
from store.queries import existing_ids, rows_by_id
from store.runs import recorded_run
from store.upsert import insert_ignore


def _engine(cfg: ContrastConfig):
    return cached_engine(cfg.model, cfg.engine.backend, **cfg.engine.settings)


def load_inputs(cfg: ContrastConfig) -> tuple[dict[bool, Constitution], list[contrast.PromptPlan], dict[str, Prompt]]:
    """Both constitutions and one plan per prompt; a prompt in both groups counts as harmful."""
    with session_scope(cfg.database_url) as s:
        cons = {True: resolve_constitution(s, cfg.harmful_constitution),
                False: resolve_constitution(s, cfg.benign_constitution)}
    harmful = (load_prompts(cfg.database_url, cfg.harmful_prompts, cfg.harmful_limit or cfg.limit)
               if cfg.harmful_prompts else [])
    benign = (load_prompts(cfg.database_url, cfg.benign_prompts, cfg.benign_limit or cfg.limit)
              if cfg.benign_prompts else [])
    seen = {p.id for p in harmful}
    sampling = cfg.sampling.sampling(cfg.seed).to_dict()
    plans, prompts = [], {}
    for is_harmful, group in ((True, harmful), (False, [p for p in benign if p.id not in seen])):
        for p in group:
            prompts[p.id] = p
            plans.append(contrast.plan_prompt(p.id, p.messages, harmful=is_harmful, model=cfg.model,
                                              sampling=sampling, seed=cfg.seed,
                                              openings=contrast.openings_for(
                                                  p.category, is_harmful, tuple(cfg.openings),
                                                  cfg.category_openings),
                                              continue_tokens=cfg.continue_tokens))
    return cons, plans, prompts


def _row(cfg: ContrastConfig, c: Constitution, side: contrast.Side, text: str, quality: dict, run_id: str,
         comp: Completion | None) -> Response:
    return Response(
        id=side.key, prompt_id=side.prompt_id, kind=side.kind, conversation=side.conversation, text=text,
        model=cfg.model, sampling=cfg.sampling.sampling(cfg.seed).to_dict(), seed=cfg.seed, constitution=c.name,
        constitution_version=c.version, run_id=run_id, quality=quality, steering=side.steering,
        prompt_tokens=comp.prompt_tokens if comp else 0,
        completion_tokens=comp.outputs[0].completion_tokens if comp else 0,
        finish_reason=comp.outputs[0].finish_reason if comp else "stop")


@task(name="contrast-generate", cache_policy=NO_CACHE)
def generate_task(cfg: ContrastConfig, run_id: str, which: str) -> StageStats:
    """The plain replies (which="plain") or the model-continued steered sides (which="steered")."""
    cons, plans, prompts = load_inputs(cfg)
    sides = [(p, p.plain if which == "plain" else p.steered) for p in plans]
    sides = [(p, s) for p, s in sides if s.needs_model]
    plan_of = {s.key: p for p, s in sides}
    sampling = cfg.sampling.sampling(cfg.seed)
    if which == "steered":  # a short continuation: one sentence at most is kept
        sampling = type(sampling)(**{**sampling.__dict__, "max_new_tokens": cfg.continue_tokens,
                                     "stop": ("\n", " But", " However", ":")})

    def compute(items: list[contrast.Side]) -> list[Completion | Exception]:
        outs = _engine(cfg).generate([s.conversation for s in items], sampling)
        return [c if c.text.strip() or which == "steered" else ValueError("empty output from the model")
                for c in outs]

    def write(session: Session, results: list[tuple[contrast.Side, Completion]]) -> None:
        rows = []
        for side, comp in results:
            plan = plan_of[side.key]
            request = prompts[plan.prompt_id].text
            if which == "steered":
                text = contrast.steered_text(side.steering["text"], comp.text)
                _, quality = finish(request, text, "stop")
            else:
                text, quality = finish(request, comp.text, comp.outputs[0].finish_reason)
            rows.append(_row(cfg, cons[plan.harmful], side, text, quality, run_id, comp))
        insert_ignore(session, Response, rows)

    stage = Stage(name=f"contrast.{which}", key=lambda s: s.key,
                  done=lambda session, keys: existing_ids(session, Response.id, keys), compute=compute,
                  write=write, tokens=lambda comp: comp.outputs[0].completion_tokens,
                  size=lambda s: sum(len(m["content"]) for m in s.conversation))
    return run_stage(stage, [s for _, s in sides], worker=worker_id(), run_id=run_id, url=cfg.database_url,
                     **cfg.runner.model_dump())


@task(name="contrast-openings", cache_policy=NO_CACHE)
def openings_task(cfg: ContrastConfig, run_id: str) -> int:
    """The steered sides that are the opening alone: fixed text, no model call."""
    cons, plans, prompts = load_inputs(cfg)
    rows = []
    for p in plans:
        if not p.steered.needs_model:
            text = p.steered.steering["text"]
            _, quality = finish(prompts[p.prompt_id].text, text, "stop")
            rows.append(_row(cfg, cons[p.harmful], p.steered, text, quality, run_id, None))
    with session_scope(cfg.database_url) as s:
        return insert_ignore(s, Response, rows)


@task(name="contrast-pairs", cache_policy=NO_CACHE)
def pairs_task(cfg: ContrastConfig, run_id: str) -> dict[str, int]:
    """One pair per prompt whose two sides exist, with its gate status."""
    cons, plans, prompts = load_inputs(cfg)
    counts: dict[str, int] = {}
    with session_scope(cfg.database_url) as s:
        have = rows_by_id(s, Response, [k for p in plans for k in (p.plain.key, p.steered.key)])
        rows = []
        for p in plans:
            plain, steered = have.get(p.plain.key), have.get(p.steered.key)
            if plain is None or steered is None:  # a side failed (and is recorded as a failure)
                continue
            chosen_id, rejected_id = contrast.chosen_rejected(p, plain.id, steered.id)
            chosen, rejected = (steered, plain) if p.harmful else (plain, steered)
            status = pair_status(prompts[p.prompt_id], chosen, rejected, harmful=p.harmful)
            counts[f"{p.method}/{status}"] = counts.get(f"{p.method}/{status}", 0) + 1
            c = cons[p.harmful]
            rows.append(PreferencePair(
                id=contrast.pair_key(c.version, p.prompt_id, chosen_id, rejected_id, p.method), prompt_id=p.prompt_id,
                chosen_id=chosen_id, rejected_id=rejected_id, method=p.method, label_prob=1.0, status=status,
                constitution=c.name, constitution_version=c.version, policy_model=cfg.model, run_id=run_id,
                details={"steering": steered.steering, "plain_id": plain.id, "steered_id": steered.id}))
        counts["new_pairs"] = insert_ignore(s, PreferencePair, rows)
    return counts


@flow(name="contrast", log_prints=True)
def contrast_flow(cfg: ContrastConfig) -> dict[str, Any]:
    logger = get_run_logger()
    t0 = time.perf_counter()
    cons, plans, _ = load_inputs(cfg)
    if not plans:
        raise UserError(f"no prompts tagged {','.join(cfg.harmful_prompts + cfg.benign_prompts)}")
    # resolved once: a constitution file edited mid-run cannot mix versions in one run
    cfg = cfg.model_copy(update={"harmful_constitution": cons[True].ref, "benign_constitution": cons[False].ref})
    with recorded_run("contrast", cfg.model_dump(), model=cfg.model, engine=cfg.engine.backend,
                      constitution=cons[True], url=cfg.database_url) as run:
        n_harm = sum(p.harmful for p in plans)
        logger.info("contrast on %d harmful and %d benign prompts, model %s, run %s", n_harm, len(plans) - n_harm,
                    cfg.model, run.id)
        stages = [generate_task(cfg, run.id, "plain")]
        if cfg.continue_tokens:
            stages.append(generate_task(cfg, run.id, "steered"))
        fixed = openings_task(cfg, run.id)
        pairs = pairs_task(cfg, run.id)
        run.summary = {"run_id": run.id, "prompts": len(plans), "harmful": n_harm, "fixed_openings": fixed,
                       "pairs": pairs, **stage_totals(stages), "total_s": round(time.perf_counter() - t0, 3)}
        if any(s.computed for s in stages):
            run.summary["engine"] = engine_facts(_engine(cfg))
        run.timings = {s.stage: round(s.total_s, 3) for s in stages}
    logger.info("contrast done: %s", ", ".join(f"{k} {v}" for k, v in sorted(pairs.items())))
    return run.summary
