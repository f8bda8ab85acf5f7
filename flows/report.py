"""A static HTML report of everything in the store: one page, PNG plots beside it.

    cai report --out reports/latest [--constitution harmless]

Sections: rows per stage, principle usage, judge label quality (cai/judge_stats.py), people's
review, DPO curves of the latest training run, the latest eval (win rate, refusal rates
before/after), the latest red-team campaign and a few example chains with their constitution
version. The store reads are in store/report_queries.py, the figures and the HTML in cai/report.py,
the plots in flows/plots.py; the page is written with report.json holding every figure.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session

from cai import report
from cai.errors import UserError
from cai.judge_stats import compute as judge_compute
from cai.judge_stats import records
from cai.review import compute as review_compute
from cai.review import public as review_public
from cai.review import verdict_from_row
from constitution.load import split_ref
from flows.configs import ReportConfig
from flows.orchestration import stage_flow
from flows.output_dir import Owner, check_out
from flows.plots import DPO_PANELS, plot_all
from store import report_queries as q
from store.db import session_scope
from store.models import Judgment
from store.queries import ai_pairs, rows_by_id
from store.reviews import verdict_rows

IMAGES = ("stages.png", "principles.png", "dpo.png", "eval.png", "redteam.png", "label_prob_hist.png",
          "position_consistency.png", "principle_agreement.png", "review_calibration.png")
# report.json names its writer and its plots: the mark of a directory `cai report` may write again
# (one an older version wrote is known by its sections, and holds only names a report writes)
REPORT = Owner("cai report", "report", "report.json", "cai-factory report", ("index.html", "report.json"),
               legacy=lambda facts: {"images", "stages", "generated_at"} <= set(facts), known=IMAGES)


# --- figures: plain data from the store ----------------------------------------------------

def judge_figures(s: Session, name: str | None, version: str | None) -> dict[str, Any] | None:
    """Judge label quality (cai/judge_stats.py) of the AI-labelled pairs; None when there are none."""
    rows = ai_pairs(s, name, version)
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r.details.get("judgments", [])})
    return judge_compute(*records(rows, rows_by_id(s, Judgment, keys).values()))


def review_figures(s: Session, ref: str | None) -> dict[str, Any] | None:
    """People's verdicts (cai review) against the factory's labels; None when nobody reviewed."""
    verdicts = [verdict_from_row(row) for row in verdict_rows(s, constitution=ref)]
    return review_public(review_compute(verdicts)) if verdicts else None


def collect(s: Session, cfg: ReportConfig) -> dict[str, Any]:
    """Every figure of the page (and of report.json): a section with no data gets None or empty."""
    ref = cfg.constitution
    name, version = split_ref(ref) if ref else (None, None)
    training = q.latest_training(s, name)
    evaluated = q.latest_eval(s, name, version)
    campaign = q.latest_redteam(s)
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": s.get_bind().url.render_as_string(hide_password=True),
        "constitution": ref,
        "stages": q.stage_counts(s, name, version),
        "principles": q.principle_usage(s, name, version),
        "judge": judge_figures(s, name, version),
        "review": review_figures(s, ref),
        "training": report.training_figures(*training, (k for k, _ in DPO_PANELS)) if training else None,
        "eval": report.eval_figures(*evaluated) if evaluated else None,
        "redteam": report.redteam_figures(*campaign, cfg.max_chars) if campaign else None,
        "examples": report.example_figures(q.example_chains(s, name, version, cfg.examples), cfg.max_chars),
    }


# --- entry points --------------------------------------------------------------------------

def make_report(cfg: ReportConfig) -> dict[str, Any]:
    """Collect, plot and write index.html + report.json; returns the figures and the paths."""
    out = Path(cfg.out)
    check_out(out, REPORT)  # new, empty or an earlier report: a person's eval.png is never replaced
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    for name in IMAGES:  # a section that lost its data must not show last run's plot (ours: checked above)
        (out / name).unlink(missing_ok=True)
    with session_scope(cfg.database_url) as s:
        data = collect(s, cfg)
    images = plot_all(data, out)
    (out / "index.html").write_text(report.render_html(data, images), encoding="utf-8")
    mark = {"generator": REPORT.generator, "files": sorted(n for names in images.values() for n in names)}
    (out / "report.json").write_text(json.dumps(data | {"images": images} | mark, indent=2, default=str) + "\n",
                                     encoding="utf-8")
    return data | {"images": images, "index": str(out / "index.html")}


@stage_flow(name="report")
def report_flow(cfg: ReportConfig) -> dict[str, Any]:
    """For the pipeline; `cai report` calls make_report directly (no model work, no Prefect server)."""
    return make_report(cfg)
