"""SL-CAI as a Prefect flow: initial answer, then [critique -> revision] x rounds, then pairs.

    cai generate --constitution harmless --prompts red-team --rounds 4 --model smollm2-135m

Reads like the recipe: each stage collects every pending item across all prompts, hands the
engine large batches, and writes each chunk in one transaction. Rows are keyed by what made
them (cai.sl_cai.response_key), so a rerun or a second worker does only what is missing,
and editing one principle redoes only the rows that used it and what descends from them.
"""

from __future__ import annotations

import time
from typing import Any

from sqlmodel import Session

from cai import sl_cai
from cai.budget import chat_estimate, placeholder
from cai.errors import UserError
from cai.quality import pair_status
from cai.refusal import Taught
from cai.stage_stats import StageStats, stage_totals
from constitution.govern import Governance
from constitution.load import Constitution
from engines.base import Completion, Sampling
from flows.common import load_prompts, resolve_constitution, run_logger, worker_id
from flows.configs import GenerateConfig
from flows.configs import SamplingConfig as SamplingConfig  # re-exported for callers of flows.generate
from flows.engine_cache import cached_engine, engine_facts
from flows.orchestration import stage_flow, stage_task
from flows.stage import Stage, run_stage
from store.db import session_scope
from store.models import PreferencePair, Prompt, Response
from store.queries import existing_ids, tags_of
from store.runs import recorded_run
from store.upsert import insert_ignore


def _engine(cfg: GenerateConfig, job_tokens: int | None = None):
    if cfg.runner.dry_run:  # a dry run loads no model and sends nothing
        return None
    return cached_engine(cfg.model, cfg.engine.backend, job_tokens=job_tokens, **cfg.engine.settings)


def job_tokens(cfg: GenerateConfig, n_prompts: int) -> int:
    """New tokens the run generates at most: what `engine: auto` weighs against vLLM's start-up."""
    per_round = cfg.critique.max_new_tokens + cfg.revision.max_new_tokens
    return n_prompts * (cfg.initial.max_new_tokens + cfg.rounds * per_round)


def _compute(engine, sampling: Sampling):
    def compute(items: list[sl_cai.WorkItem]) -> list[Completion | Exception]:
        outs = engine.generate([it.conversation for it in items], sampling)
        return [c if c.text.strip() else ValueError("empty output from the model") for c in outs]
    return compute


def _writer(cfg: GenerateConfig, c: Constitution, sampling: Sampling, run_id: str, model_id: str,
            request: dict[str, str]):
    def write(session: Session, results: list[tuple[sl_cai.WorkItem, Completion]]) -> None:
        insert_ignore(session, Response, [
            sl_cai.response_row(it, comp, request[it.prompt_id], c, model_id, sampling.to_dict(), cfg.seed, run_id)
            for it, comp in results])
    return write


def _stage(name: str, cfg: GenerateConfig, c: Constitution, sampling: Sampling, run_id: str,
           items: list[sl_cai.WorkItem], prompts: list[Prompt]) -> StageStats:
    engine = _engine(cfg)
    request = {p.id: p.text for p in prompts}
    stage = Stage(name=f"generate.{name}", key=lambda it: it.key,
                  done=lambda s, keys: existing_ids(s, Response.id, keys),
                  compute=_compute(engine, sampling), write=_writer(cfg, c, sampling, run_id, cfg.model, request),
                  tokens=lambda comp: sum(o.completion_tokens for o in comp.outputs), size=lambda it: it.size,
                  estimate=lambda it: chat_estimate(it.conversation, sampling.max_new_tokens, sampling.n))
    return run_stage(stage, items, worker=worker_id(), run_id=run_id, url=cfg.database_url, **cfg.runner.model_dump())


def load_inputs(cfg: GenerateConfig) -> tuple[Constitution, list[Prompt], dict[str, Any]]:
    """Resolve the constitution and prompts, and which of its principles governs each prompt
    (None: none does); raise UserError on anything unknown."""
    with session_scope(cfg.database_url) as s:
        c = resolve_constitution(s, cfg.constitution)
    prompts = load_prompts(cfg.database_url, cfg.prompts, cfg.limit)
    with session_scope(cfg.database_url) as s:
        tags = tags_of(s, [p.id for p in prompts])
    gov = Governance([c])
    return c, prompts, {p.id: gov.rule(p.category, tags[p.id]) for p in prompts}


def _governing(rules: dict[str, Any], prompt_id: str) -> str | None:
    rule = rules.get(prompt_id)
    return rule.principle.id if rule else None


# --- tasks: thin wrappers; each loads the engine itself (cached per process) ---------------

@stage_task(name="initial")
def initial_task(cfg: GenerateConfig, run_id: str) -> StageStats:
    c, prompts, _ = load_inputs(cfg)
    sampling = cfg.initial.sampling(cfg.seed)
    items = [sl_cai.initial_item(p.id, p.messages, cfg.model, sampling.to_dict()) for p in prompts]
    return _stage("initial", cfg, c, sampling, run_id, items, prompts)


def _parents(cfg: GenerateConfig, c: Constitution, prompts: list[Prompt], rules: dict[str, Any],
             round_: int) -> dict[str, Response]:
    """prompt id -> the response that round `round_` critiques (initial, or last round's revision)."""
    chains = chain_rows(cfg, c, prompts, rules, upto=round_ - 1)
    return {pid: rows[-1] for pid, rows in chains.items() if len(rows) == 2 * (round_ - 1) + 1}


@stage_task(name="critique")
def critique_task(cfg: GenerateConfig, run_id: str, round_: int) -> StageStats:
    c, prompts, rules = load_inputs(cfg)
    sampling = cfg.critique.sampling(cfg.seed)
    parents = _parents(cfg, c, prompts, rules, round_)
    items = []
    for p in prompts:
        parent = parents.get(p.id)
        if parent is None and cfg.runner.dry_run:  # a dry run counts it as if its parent were made
            parent = placeholder(p.id, (cfg.initial if round_ == 1 else cfg.revision).max_new_tokens)
        if parent is None:  # its parent is quarantined: nothing to build on
            continue
        items.append(sl_cai.critique_item(c, p.id, p.messages, parent.id, parent.text, round_, cfg.seed, cfg.model,
                                          sampling.to_dict(), _governing(rules, p.id)))
    return _stage(f"critique_{round_}", cfg, c, sampling, run_id, items, prompts)


@stage_task(name="revise")
def revise_task(cfg: GenerateConfig, run_id: str, round_: int) -> StageStats:
    c, prompts, rules = load_inputs(cfg)
    sampling = cfg.revision.sampling(cfg.seed)
    chains = chain_rows(cfg, c, prompts, rules, upto=round_ - 1, with_critique_of=round_)
    items = []
    for p in prompts:
        rows = chains.get(p.id, [])
        if len(rows) != 2 * (round_ - 1) + 2 and cfg.runner.dry_run:  # as if its parent and critique were made
            rows = [placeholder(p.id, (cfg.initial if round_ == 1 else cfg.revision).max_new_tokens),
                    placeholder(p.id + ":critique", cfg.critique.max_new_tokens)]
        if len(rows) != 2 * (round_ - 1) + 2:  # needs this round's critique
            continue
        parent, crit = rows[-2], rows[-1]
        items.append(sl_cai.revision_item(c, p.id, p.messages, parent.id, parent.text, crit.id, crit.text, round_,
                                          cfg.seed, cfg.model, sampling.to_dict(), _governing(rules, p.id)))
    return _stage(f"revision_{round_}", cfg, c, sampling, run_id, items, prompts)


def chain_rows(cfg: GenerateConfig, c: Constitution, prompts: list[Prompt], rules: dict[str, Any], upto: int,
               with_critique_of: int | None = None) -> dict[str, list[Response]]:
    """Walk each prompt's chain under this config: [initial, critique_1, revision_1, ...].

    Keys are recomputed from the current constitution, so rows made under an older version of
    an edited principle are not on the path (they stay in the store, tied to that version).
    """
    samp = {k: getattr(cfg, k).sampling(cfg.seed).to_dict() for k in ("initial", "critique", "revision")}
    chains: dict[str, list[Response]] = {}
    with session_scope(cfg.database_url) as s:
        for p in prompts:
            row = s.get(Response, sl_cai.initial_item(p.id, p.messages, cfg.model, samp["initial"]).key)
            if row is None:
                continue
            chain = [row]
            last_round = max(upto, with_critique_of or 0)
            for r in range(1, last_round + 1):
                parent = chain[-1]
                crit = s.get(Response, sl_cai.critique_item(c, p.id, p.messages, parent.id, parent.text, r, cfg.seed,
                                                            cfg.model, samp["critique"], _governing(rules, p.id)).key)
                if crit is None:
                    break
                chain.append(crit)
                if r > upto:  # only this round's critique was asked for
                    break
                rev = s.get(Response, sl_cai.revision_item(c, p.id, p.messages, parent.id, parent.text, crit.id,
                                                           crit.text, r, cfg.seed, cfg.model, samp["revision"],
                                                           _governing(rules, p.id)).key)
                if rev is None:
                    break
                chain.append(rev)
            chains[p.id] = chain
    return chains


@stage_task(name="revision-pairs")
def pairs_task(cfg: GenerateConfig, run_id: str) -> int:
    """chosen = final revision, rejected = initial response, for every finished prompt; a pair whose
    revision fails a quality gate (or is no better than the initial answer) is stored as gated."""
    c, prompts, rules = load_inputs(cfg)
    chains = chain_rows(cfg, c, prompts, rules, upto=cfg.rounds)
    by_id = {p.id: p for p in prompts}
    known = Taught.of(Governance([c]).taught_refusals())
    rows = []
    for pid, chain in chains.items():
        if len(chain) != 2 * cfg.rounds + 1:
            continue
        rule = rules.get(pid)
        status = pair_status(by_id[pid], chain[-1], chain[0], rule.refuse if rule else None, known)
        rows.append(sl_cai.revision_pair(c, pid, chain, cfg.rounds, status, cfg.model, run_id))
    with session_scope(cfg.database_url) as s:
        return insert_ignore(s, PreferencePair, rows)


@stage_flow(name="generate", log_prints=True)
def generate_flow(cfg: GenerateConfig) -> dict[str, Any]:
    logger = run_logger()
    t0 = time.perf_counter()
    c, prompts, _ = load_inputs(cfg)
    if not prompts:
        raise UserError(f"no prompts tagged {','.join(cfg.prompts)}")
    cfg = cfg.model_copy(update={"constitution": c.ref})  # resolved once: a file edited mid-run cannot mix versions
    with recorded_run("generate", cfg.model_dump(), model=cfg.model, engine=cfg.engine.backend, constitution=c,
                      url=cfg.database_url) as run:
        logger.info("generate %s on %d prompts (%s), %d rounds, model %s, run %s", c.ref, len(prompts),
                    ",".join(cfg.prompts), cfg.rounds, cfg.model, run.id)
        t_load = time.perf_counter()
        _engine(cfg, job_tokens(cfg, len(prompts)))
        load_s = time.perf_counter() - t_load
        stages = [initial_task(cfg, run.id)]
        for r in range(1, cfg.rounds + 1):
            stages.append(critique_task(cfg, run.id, r))
            stages.append(revise_task(cfg, run.id, r))
        new_pairs = 0 if cfg.runner.dry_run else pairs_task(cfg, run.id)
        total_s = time.perf_counter() - t0 - load_s
        run.summary = {
            "run_id": run.id, "constitution": c.ref, "prompts": len(prompts), "rounds": cfg.rounds,
            "new_pairs": new_pairs, **stage_totals(stages),
            "load_s": round(load_s, 3), "total_s": round(total_s, 3), "engine": engine_facts(_engine(cfg)),
        }
        run.timings = {s.stage: round(s.total_s, 3) for s in stages} | {"load": round(load_s, 3)}
    logger.info("generate done: %d new rows, %d failed, %d new pairs, %.1fs", run.summary["computed"],
                run.summary["failed"], new_pairs, total_s)
    return run.summary
