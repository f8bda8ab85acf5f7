"""`cai judge-report`: how trustworthy the AI labels in the store are, as a table and PNG plots.

    cai judge-report --constitution harmless --out reports/judge

Reads the AI-labelled pairs (method "ai") and their judgments, computes the figures with
`cai.judge_stats` and writes PNG plots plus `figures.json` to the out dir (`flows/plots.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlmodel import Session

from cai.errors import UserError
from cai.judge_stats import JudgmentRecord, PairRecord, compute, records
from constitution.load import split_ref
from flows.output_dir import Owner, check_out
from flows.plots import plot_judge
from store.models import Judgment
from store.queries import ai_pairs, rows_by_id


def load(session: Session, constitution: str | None = None, judge_model: str | None = None,
         ) -> tuple[list[PairRecord], dict[str, JudgmentRecord]]:
    """AI pairs (optionally of NAME or NAME@VERSION, and one judge) with their judgments."""
    name, version = split_ref(constitution) if constitution else (None, None)
    rows = ai_pairs(session, name, version, judge_model)
    if not rows:
        which = " ".join(filter(None, [f"constitution {constitution}" if constitution else "",
                                       f"judge {judge_model}" if judge_model else ""])) or "any constitution"
        raise UserError(f"no AI-labelled pairs in the store for {which}; run `cai label` first")
    keys = sorted({k for r in rows for k in r.details.get("judgments", [])})
    return records(rows, rows_by_id(session, Judgment, keys).values())


def figures(session: Session, constitution: str | None = None, judge_model: str | None = None) -> dict[str, Any]:
    return compute(*load(session, constitution, judge_model))


# figures.json names its writer and its plots: the mark of a directory `cai judge-report` may write again
JUDGE_REPORT = Owner("cai judge-report", "judge report", "figures.json", "cai-factory judge-report",
                     ("figures.json",))


def check_out_dir(out: Path) -> None:
    """`--out` is new, empty or an earlier judge report, and writable: never a person's files."""
    check_out(out, JUDGE_REPORT)


def write(fig: dict[str, Any], out: Path) -> list[Path]:
    check_out_dir(out)
    paths = plot_judge(fig, out)
    mark = {"generator": JUDGE_REPORT.generator, "files": sorted(p.name for p in paths)}
    (out / "figures.json").write_text(json.dumps(fig | mark, indent=2) + "\n", encoding="utf-8")
    return paths + [out / "figures.json"]
