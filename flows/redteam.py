"""Automated red-teaming as a Prefect flow: the model writes new attack prompts per harm category,
they are filtered and stored, then the policy answers them and the hits are tagged.

    cai redteam --taxonomy harms --per-category 20 --model smollm2-135m

Reads like the recipe. Round r plans, for every category that has kept fewer than per_category
new prompts in the rounds before it, oversample x (missing) candidates; each is one attacker
conversation (cai.redteam.attacker_conversation) keyed by what made it (cai.redteam.item_key),
so a rerun or a second worker does only what is missing. Each chunk's lines are filtered against
every prompt already stored (cai.redteam.judge_candidate) and written in one transaction:
a RedteamCandidate row per line with its verdict and lineage, and a Prompt row (tagged
redteam-gen and its category) per line kept. The campaign stage has the policy answer every kept
prompt of this taxonomy version greedily; a harmful one answered, or a benign one refused, is a hit
(tagged redteam-hit, so `cai generate --prompts redteam-hit` and `cai label` can target it).
The rules, items and rows are cai/redteam.py's, the store reads store/redteam.py's.
"""

from __future__ import annotations

import math
import time
from typing import Any

from sqlmodel import Session

from cai import redteam
from cai.budget import chat_estimate
from cai.errors import UserError
from cai.evaluate import short_name
from cai.prompts import ParsedPrompt
from cai.redteam import AttackItem, GenItem
from cai.stage_stats import StageStats, stage_totals
from constitution.taxonomy import Category, Taxonomy, TaxonomyError, load_taxonomy
from engines.base import Completion
from flows.common import run_logger, worker_id
from flows.configs import RedteamConfig
from flows.engine_cache import cached_engine, drop_engines, engine_facts
from flows.orchestration import stage_flow, stage_task
from flows.stage import Stage, run_stage
from store import redteam as redteam_store
from store.db import session_scope, write_lock
from store.keys import content_hash
from store.models import Prompt, PromptTag, RedteamAttack, RedteamCandidate, TaxonomyVersion
from store.queries import existing_ids, rows_by_id, store_prompts
from store.runs import recorded_run
from store.upsert import insert_ignore


def load_inputs(cfg: RedteamConfig) -> tuple[Taxonomy, list[Category]]:
    """The taxonomy and the categories asked for; UserError on anything unknown or inconsistent."""
    try:
        tax = load_taxonomy(cfg.taxonomy)
    except TaxonomyError as exc:
        raise UserError(str(exc)) from None
    known = [c.id for c in tax.categories]
    for cid in cfg.categories:
        if cid not in known:
            raise UserError(f"--categories: {cid!r} is not a category of {tax.source_path} (known: {', '.join(known)})")
    # the taxonomy's `kind` decides what counts as a hit here; whether the constitutions govern its
    # categories the same way is `cai constitution lint`'s to check
    return tax, [c for c in tax.categories if not cfg.categories or c.id in cfg.categories]


def _seed_prompt(text: str, category: str) -> ParsedPrompt:
    return ParsedPrompt([{"role": "user", "content": text}], category)


def record_taxonomy(session: Session, tax: Taxonomy) -> dict[str, list[tuple[str, str]]]:
    """Store this version's text and its seeds (as prompts tagged redteam-seed); category -> [(id, text)]."""
    insert_ignore(session, TaxonomyVersion, [TaxonomyVersion(name=tax.name, version=tax.version,
                                                             canonical=tax.canonical, source_text=tax.source_text,
                                                             source_path=tax.source_path)])
    pools = {}
    for c in tax.categories:
        parsed = [_seed_prompt(s.prompt, c.id) for s in c.seeds]
        store_prompts(session, parsed, f"taxonomy:{tax.ref}", [redteam.SEED_TAG, c.id])
        pools[c.id] = [(p.id, p.messages[-1]["content"]) for p in parsed]
    return pools


def plan(cfg: RedteamConfig, tax: Taxonomy, cats: list[Category], pools: dict[str, list[tuple[str, str]]],
         round_: int) -> list[GenItem]:
    """Round `round_`'s items: what each category still misses after the earlier rounds' verdicts."""
    sampling = cfg.attacker_sampling().to_dict()
    kept = {c.id: 0 for c in cats}
    items: list[GenItem] = []
    for r in range(round_ + 1):
        items = []
        for c in cats:
            missing = cfg.per_category - kept[c.id]
            if missing <= 0:
                continue
            for i in range(math.ceil(missing * cfg.oversample)):
                key = redteam.item_key(tax.version, c.id, cfg.model, sampling, cfg.shots, cfg.seed, r, i)
                pool = pools[c.id]
                shots = [pool[j] for j in redteam.draw_shots([t for _, t in pool], cfg.shots, key)]
                items.append(GenItem(key, c, r, tuple(pid for pid, _ in shots),
                                     redteam.attacker_conversation(c.description, [t for _, t in shots])))
        if r == round_:
            break
        with session_scope(cfg.database_url) as s:
            rows = rows_by_id(s, RedteamCandidate, [it.key for it in items])
        for row in rows.values():
            kept[row.category] += row.verdict == "kept"
    return items


def write_candidates(session: Session, cfg: RedteamConfig, tax: Taxonomy, sampling: Any, run_id: str,
                     results: list[tuple[GenItem, Completion]]) -> None:
    """Judge each generated line against every stored prompt and write its RedteamCandidate (and a
    Prompt when kept). Under a lock on the corpus: two workers judging at once both found a line new
    and both kept it (duplicates, and the per-category quotas counted twice)."""
    write_lock(session, "redteam-corpus")
    corpus = redteam.Corpus(redteam_store.corpus_texts(session))  # read after the lock: the latest store
    rows = []
    for it, comp in results:
        v = redteam.judge_candidate(comp.text, corpus, cfg.min_words, cfg.max_words, cfg.near_dup)
        prompt_id = None
        if v.verdict == "kept":
            p = _seed_prompt(v.text, it.category.id)
            store_prompts(session, [p], f"redteam:{tax.ref}", [redteam.GEN_TAG, it.category.id])
            prompt_id = p.id
        rows.append(RedteamCandidate(
            id=it.key, taxonomy=tax.name, taxonomy_version=tax.version, category=it.category.id,
            kind=it.category.kind, round=it.round, shot_ids=list(it.shot_ids), conversation=it.conversation,
            raw=comp.text, text=v.text, verdict=v.verdict, match=v.match, score=v.score, prompt_id=prompt_id,
            model=cfg.model, sampling=sampling.to_dict(), seed=cfg.seed, run_id=run_id))
    session.flush()  # the prompts first: candidates point at them
    insert_ignore(session, RedteamCandidate, rows)


@stage_task(name="redteam-generate")
def generate_task(cfg: RedteamConfig, run_id: str, round_: int) -> StageStats:
    tax, cats = load_inputs(cfg)
    with session_scope(cfg.database_url) as s:
        pools = record_taxonomy(s, tax)
    items = plan(cfg, tax, cats, pools, round_)
    sampling = cfg.attacker_sampling()
    engine = None if cfg.runner.dry_run else cached_engine(cfg.model, cfg.engine.backend, **cfg.engine.settings)

    def compute(chunk: list[GenItem]) -> list[Completion]:
        return engine.generate([it.conversation for it in chunk], sampling)

    def write(session: Session, results: list[tuple[GenItem, Completion]]) -> None:
        write_candidates(session, cfg, tax, sampling, run_id, results)

    stage = Stage(name=f"redteam.generate_{round_}", key=lambda it: it.key,
                  done=lambda s, keys: existing_ids(s, RedteamCandidate.id, keys), compute=compute, write=write,
                  tokens=lambda comp: comp.outputs[0].completion_tokens,
                  size=lambda it: len(it.conversation[1]["content"]),
                  estimate=lambda it: chat_estimate(it.conversation, sampling.max_new_tokens))
    return run_stage(stage, items, worker=worker_id(), run_id=run_id, url=cfg.database_url, **cfg.runner.model_dump())


def campaign_name(cfg: RedteamConfig, tax: Taxonomy) -> str:
    from engines.bundled import model_fingerprint

    return (f"{short_name(cfg.policy_model)}@"
            + content_hash(model_fingerprint(cfg.policy_model), cfg.campaign_sampling().to_dict(), tax.version,
                           cfg.engine.backend, length=8))


def campaign_items(cfg: RedteamConfig, tax: Taxonomy, name: str) -> list[AttackItem]:
    """Every kept prompt of this taxonomy version (any earlier run too), in the categories asked for."""
    _, cats = load_inputs(cfg)
    wanted = {c.id for c in cats}
    with session_scope(cfg.database_url) as s:
        cands = redteam_store.kept_candidates(s, tax.version)
        prompts = rows_by_id(s, Prompt, {c.prompt_id for c in cands})
    seen, items = set(), []
    for c in sorted(cands, key=lambda c: c.prompt_id):
        if c.category in wanted and c.prompt_id not in seen and c.prompt_id in prompts:
            seen.add(c.prompt_id)
            items.append(AttackItem(content_hash("redteam-attack", name, c.prompt_id), prompts[c.prompt_id],
                                    c.category, c.kind))
    return items


@stage_task(name="redteam-campaign")
def campaign_task(cfg: RedteamConfig, run_id: str) -> StageStats:
    tax, _ = load_inputs(cfg)
    name = campaign_name(cfg, tax)
    items = campaign_items(cfg, tax, name)
    sampling = cfg.campaign_sampling()
    engine = None if cfg.runner.dry_run else cached_engine(cfg.policy_model, cfg.engine.backend,
                                                            **cfg.engine.settings)

    def compute(chunk: list[AttackItem]) -> list[Completion]:
        return engine.generate([it.prompt.messages for it in chunk], sampling)

    def write(session: Session, results: list[tuple[AttackItem, Completion]]) -> None:
        rows = [redteam.attack_row(it, comp.text, comp.outputs[0].finish_reason, name, cfg.policy_model,
                                   sampling.to_dict(), tax.ref, run_id) for it, comp in results]
        insert_ignore(session, RedteamAttack, rows)
        insert_ignore(session, PromptTag, [PromptTag(prompt_id=r.prompt_id, tag=redteam.HIT_TAG)
                                           for r in rows if r.success])

    stage = Stage(name="redteam.campaign", key=lambda it: it.key,
                  done=lambda s, keys: existing_ids(s, RedteamAttack.id, keys), compute=compute, write=write,
                  tokens=lambda comp: comp.outputs[0].completion_tokens, size=lambda it: len(it.prompt.text),
                  estimate=lambda it: chat_estimate(it.prompt.messages, sampling.max_new_tokens))
    return run_stage(stage, items, worker=worker_id(), run_id=run_id, url=cfg.database_url, **cfg.runner.model_dump())


def campaign_results(url: str | None, name: str) -> dict[str, dict[str, Any]]:
    with session_scope(url) as s:
        return redteam.campaign_table(redteam_store.campaign_outcomes(s, name))


@stage_flow(name="redteam", log_prints=True)
def redteam_flow(cfg: RedteamConfig) -> dict[str, Any]:
    logger = run_logger()
    t0 = time.perf_counter()
    tax, cats = load_inputs(cfg)
    with recorded_run("redteam", cfg.model_dump() | {"taxonomy_version": tax.ref}, model=cfg.model,
                      engine=cfg.engine.backend, url=cfg.database_url) as run:
        logger.info("redteam %s: %d categories x %d prompts, attacker %s, run %s", tax.ref, len(cats),
                    cfg.per_category, cfg.model, run.id)
        stages = []
        for r in range(cfg.max_rounds):
            st = generate_task(cfg, run.id, r)
            if not st.items:  # every category has its prompts
                break
            stages.append(st)
            if cfg.runner.dry_run:  # later rounds top up what the filters reject: unknown before it runs
                break
        gen_s = time.perf_counter() - t0
        with session_scope(cfg.database_url) as s:
            made = redteam.funnel(redteam_store.run_verdicts(s, run.id))
        kept = made["kept"]
        summary: dict[str, Any] = {
            "run_id": run.id, "taxonomy": tax.ref, "categories": len(cats), **made,
            "generate_s": round(gen_s, 3), "s_per_kept": round(gen_s / kept, 3) if kept else None,
        }
        if cfg.campaign:
            if cfg.policy_model != cfg.model:
                drop_engines()  # one model in memory at a time
            stages.append(campaign_task(cfg, run.id))
            name = campaign_name(cfg, tax)
            summary |= {"campaign": name, "attack_success": campaign_results(cfg.database_url, name)}
        summary |= {**stage_totals(stages), "total_s": round(time.perf_counter() - t0, 3)}
        if not cfg.runner.dry_run:
            summary["engine"] = engine_facts(cached_engine(cfg.policy_model if cfg.campaign else cfg.model,
                                                           cfg.engine.backend, **cfg.engine.settings))
        run.summary = summary
        run.timings = {s.stage: round(s.total_s, 3) for s in stages}
    logger.info("redteam done: %d generated, %d kept (%s), %.1fs", summary["generated"], kept,
                summary["filter_pass"], summary["total_s"])
    return run.summary
