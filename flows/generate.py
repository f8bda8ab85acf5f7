"""SL-CAI as a Prefect flow: initial answer, then [critique -> revision] x rounds, then pairs.

    cai generate --constitution harmless --prompts red-team --rounds 4 --model smollm2-135m

Reads like the recipe: each stage collects every pending item across all prompts, hands the
engine large batches, and writes each chunk in one transaction. Rows are keyed by what made
them (flows.sl_cai.response_key), so a rerun or a second worker does only what is missing,
and editing one principle redoes only the rows that used it and what descends from them.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from constitution.load import Constitution
from engines.base import Completion, Sampling
from flows import sl_cai
from flows.common import cached_engine, engine_facts, finish_run, resolve_constitution, start_run, worker_id
from flows.prompts import ensure_tags, prompts_for_tags
from flows.stage import Stage, StageStats, run_stage
from store.db import session_scope
from store.models import PreferencePair, Prompt, Response
from store.upsert import insert_ignore


class SamplingConfig(BaseModel):
    temperature: float = 0.7  # some diversity; greedy makes a 135M model repeat itself
    top_p: float = 0.9  # trims the unlikely tail that produces garbage tokens
    max_new_tokens: int = 128  # answers are short; CPU time grows linearly with this

    def sampling(self, seed: int) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                        seed=seed)


class GenerateConfig(BaseModel):
    constitution: str = "harmless"  # name (current file), name@version (stored) or a path
    prompts: list[str] = Field(default_factory=lambda: ["red-team"])  # prompt tags; bundled sets auto-import
    limit: int | None = None  # use only the first N prompts (by id): quick runs on a CPU
    model: str = "smollm2-135m"  # bundled default; any HF dir, .gguf file or hub id
    engine: str = "auto"  # hf | vllm | auto (vllm when CUDA and vllm are present)
    engine_settings: dict[str, Any] = Field(default_factory=dict)  # e.g. max_batch_tokens, dtype
    rounds: int = 2  # critique/revision rounds per prompt
    seed: int = 0  # fixes principle draws and every row's sampling stream
    initial: SamplingConfig = Field(default_factory=SamplingConfig)
    critique: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=96))
    revision: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_new_tokens=160))
    chunk_size: int = 64  # items per engine call and per transaction: a crash loses at most this many
    lease_s: float = 900  # how long another worker waits before taking over a silent worker's items
    database_url: str | None = None  # default: CAI_DATABASE_URL or ./cai.db
    show_progress: bool = True  # rich progress bars in a terminal


def _engine(cfg: GenerateConfig):
    return cached_engine(cfg.model, cfg.engine, **cfg.engine_settings)


def _done(session: Session, keys: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(keys), 500):
        found |= set(session.exec(select(Response.id).where(Response.id.in_(keys[i:i + 500]))))
    return found


def _compute(engine, sampling: Sampling):
    def compute(items: list[sl_cai.WorkItem]) -> list[Completion | Exception]:
        outs = engine.generate([it.conversation for it in items], sampling)
        return [c if c.text.strip() else ValueError("empty output from the model") for c in outs]
    return compute


def _writer(cfg: GenerateConfig, c: Constitution, sampling: Sampling, run_id: str, model_id: str):
    def write(session: Session, results: list[tuple[sl_cai.WorkItem, Completion]]) -> None:
        rows = [Response(
            id=it.key, prompt_id=it.prompt_id, kind=it.kind, round=it.round, parent_id=it.parent_id,
            critique_id=it.critique_id, critique=it.critique,
            principle_id=it.principle.id if it.principle else None,
            principle_hash=it.principle.hash if it.principle else None,
            conversation=it.conversation, text=comp.text.strip(), model=model_id, sampling=sampling.to_dict(),
            seed=cfg.seed, constitution=c.name, constitution_version=c.version, run_id=run_id,
            prompt_tokens=comp.prompt_tokens, completion_tokens=comp.outputs[0].completion_tokens,
            finish_reason=comp.outputs[0].finish_reason,
        ) for it, comp in results]
        insert_ignore(session, Response, rows)
    return write


def _stage(name: str, cfg: GenerateConfig, c: Constitution, sampling: Sampling, run_id: str,
           items: list[sl_cai.WorkItem]) -> StageStats:
    engine = _engine(cfg)
    stage = Stage(name=f"generate.{name}", key=lambda it: it.key, done=_done,
                  compute=_compute(engine, sampling), write=_writer(cfg, c, sampling, run_id, cfg.model),
                  tokens=lambda comp: sum(o.completion_tokens for o in comp.outputs), size=lambda it: it.size)
    return run_stage(stage, items, worker=worker_id(), run_id=run_id, chunk_size=cfg.chunk_size,
                     lease_s=cfg.lease_s, url=cfg.database_url, show_progress=cfg.show_progress)


def _load(cfg: GenerateConfig) -> tuple[Constitution, list[Prompt]]:
    with session_scope(cfg.database_url) as s:
        c = resolve_constitution(s, cfg.constitution)
        ensure_tags(s, cfg.prompts)
    with session_scope(cfg.database_url) as s:
        prompts = prompts_for_tags(s, cfg.prompts)
    return c, prompts[: cfg.limit] if cfg.limit else prompts


# --- tasks: thin wrappers; each loads the engine itself (cached per process) ---------------

@task(name="initial", cache_policy=NO_CACHE)
def initial_task(cfg: GenerateConfig, run_id: str) -> StageStats:
    c, prompts = _load(cfg)
    sampling = cfg.initial.sampling(cfg.seed)
    items = [sl_cai.WorkItem(
        key=sl_cai.response_key("initial", p.id, None, 0, cfg.model, sampling.to_dict(), p.messages),
        prompt_id=p.id, kind="initial", round=0, conversation=p.messages) for p in prompts]
    return _stage("initial", cfg, c, sampling, run_id, items)


def _parents(cfg: GenerateConfig, c: Constitution, prompts: list[Prompt], round_: int) -> dict[str, Response]:
    """prompt id -> the response that round `round_` critiques (initial, or last round's revision)."""
    chains = chain_rows(cfg, c, prompts, upto=round_ - 1)
    return {pid: rows[-1] for pid, rows in chains.items() if len(rows) == 2 * (round_ - 1) + 1}


@task(name="critique", cache_policy=NO_CACHE)
def critique_task(cfg: GenerateConfig, run_id: str, round_: int) -> StageStats:
    c, prompts = _load(cfg)
    sampling = cfg.critique.sampling(cfg.seed)
    parents = _parents(cfg, c, prompts, round_)
    items = []
    for p in prompts:
        parent = parents.get(p.id)
        if parent is None:  # its parent is quarantined: nothing to build on
            continue
        principle = sl_cai.draw_principle(c, cfg.seed, p.id, round_)
        conv = sl_cai.critique_conversation(c, p.messages, parent.text, principle)
        items.append(sl_cai.WorkItem(
            key=sl_cai.response_key("critique", p.id, parent.id, round_, cfg.model, sampling.to_dict(), conv),
            prompt_id=p.id, kind="critique", round=round_, conversation=conv, parent_id=parent.id,
            principle=principle))
    return _stage(f"critique_{round_}", cfg, c, sampling, run_id, items)


@task(name="revise", cache_policy=NO_CACHE)
def revise_task(cfg: GenerateConfig, run_id: str, round_: int) -> StageStats:
    c, prompts = _load(cfg)
    sampling = cfg.revision.sampling(cfg.seed)
    chains = chain_rows(cfg, c, prompts, upto=round_ - 1, with_critique_of=round_)
    items = []
    for p in prompts:
        rows = chains.get(p.id, [])
        if len(rows) != 2 * (round_ - 1) + 2:  # needs this round's critique
            continue
        parent, crit = rows[-2], rows[-1]
        principle = sl_cai.draw_principle(c, cfg.seed, p.id, round_)
        conv = sl_cai.revision_conversation(c, p.messages, parent.text, principle, crit.text)
        items.append(sl_cai.WorkItem(
            key=sl_cai.response_key("revision", p.id, parent.id, round_, cfg.model, sampling.to_dict(), conv),
            prompt_id=p.id, kind="revision", round=round_, conversation=conv, parent_id=parent.id,
            critique_id=crit.id, critique=crit.text, principle=principle))
    return _stage(f"revision_{round_}", cfg, c, sampling, run_id, items)


def chain_rows(cfg: GenerateConfig, c: Constitution, prompts: list[Prompt], upto: int,
               with_critique_of: int | None = None) -> dict[str, list[Response]]:
    """Walk each prompt's chain under this config: [initial, critique_1, revision_1, ...].

    Keys are recomputed from the current constitution, so rows made under an older version of
    an edited principle are not on the path (they stay in the store, tied to that version).
    """
    samp = {k: getattr(cfg, k).sampling(cfg.seed).to_dict() for k in ("initial", "critique", "revision")}
    chains: dict[str, list[Response]] = {}
    with session_scope(cfg.database_url) as s:
        for p in prompts:
            row = s.get(Response, sl_cai.response_key("initial", p.id, None, 0, cfg.model, samp["initial"],
                                                      p.messages))
            if row is None:
                continue
            chain = [row]
            last_round = max(upto, with_critique_of or 0)
            for r in range(1, last_round + 1):
                principle = sl_cai.draw_principle(c, cfg.seed, p.id, r)
                parent = chain[-1]
                conv = sl_cai.critique_conversation(c, p.messages, parent.text, principle)
                crit = s.get(Response, sl_cai.response_key("critique", p.id, parent.id, r, cfg.model,
                                                           samp["critique"], conv))
                if crit is None:
                    break
                chain.append(crit)
                if r > upto:  # only this round's critique was asked for
                    break
                conv = sl_cai.revision_conversation(c, p.messages, parent.text, principle, crit.text)
                rev = s.get(Response, sl_cai.response_key("revision", p.id, parent.id, r, cfg.model,
                                                          samp["revision"], conv))
                if rev is None:
                    break
                chain.append(rev)
            chains[p.id] = chain
    return chains


@task(name="revision-pairs", cache_policy=NO_CACHE)
def pairs_task(cfg: GenerateConfig, run_id: str) -> int:
    """chosen = final revision, rejected = initial response, for every finished prompt."""
    c, prompts = _load(cfg)
    chains = chain_rows(cfg, c, prompts, upto=cfg.rounds)
    rows = []
    for pid, chain in chains.items():
        if len(chain) != 2 * cfg.rounds + 1:
            continue
        initial, final = chain[0], chain[-1]
        rows.append(PreferencePair(
            id=sl_cai.revision_pair_key(c.version, pid, final.id, initial.id), prompt_id=pid,
            chosen_id=final.id, rejected_id=initial.id, method="revision", label_prob=1.0,
            principle_ids=[r.principle_id for r in chain if r.kind == "revision"], constitution=c.name,
            constitution_version=c.version, policy_model=cfg.model, run_id=run_id,
            details={"rounds": cfg.rounds, "chain": [r.id for r in chain]}))
    with session_scope(cfg.database_url) as s:
        return insert_ignore(s, PreferencePair, rows)


@flow(name="generate", log_prints=True)
def generate_flow(cfg: GenerateConfig) -> dict[str, Any]:
    logger = get_run_logger()
    t0 = time.perf_counter()
    c, prompts = _load(cfg)
    if not prompts:
        raise ValueError(f"no prompts tagged {cfg.prompts}")
    run_id = start_run("generate", cfg.model_dump(), model=cfg.model, engine=cfg.engine, constitution=c,
                       url=cfg.database_url)
    logger.info("generate %s on %d prompts (%s), %d rounds, model %s, run %s", c.ref, len(prompts),
                ",".join(cfg.prompts), cfg.rounds, cfg.model, run_id)
    try:
        t_load = time.perf_counter()
        _engine(cfg)
        load_s = time.perf_counter() - t_load
        stages = [initial_task(cfg, run_id)]
        for r in range(1, cfg.rounds + 1):
            stages.append(critique_task(cfg, run_id, r))
            stages.append(revise_task(cfg, run_id, r))
        new_pairs = pairs_task(cfg, run_id)
    except BaseException:
        finish_run(run_id, "failed", url=cfg.database_url)
        raise
    total_s = time.perf_counter() - t0 - load_s
    summary = {
        "run_id": run_id, "constitution": c.ref, "prompts": len(prompts), "rounds": cfg.rounds,
        "new_pairs": new_pairs,
        "stages": {s.stage: {"items": s.items, "done_before": s.done_before, "computed": s.computed,
                             "failed": s.failed, "quarantined": s.quarantined, "by_others": s.by_others,
                             "tokens": s.tokens, "engine_s": round(s.engine_s, 3), "total_s": round(s.total_s, 3)}
                   for s in stages},
        "computed": sum(s.computed for s in stages),
        "failed": sum(s.failed for s in stages),
        "tokens": sum(s.tokens for s in stages),
        "engine_s": round(sum(s.engine_s for s in stages), 3),
        "load_s": round(load_s, 3),
        "total_s": round(total_s, 3),
        "engine": engine_facts(_engine(cfg)),
    }
    finish_run(run_id, "completed", summary=summary,
               timings={s.stage: round(s.total_s, 3) for s in stages} | {"load": round(load_s, 3)},
               url=cfg.database_url)
    logger.info("generate done: %d new rows, %d failed, %d new pairs, %.1fs", summary["computed"],
                summary["failed"], new_pairs, total_s)
    return summary
