"""The store reads of `cai report` (flows/report.py); cai/report.py turns them into figures and the page.

    cai report --out reports/latest --constitution harmless@3f2a

`name` / `version` narrow a read to one constitution (`version` a prefix of its version); None reads
every one. The latest training run, eval and red-team campaign are each known by their newest row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from store import ledger
from store.eval_queries import results_of
from store.models import (
    EvalResult,
    PreferencePair,
    Prompt,
    PromptTag,
    RedteamAttack,
    RedteamCandidate,
    Response,
    Run,
    TrainingRun,
    TrainingStep,
)


def where(model: Any, name: str | None, version: str | None) -> list:
    """Filters on a table's constitution/constitution_version columns."""
    if not name:
        return []
    out = [model.constitution == name]
    if version:
        out.append(model.constitution_version.startswith(version))
    return out


def stage_counts(s: Session, name: str | None, version: str | None) -> dict[str, Any]:
    """Responses per kind and round, pairs per method and status, prompts per tag, the ten newest runs."""
    responses = [{"kind": k, "round": r, "count": n} for k, r, n in s.exec(
        select(Response.kind, Response.round, func.count()).where(*where(Response, name, version))
        .group_by(Response.kind, Response.round).order_by(Response.kind, Response.round))]
    pairs = [{"method": m, "status": st, "count": n} for m, st, n in s.exec(
        select(PreferencePair.method, PreferencePair.status, func.count())
        .where(*where(PreferencePair, name, version))
        .group_by(PreferencePair.method, PreferencePair.status).order_by(PreferencePair.method,
                                                                         PreferencePair.status))]
    tags = dict(s.exec(select(PromptTag.tag, func.count()).group_by(PromptTag.tag)
                       .order_by(PromptTag.tag)).all())
    recent = list(s.exec(select(Run).order_by(Run.started_at.desc()).limit(10)))
    spend = ledger.per_run(s, [r.id for r in recent])
    runs = [{"flow": r.flow, "status": r.status, "model": r.model,
             "constitution": f"{r.constitution}@{r.constitution_version}" if r.constitution else "",
             "started_at": r.started_at.isoformat(timespec="seconds"), "id": r.id[:12], "spend": spend.get(r.id)}
            for r in recent]
    return {"responses": responses, "pairs": pairs, "prompt_tags": tags, "recent_runs": runs}


def principle_usage(s: Session, name: str | None, version: str | None) -> dict[str, int]:
    """Revisions per principle, most used first."""
    rows = s.exec(select(Response.principle_id, func.count()).where(Response.kind == "revision",
                                                                    *where(Response, name, version))
                  .group_by(Response.principle_id).order_by(func.count().desc(), Response.principle_id))
    return {pid or "(none)": n for pid, n in rows}


def latest_training(s: Session, name: str | None) -> tuple[TrainingRun, list[TrainingStep]] | None:
    """The newest training run (of constitution `name`) and its step rows by step."""
    stmt = select(TrainingRun).order_by(TrainingRun.started_at.desc())
    if name:  # a run trained on several constitutions lists them comma-separated
        stmt = stmt.where(TrainingRun.constitution.contains(name))
    run = s.exec(stmt.limit(1)).first()
    if run is None:
        return None
    steps = s.exec(select(TrainingStep).where(TrainingStep.training_run_id == run.id)
                   .order_by(TrainingStep.step)).all()
    return run, list(steps)


def latest_eval(s: Session, name: str | None, version: str | None) -> tuple[str, list[EvalResult], Run | None] | None:
    """The newest eval (by its newest row, of a run under constitution `name`): its name, every row of
    it and the run that wrote its first row."""
    stmt = select(EvalResult.eval_name).order_by(EvalResult.created_at.desc())
    if name:
        stmt = stmt.join(Run, Run.id == EvalResult.run_id).where(Run.constitution == name)
        if version:
            stmt = stmt.where(Run.constitution_version.startswith(version))
    latest = s.exec(stmt.limit(1)).first()
    if latest is None:
        return None
    rows = results_of(s, latest)
    return latest, rows, s.get(Run, rows[0].run_id) if rows[0].run_id else None


def latest_redteam(s: Session) -> tuple[str, list[RedteamAttack], list[tuple[str, str, int]]] | None:
    """The newest red-team campaign (by its newest row), its attacks, and the generated candidates of
    its taxonomy version counted per (category, filter verdict)."""
    latest = s.exec(select(RedteamAttack.campaign).order_by(RedteamAttack.created_at.desc()).limit(1)).first()
    if latest is None:
        return None
    rows = list(s.exec(select(RedteamAttack).where(RedteamAttack.campaign == latest)).all())
    version = rows[0].details.get("taxonomy", "")
    cands = s.exec(select(RedteamCandidate.category, RedteamCandidate.verdict, func.count())
                   .where(RedteamCandidate.taxonomy_version == version.partition("@")[2])
                   .group_by(RedteamCandidate.category, RedteamCandidate.verdict)).all()
    return latest, rows, [tuple(c) for c in cands]


def example_chains(s: Session, name: str | None, version: str | None, n: int) -> list[dict[str, Any]]:
    """The `n` newest revision pairs (or, with none, the newest pairs) with what shows their story:
    `pair`, its `prompt` row, the `chain` of responses a revision pair records (initial, critique and
    revision per round), the `shown` pairs (the pair itself when it has no chain, and an AI pair of the
    same prompt) and `texts`: the shown pairs' replies by response id."""
    pairs = s.exec(select(PreferencePair)
                   .where(PreferencePair.method == "revision", *where(PreferencePair, name, version))
                   .order_by(PreferencePair.created_at.desc(), PreferencePair.id).limit(n)).all()
    if not pairs:  # no SL-CAI yet: show AI pairs alone
        pairs = s.exec(select(PreferencePair).where(*where(PreferencePair, name, version))
                       .order_by(PreferencePair.created_at.desc(), PreferencePair.id).limit(n)).all()
    out = []
    for p in pairs:
        chain_ids = (p.details.get("chain") or [p.rejected_id, p.chosen_id]) if p.method == "revision" else []
        chain = [r for r in (s.get(Response, i) for i in chain_ids) if r is not None]
        # a revision pair's chosen/rejected are the chain's last and first rows: not shown twice
        shown = [] if chain else [p]
        ai = s.exec(select(PreferencePair).where(PreferencePair.prompt_id == p.prompt_id,
                                                 PreferencePair.method == "ai",
                                                 *where(PreferencePair, name, version)).limit(1)).first()
        if ai is not None and ai.id != p.id:
            shown.append(ai)
        texts = {i: getattr(s.get(Response, i), "text", "") for q in shown for i in (q.chosen_id, q.rejected_id)}
        out.append({"pair": p, "prompt": s.get(Prompt, p.prompt_id), "chain": chain, "shown": shown,
                    "texts": texts})
    return out
