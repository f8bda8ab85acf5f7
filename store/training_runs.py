"""TrainingRun and TrainingStep rows: what `cai train` and `cai reward train` write as they run.

    start_training_run(url, TrainingRun(id=..., run_id=run.id, ...))   # new, or a resumed run's row
    on_metrics = step_writer(training_run_id, url, prefix="sft-")     # one TrainingStep per step and split
    complete_training_run(training_run_id, url, selection, final_metrics)

A failed or stopped run's TrainingRun is closed with its Run (store/runs.py: finish_run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from store.db import session_scope
from store.models import TrainingRun, TrainingStep, utcnow
from store.upsert import insert_ignore, upsert


def start_training_run(url: str | None, row: TrainingRun) -> None:
    """Store `row` unless its id is there (a resumed run keeps its row and its steps), and mark it
    `running` under this Run with this run's config."""
    with session_scope(url) as s:
        insert_ignore(s, TrainingRun, [row])
        stored = s.get(TrainingRun, row.id)
        stored.status, stored.run_id, stored.config = "running", row.run_id, row.config
        s.add(stored)


def training_run_state(url: str | None, training_run_id: str | None) -> tuple[str | None, dict[str, Any] | None]:
    """(status, config) of a stored TrainingRun; (None, None) when there is none."""
    with session_scope(url) as s:
        row = s.get(TrainingRun, training_run_id) if training_run_id else None
        return (row.status, row.config) if row else (None, None)


def step_writer(training_run_id: str, url: str | None,
                prefix: str = "") -> Callable[[int, str, dict[str, float]], None]:
    """The training loops' on_metrics: one TrainingStep row per (step, prefix + split), rewritten on a rerun."""
    def write(step: int, split: str, metrics: dict[str, float]) -> None:
        with session_scope(url) as s:
            upsert(s, TrainingStep, [TrainingStep(training_run_id=training_run_id, step=step, split=prefix + split,
                                                  metrics=metrics)], update=["metrics", "created_at"])
    return write


def complete_training_run(training_run_id: str, url: str | None, selection: dict[str, Any],
                          metrics: dict[str, Any]) -> None:
    """The TrainingRun of a run that trained: `completed`, with its final metrics and data selection."""
    with session_scope(url) as s:
        row = s.get(TrainingRun, training_run_id)
        if row is None:
            return
        row.status, row.finished_at = "completed", utcnow()
        row.final_metrics, row.data_selection = metrics, selection
        s.add(row)
