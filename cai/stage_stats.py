"""What one stage of a flow did (`StageStats`, what flows/stage.py `run_stage` returns), and how a Run
summary records it: `stage_summary` per stage, `stage_totals` for a flow's stages together.

    run.summary = {"run_id": run.id, **stage_totals(stages), ...}     # every stage flow's summary
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageStats:
    stage: str
    items: int = 0  # items this stage needed in total
    done_before: int = 0  # already in the store when the stage started
    computed: int = 0  # computed by this worker now
    failed: int = 0  # failed attempts by this worker
    quarantined: int = 0
    by_others: int = 0  # finished by other workers while this one ran
    engine_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    deferred: int = 0  # items an endpoint failed after its retries: failure rows a rerun asks for again
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.engine_s if self.engine_s else 0.0


def stage_summary(s: StageStats) -> dict[str, Any]:
    """One stage's figures as stored in a Run summary."""
    out = {"items": s.items, "done_before": s.done_before, "computed": s.computed, "failed": s.failed,
           "quarantined": s.quarantined, "by_others": s.by_others, "tokens": s.tokens,
           "engine_s": round(s.engine_s, 3), "total_s": round(s.total_s, 3)}
    if s.deferred:
        out["deferred"] = s.deferred
    for k in ("dry_run", "budget_stopped", "spend"):
        if k in s.extra:
            out[k] = s.extra[k]
    return out


def stage_totals(stages: Sequence[StageStats]) -> dict[str, Any]:
    """Per-stage figures and their sums: the part of a Run summary every stage flow shares."""
    out = {"stages": {s.stage: stage_summary(s) for s in stages},
           "computed": sum(s.computed for s in stages), "failed": sum(s.failed for s in stages),
           "tokens": sum(s.tokens for s in stages), "engine_s": round(sum(s.engine_s for s in stages), 3)}
    if any("dry_run" in s.extra for s in stages):
        out["dry_run"] = True
    if stopped := [s.extra["budget_stopped"] for s in stages if "budget_stopped" in s.extra]:
        out["budget_stopped"] = stopped[0]
    return out
