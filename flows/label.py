"""RL-CAI as a Prefect flow: candidate responses -> judgments in both orders -> soft-labelled pairs.

    cai label --constitution harmless --prompts red-team --policy smollm2-135m \
        --judge smollm2-135m --samples 2 --principles-per-pair 4 [--source store] [--cot]
    cai label --label-source best-of-n --samples 4 --reward-model runs/reward

Stages, each batched over every pending item and resumable (rows are keyed by what made them):
sample (k policy samples per prompt; skipped with --source store) -> cot (optional reasoning)
-> judge ((A)/(B) log-probs per pair x principle x order) -> pair (the averaged soft label).
The pure parts (prompts, draws, probabilities) live in flows/judge.py.

With `--label-source best-of-n` the judge is not asked: sample (N per prompt) -> reward (the
reward model scores all N; best vs worst, soft label sigmoid(margin), cai/best_of_n.py). Its
pairs (method "best-of-n") get their status from the same quality gates as judged pairs.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from cai import best_of_n, judge
from cai.quality import assess
from cai.rl_cai import (
    Candidate,
    JudgmentItem,
    Pair,
    PairItem,
    form_pairs,
    judge_items,
    pair_items,
    sample_key,
)
from constitution.load import Constitution
from engines.base import Completion
from flows.common import (
    UserError,
    cached_engine,
    load_prompts,
    loaded_engine_facts,
    pair_status,
    resolve_constitution,
    run_logger,
    worker_id,
)
from flows.configs import LabelConfig
from flows.configs import make_label_config as make_config  # noqa: F401 - `cai label` and tests call it here
from flows.orchestration import stage_flow, stage_task
from flows.stage import Stage, StageStats, chat_estimate, choice_estimate, run_stage, stage_totals
from store.db import session_scope
from store.keys import content_hash
from store.models import Judgment, PreferencePair, Prompt, Response
from store.queries import existing_ids, rows_by_id, tags_of
from store.runs import recorded_run
from store.upsert import insert_ignore

Message = dict[str, str]
COT_KIND = "judge-cot"  # CoT reasoning is its own Response row so the cot stage can resume


# --- store reads ---------------------------------------------------------------------------

def load_inputs(cfg: LabelConfig) -> tuple[Constitution, list[Prompt]]:
    """Resolve the constitution and prompts; raise UserError on anything unknown. Which stance a
    pair's chosen reply must take comes from this constitution's principles (`stances`)."""
    with session_scope(cfg.database_url) as s:
        c = resolve_constitution(s, cfg.constitution)
    if not c.preferences:
        raise UserError(f"constitution {c.ref} has no preferences: the judge needs at least one question")
    return c, load_prompts(cfg.database_url, cfg.prompts, cfg.limit)


def stances(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> tuple[dict[str, bool | None], Any]:
    """prompt id -> True (refuse) / False (answer) / None (ungoverned) under this constitution's
    principles, and the refusals it teaches (for the gates' stance check)."""
    from cai.refusal import Taught
    from constitution.govern import Governance

    gov = Governance([c])
    with session_scope(cfg.database_url) as s:
        tags = tags_of(s, [p.id for p in prompts])
    return {p.id: gov.refuse(p.category, tags[p.id]) for p in prompts}, Taught.of(gov.taught_refusals())


def preflight(cfg: LabelConfig) -> None:
    """Everything that can be wrong with the input, checked before Prefect starts (seconds)."""
    c, prompts = load_inputs(cfg)
    if not prompts:
        raise UserError(f"no prompts tagged {','.join(cfg.prompts)}")
    if cfg.source == "store":
        candidates(cfg, c, prompts)
    if cfg.source == "best-of-n":
        reward_model_dir(cfg)


def reward_model_dir(cfg: LabelConfig):
    """The reward model directory of best-of-n, checked: a UserError unless `cai reward train` wrote it."""
    import json
    from pathlib import Path

    path = Path(cfg.reward_model).expanduser()
    try:
        arch = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        arch = []
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        raise UserError(f"--reward-model {path}: not a reward model directory; train one with "
                        f"`cai reward train --out {path}`")
    return path


def sample_items(cfg: LabelConfig, prompts: list[Prompt]) -> list[tuple[str, Prompt, int]]:
    return [(sample_key(p.id, cfg.policy, cfg.sampling(i).to_dict(), cfg.seed, i), p, i)
            for p in prompts for i in range(cfg.samples)]


def candidates(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> dict[str, list[Candidate]]:
    """prompt id -> the responses to compare: this config's samples, or stored rows of `kinds`."""
    out: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
    with session_scope(cfg.database_url) as s:
        if cfg.source in ("samples", "best-of-n"):
            keys = [k for k, _, _ in sample_items(cfg, prompts)]
            for i in range(0, len(keys), 500):
                for r in s.exec(select(Response).where(Response.id.in_(keys[i:i + 500]))):
                    out[r.prompt_id].append(Candidate(r.id, r.text, r.model))
            if cfg.runner.dry_run:  # samples not made yet count as made, as long as they may be
                have = {c.id for cs in out.values() for c in cs}
                for key, p, _ in sample_items(cfg, prompts):
                    if key not in have:
                        text = (key + " " + "x" * 4 * cfg.max_new_tokens)[:4 * cfg.max_new_tokens]  # distinct
                        out[p.id].append(Candidate(key, text, cfg.policy))
            return out
        ids = list(out)
        plain = [k for k in cfg.kinds if k not in ("revision", "final-revision")]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = list(s.exec(select(Response).where(Response.prompt_id.in_(chunk), Response.kind.in_(plain),
                                                      Response.model == cfg.policy))) if plain else []
            if "revision" in cfg.kinds or "final-revision" in cfg.kinds:
                # revisions belong to a constitution: only those made under this one's name
                revs = list(s.exec(select(Response).where(
                    Response.prompt_id.in_(chunk), Response.kind == "revision", Response.model == cfg.policy,
                    Response.constitution == c.name)))
                if "revision" in cfg.kinds:
                    rows += revs
                else:
                    last: dict[str, int] = {}
                    for r in revs:
                        last[r.prompt_id] = max(last.get(r.prompt_id, 0), r.round)
                    rows += [r for r in revs if r.round == last[r.prompt_id]]
            for r in rows:
                out[r.prompt_id].append(Candidate(r.id, r.text, r.model))
    if not any(out.values()):
        raise UserError(f"no stored responses of kind {','.join(cfg.kinds)} from model {cfg.policy!r} for "
                        f"prompts tagged {','.join(cfg.prompts)}; run `cai generate` first, or use "
                        "--source samples")
    return out


def plan_pairs(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> list[Pair]:
    cands = candidates(cfg, c, prompts)
    return [pair for p in prompts for pair in form_pairs(p.id, p.messages, cands[p.id])]


def plan_judgments(cfg: LabelConfig, c: Constitution, pairs: list[Pair]) -> list[JudgmentItem]:
    return judge_items(c, pairs, judge_model=cfg.judge, settings=cfg.judge_settings(), seed=cfg.seed,
                       principles_per_pair=cfg.principles_per_pair, max_chars=cfg.max_chars, cot=cfg.cot)


def plan_pair_items(cfg: LabelConfig, c: Constitution, pairs: list[Pair]) -> list[PairItem]:
    return pair_items(c, pairs, plan_judgments(cfg, c, pairs), cfg.judge, cfg.pair_settings())


_JOB: dict[str, Any] = {}  # the running flow's job size (job_size), for `engine: auto`'s choice


def job_size(cfg: LabelConfig, n_prompts: int) -> dict[str, int]:
    """New tokens (samples, CoT arguments) and choice scorings the run needs at most."""
    pairs = n_prompts * (cfg.samples * (cfg.samples - 1) // 2 if cfg.source == "samples" else 1)
    judgments = pairs * cfg.principles_per_pair * 2  # both orders
    tokens = n_prompts * cfg.samples * cfg.max_new_tokens if cfg.source in ("samples", "best-of-n") else 0
    if cfg.cot:
        tokens += judgments * cfg.cot_max_new_tokens
    return {"job_tokens": tokens, "job_scorings": judgments}


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


def _response_done(session: Session, keys: list[str]) -> set[str]:
    return existing_ids(session, Response.id, keys)


def _tokens(comp: Completion) -> int:
    return sum(o.completion_tokens for o in comp.outputs)


def _nonempty(outs: list[Completion]) -> list[Completion | Exception]:
    return [c if c.text.strip() else ValueError("empty output from the model") for c in outs]


# --- tasks: thin wrappers; each loads its engine itself, only when work is pending ----------

@stage_task(name="sample")
def sample_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)

    def compute(items: list[tuple[str, Prompt, int]]) -> list[Completion | Exception]:
        engine = _engine(cfg, cfg.policy)
        results: dict[str, Completion | Exception] = {}
        for index in sorted({i for _, _, i in items}):  # one engine call per sample index
            group = [it for it in items if it[2] == index]
            outs = engine.generate([p.messages for _, p, _ in group], cfg.sampling(index))
            results.update(zip([k for k, _, _ in group], _nonempty(outs), strict=True))
        return [results[k] for k, _, _ in items]

    def write(session: Session, done: list[tuple[tuple[str, Prompt, int], Completion]]) -> None:
        insert_ignore(session, Response, [Response(
            id=key, prompt_id=p.id, kind="sample", sample_index=i, conversation=p.messages,
            text=comp.text.strip(), quality=assess(p.text, comp.text, comp.outputs[0].finish_reason).to_dict(),
            model=cfg.policy, sampling=cfg.sampling(i).to_dict(), seed=cfg.seed,
            constitution=c.name, constitution_version=c.version, run_id=run_id,
            prompt_tokens=comp.prompt_tokens, completion_tokens=comp.outputs[0].completion_tokens,
            finish_reason=comp.outputs[0].finish_reason,
        ) for (key, p, i), comp in done])

    stage = Stage(name="label.sample", key=lambda it: it[0], done=_response_done, compute=compute,
                  write=write, tokens=_tokens, size=lambda it: sum(len(m["content"]) for m in it[1].messages),
                  estimate=lambda it: chat_estimate(it[1].messages, cfg.max_new_tokens))
    return _run(cfg, run_id, stage, sample_items(cfg, prompts))


def cot_key(judgment: str) -> str:
    return content_hash(COT_KIND, judgment)


@stage_task(name="cot")
def cot_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = plan_judgments(cfg, c, plan_pairs(cfg, c, prompts))
    sampling = cfg.cot_sampling()

    def compute(chunk: list[JudgmentItem]) -> list[Completion | Exception]:
        return _nonempty(_judge_engine(cfg).generate(
            [judge.cot_conversation(it.question) for it in chunk], sampling))

    def write(session: Session, done: list[tuple[JudgmentItem, Completion]]) -> None:
        insert_ignore(session, Response, [Response(
            id=cot_key(it.key), prompt_id=it.pair.prompt_id, kind=COT_KIND, principle_id=it.principle.id,
            principle_hash=it.principle.hash, conversation=judge.cot_conversation(it.question),
            text=judge.clean_reasoning(comp.text), model=cfg.judge, sampling=sampling.to_dict(),
            seed=cfg.seed, constitution=c.name, constitution_version=c.version, run_id=run_id,
            prompt_tokens=comp.prompt_tokens, completion_tokens=comp.outputs[0].completion_tokens,
            finish_reason=comp.outputs[0].finish_reason,
        ) for it, comp in done])

    stage = Stage(name="label.cot", key=lambda it: cot_key(it.key), done=_response_done, compute=compute,
                  write=write, tokens=_tokens, size=lambda it: it.size,
                  estimate=lambda it: chat_estimate(judge.cot_conversation(it.question), sampling.max_new_tokens))
    return _run(cfg, run_id, stage, items)


@stage_task(name="judge")
def judge_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = plan_judgments(cfg, c, plan_pairs(cfg, c, prompts))
    reasoning: dict[str, str] = {}
    if cfg.cot:  # judgments whose reasoning is missing (quarantined) wait for a later run
        with session_scope(cfg.database_url) as s:
            rows = rows_by_id(s, Response, [cot_key(it.key) for it in items])
            reasoning.update({k: r.text for k, r in rows.items()})
        items = [it for it in items if cot_key(it.key) in reasoning]
    bounds = cfg.cot_clamp if cfg.cot else None

    def conversation(it: JudgmentItem) -> list[Message]:
        return judge.answer_conversation(it.question, reasoning[cot_key(it.key)] if cfg.cot else None)

    priors: dict[str, float] = {}  # principle id -> the judge's content-free P(A), when calibrating

    def prior(it: JudgmentItem) -> float:
        if it.principle.id not in priors:
            priors[it.principle.id] = judge.prior_a(_judge_engine(cfg), it.principle.question, cfg.max_chars)
        return priors[it.principle.id]

    def compute(chunk: list[JudgmentItem]) -> list[tuple[judge.Scored, float | None]]:
        scored = judge.score(_judge_engine(cfg), [conversation(it) for it in chunk],
                             [it.order for it in chunk], bounds)
        if not cfg.calibrate:
            return [(sc, None) for sc in scored]
        out = []
        for it, sc in zip(chunk, scored, strict=True):
            p_a = judge.calibrate(sc.prob_a, prior(it))
            out.append((sc, judge.clamp(judge.prob_x(it.order, p_a), bounds)))
        return out

    def write(session: Session, done: list[tuple[JudgmentItem, tuple[judge.Scored, float | None]]]) -> None:
        insert_ignore(session, Judgment, [Judgment(
            id=it.key, pair_key=it.pair.key, prompt_id=it.pair.prompt_id, response_x_id=it.pair.x.id,
            response_y_id=it.pair.y.id, principle_id=it.principle.id, principle_hash=it.principle.hash,
            order=it.order, logp_a=r.logp_a, logp_b=r.logp_b, prob_x=r.prob_x if cal is None else cal,
            prob_x_raw=None if cal is None else r.prob_x, scoring=None if r.mode == "logprobs" else r.mode,
            reasoning=reasoning.get(cot_key(it.key)), conversation=conversation(it), judge_model=cfg.judge,
            constitution=c.name, constitution_version=c.version, run_id=run_id,
        ) for it, (r, cal) in done])

    stage = Stage(name="label.judge", key=lambda it: it.key,
                  done=lambda s, keys: existing_ids(s, Judgment.id, keys), compute=compute, write=write,
                  size=lambda it: it.size,
                  estimate=lambda it: choice_estimate(judge.answer_conversation(it.question, reasoning.get(
                      cot_key(it.key), "x" * 4 * cfg.cot_max_new_tokens) if cfg.cot else None)))
    return _run(cfg, run_id, stage, items)


@stage_task(name="pair")
def pair_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = plan_pair_items(cfg, c, plan_pairs(cfg, c, prompts))
    with session_scope(cfg.database_url) as s:  # a pair waits until every judgment of it exists
        have = existing_ids(s, Judgment.id, [k for it in items for k in it.judgments])
    items = [it for it in items if all(k in have for k in it.judgments)]

    hard: dict[str, list[str]] = {}  # pair id -> how its judgments were scored, when not from log-probs

    def compute(chunk: list[PairItem]) -> list[judge.PairLabel]:
        with session_scope(cfg.database_url) as s:
            rows = rows_by_id(s, Judgment, [k for it in chunk for k in it.judgments])
        hard.update({it.id: sorted({rows[k].scoring for k in it.judgments if rows[k].scoring}) for it in chunk})
        return [judge.label_pair([(rows[k].principle_id, rows[k].order, rows[k].prob_x)
                                  for k in it.judgments], cfg.min_margin) for it in chunk]

    refuse, known = stances(cfg, c, prompts)

    def status(session: Session, it: PairItem, lab: judge.PairLabel) -> str:
        """The judge's status; a confident label whose chosen reply fails a quality gate is gated."""
        if lab.status != "ok":
            return lab.status
        chosen, rejected = (it.pair.x, it.pair.y) if lab.chosen == "x" else (it.pair.y, it.pair.x)
        return pair_status(session.get(Prompt, it.pair.prompt_id), session.get(Response, chosen.id),
                           session.get(Response, rejected.id), refuse.get(it.pair.prompt_id), known)

    def write(session: Session, done: list[tuple[PairItem, judge.PairLabel]]) -> None:
        policy = cfg.policy if cfg.source == "samples" else None
        insert_ignore(session, PreferencePair, [PreferencePair(
            id=it.id, prompt_id=it.pair.prompt_id,
            chosen_id=(it.pair.x if lab.chosen == "x" else it.pair.y).id,
            rejected_id=(it.pair.y if lab.chosen == "x" else it.pair.x).id,
            method="ai", label_prob=lab.label_prob, status=status(session, it, lab),
            principle_ids=list(it.principle_ids),
            constitution=c.name, constitution_version=c.version,
            policy_model=policy or ",".join(sorted({it.pair.x.model, it.pair.y.model})),
            judge_model=cfg.judge,
            details={"pair_key": it.pair.key, "x_id": it.pair.x.id, "y_id": it.pair.y.id,
                     "prob_x": lab.prob_x, "mean_xy": lab.mean_xy, "mean_yx": lab.mean_yx,
                     "n_judgments": lab.n, "principle_hashes": it.principle_hashes,
                     "per_principle": lab.per_principle, "judgments": list(it.judgments),
                     "source": cfg.source, "settings": cfg.pair_settings(),
                     **({"scoring": hard[it.id]} if hard.get(it.id) else {})},
            run_id=run_id) for it, lab in done])

    stage = Stage(name="label.pair", key=lambda it: it.id,
                  done=lambda s, keys: existing_ids(s, PreferencePair.id, keys), compute=compute, write=write)
    return _run(cfg, run_id, stage, items)


def plan_best_of_n(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]
                   ) -> list[tuple[str, Prompt, list[Candidate]]]:
    """(pair id, prompt, its sampled replies) for every prompt with at least two non-empty samples."""
    from engines.bundled import model_fingerprint

    rm = model_fingerprint(reward_model_dir(cfg))
    cands = candidates(cfg, c, prompts)
    return [(best_of_n.pair_id(p.id, [x.id for x in cands[p.id]], rm, cfg.min_margin), p, cands[p.id])
            for p in prompts if len(cands[p.id]) >= 2]


@stage_task(name="reward")
def best_of_n_task(cfg: LabelConfig, run_id: str) -> StageStats:
    c, prompts = load_inputs(cfg)
    items = plan_best_of_n(cfg, c, prompts)
    refuse, known = stances(cfg, c, prompts)
    loaded: dict[str, Any] = {}

    def compute(chunk: list[tuple[str, Prompt, list[Candidate]]]) -> list[dict[str, float]]:
        from dpo.config import RewardConfig
        from dpo.reward import load_reward_model, score

        if "model" not in loaded:  # once per task, and only when something is pending
            loaded["model"], loaded["tok"] = load_reward_model(reward_model_dir(cfg), "auto")
        flat = [(p.messages, x.text) for _, p, cands in chunk for x in cands]
        values = iter(score(loaded["model"], loaded["tok"], flat, RewardConfig()))
        return [{x.id: next(values) for x in cands} for _, _, cands in chunk]

    def write(session: Session, done: list[tuple[tuple[str, Prompt, list[Candidate]], dict[str, float]]]) -> None:
        rows = []
        for (key, p, cands), scores in done:
            picked = best_of_n.pick(scores, cfg.min_margin)
            status = picked.status
            if status == "ok":  # the same gates as every other pair: a degenerate "best" is gated
                status = pair_status(session.get(Prompt, p.id), session.get(Response, picked.chosen),
                                     session.get(Response, picked.rejected), refuse.get(p.id), known)
            rows.append(PreferencePair(
                id=key, prompt_id=p.id, chosen_id=picked.chosen, rejected_id=picked.rejected, method="best-of-n",
                label_prob=picked.label_prob, status=status, principle_ids=[], constitution=c.name,
                constitution_version=c.version, policy_model=cfg.policy, judge_model=cfg.reward_model,
                details={"source": "best-of-n", "scores": scores, "margin": picked.margin, "n": len(cands),
                         "min_margin": cfg.min_margin},
                run_id=run_id))
        insert_ignore(session, PreferencePair, rows)

    stage = Stage(name="label.reward", key=lambda it: it[0],
                  done=lambda s, keys: existing_ids(s, PreferencePair.id, keys), compute=compute, write=write,
                  size=lambda it: sum(len(x.text) for x in it[2]))
    return _run(cfg, run_id, stage, items)


def _count_statuses(s, ids: list[str], out: dict[str, int]) -> None:
    """Add the stored pairs among `ids` to `out`, by status and in all ("pairs")."""
    for i in range(0, len(ids), 500):
        for status, n in s.exec(select(PreferencePair.status, func.count()).where(
                PreferencePair.id.in_(ids[i:i + 500])).group_by(PreferencePair.status)):
            out[status] = out.get(status, 0) + n
            out["pairs"] += n


def counts_best_of_n(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> dict[str, int]:
    ids = [k for k, _, _ in plan_best_of_n(cfg, c, prompts)]
    out = {"pairs": 0, "ok": 0, "tie": 0, "position-inconsistent": 0, "judgments": 0, "candidate_pairs": len(ids)}
    with session_scope(cfg.database_url) as s:
        _count_statuses(s, ids, out)
    return out


def counts(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> dict[str, int]:
    """What the store holds for this config: pairs by status and their judgments."""
    items = plan_pair_items(cfg, c, plan_pairs(cfg, c, prompts))
    ids = [it.id for it in items]
    out = {"pairs": 0, "ok": 0, "tie": 0, "position-inconsistent": 0}
    with session_scope(cfg.database_url) as s:
        _count_statuses(s, ids, out)
        out["judgments"] = len(existing_ids(s, Judgment.id, [k for it in items for k in it.judgments]))
    out["candidate_pairs"] = len(items)
    return out


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
        _JOB.update(job_size(cfg, len(prompts)))
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
        found = counts_best_of_n(cfg, c, prompts) if cfg.source == "best-of-n" else counts(cfg, c, prompts)
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
