"""What comes out of the store: the dataset (`cai export`), the comparison of a trained model with its
baseline (`cai eval`) and the HTML report (`cai report`) (flows/export.py, evaluate.py, report.py).

    cai export --constitution harmless --out exports/harmless --reviewed not-rejected
    cai eval --model runs/harmless-cai --limit 20 --json
    cai report --out reports/latest

Options, defaults and help come from the flow configs through `opt` (flows/cli/options.py).
flows/cli/__init__.py registers the commands, in the order `cai --help` lists them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from engines.bundled import DEFAULT_SPEC
from flows.cli.common import check_writable, console, err, fail, guarded, preflight_model, split_commas
from flows.cli.options import configured, opt
from flows.cli.render import esc
from flows.configs import EvalConfig, ExportConfig, ReportConfig
from flows.orchestration import run_flow


def _when(option: str):
    def convert(value: str):
        from flows.export import parse_when

        return parse_when(value, option)
    return convert


@guarded
@configured(ExportConfig)
def export(
    cfg: ExportConfig,
    constitution: str | None = opt(ExportConfig, "constitution"),
    out: Path | None = opt(ExportConfig, "out"),
    fmt: str | None = opt(ExportConfig, "format", "--format"),
    method: list[str] | None = opt(ExportConfig, "methods", "--method", convert=split_commas),
    min_label_prob: float | None = opt(ExportConfig, "min_label_prob"),
    min_margin: float | None = opt(ExportConfig, "min_margin"),
    tag: list[str] | None = opt(ExportConfig, "tags", "--tag", convert=split_commas),
    since: str | None = opt(ExportConfig, "since", convert=_when("--since")),
    until: str | None = opt(ExportConfig, "until", convert=_when("--until")),
    include_ties: bool | None = opt(ExportConfig, "include_ties", "--include-ties"),
    include_inconsistent: bool | None = opt(ExportConfig, "include_inconsistent", "--include-inconsistent"),
    include_quarantined: bool | None = opt(ExportConfig, "include_quarantined", "--include-quarantined"),
    reviewed: str | None = opt(ExportConfig, "reviewed"),
    people_order: bool | None = opt(ExportConfig, "people_order", "--people-order"),
    test_fraction: float | None = opt(ExportConfig, "test_fraction"),
    license_id: str | None = opt(ExportConfig, "license", "--license"),
    push_to_hub: str | None = opt(ExportConfig, "push_to_hub", metavar="OWNER/NAME"),
    private: bool | None = opt(ExportConfig, "private", "--private"),
) -> None:
    """HF DatasetDict (train_sft, test_sft, train_prefs, test_prefs) with a dataset card and manifest."""
    from flows.export import preflight

    preflight(cfg)  # nothing selected, bad --out, no HF_TOKEN: fail before Prefect starts
    from flows.export import export_flow

    s = run_flow(export_flow, cfg)
    console.print(esc(f"exported {s['constitution']} to {s['out']} ({s['format']}): "
                      + ", ".join(f"{k} {n}" for k, n in s["counts"].items())
                      + (f"; pushed to {s['url']}" if s.get("url") else "")), highlight=False)
    if s.get("warning"):
        err.print(f"[yellow]warning:[/] {escape(s['warning'])}", highlight=False, soft_wrap=True)


def _preflight_eval_model(flag: str, spec: str, engine=None) -> None:
    """runs/NAME that does not exist is a typo or an untrained model, not a hub id: say so."""
    if engine is not None and (engine.backend == "openai" or engine.settings.get("base_url")):
        return  # a name only the remote endpoint knows
    p = Path(spec).expanduser()
    if not p.exists() and "/" in spec and (p.parent.is_dir() or spec.startswith("runs/")):
        fail(f"{flag} {spec}: no such model directory (expected a HF-format directory written by "
             f"`cai train --out`, the bundled `{DEFAULT_SPEC}`, or a hub id)")
    preflight_model(spec)


@guarded
@configured(EvalConfig)
def eval_cmd(
    cfg: EvalConfig,
    model: str | None = opt(EvalConfig, "model"),
    baseline: str | None = opt(EvalConfig, "baseline"),
    prompts: list[str] | None = opt(EvalConfig, "prompts", convert=split_commas),
    constitution: str | None = opt(EvalConfig, "constitution"),
    constitutions: list[str] | None = opt(EvalConfig, "constitutions", convert=split_commas),
    judge: str | None = opt(EvalConfig, "judge"),
    principles: int | None = opt(EvalConfig, "principles"),
    max_new_tokens: int | None = opt(EvalConfig, "max_new_tokens"),
    limit: int | None = opt(EvalConfig, "limit"),
    name: str | None = opt(EvalConfig, "name"),
    engine: str | None = opt(EvalConfig, "engine.backend", "--engine"),
    dry_run: bool | None = opt(EvalConfig, "runner.dry_run", "--dry-run"),
    budget: str | None = opt(EvalConfig, "runner.budget", "--budget", metavar="TOKENS|$"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Trained model vs baseline on held-out prompts: refusal rates and judged win rates."""
    from flows.evaluate import load_items

    load_items(cfg)  # unknown constitution / tag, unreachable database: fail before Prefect starts
    for flag, spec, eng in (("--model", cfg.model, cfg.engine), ("--baseline", cfg.baseline, cfg.engine),
                            ("--judge", cfg.judge_model, cfg.judge_engine or cfg.engine)):
        _preflight_eval_model(flag, spec, eng)
    from flows.cli.render import render_eval
    from flows.evaluate import eval_flow

    summary = run_flow(eval_flow, cfg)
    if summary.get("dry_run") and not as_json:
        from flows.cli.render import render_plan

        return render_plan("eval", summary, console)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    else:
        render_eval(summary, console)


@guarded
@configured(ReportConfig)
def report(
    cfg: ReportConfig,
    out: Path | None = opt(ReportConfig, "out"),
    constitution: str | None = opt(ReportConfig, "constitution"),
    examples: int | None = opt(ReportConfig, "examples"),
) -> None:
    """A static HTML report of the store (opens offline in any browser)."""
    from flows.report import make_report

    check_writable(cfg.out)
    data = make_report(cfg)
    plots = sum(len(v) for v in data["images"].values())
    console.print(esc(f"wrote {data['index']} ({plots} plot{'' if plots == 1 else 's'}, figures in "
                      f"{cfg.out / 'report.json'})"), highlight=False)
