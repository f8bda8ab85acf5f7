"""The whole pipeline and its runs elsewhere: `cai run`, and Prefect's `cai schedule`, `cai deploy`,
`cai submit` (flows/pipeline.py, flows/schedule.py).

    cai run --constitution harmless --prompts red-team --rounds 1 --stage sft
    cai deploy generate --pool cai --name harmless && cai submit generate/harmless --shards 4

Options, defaults and help come from the flow configs through `opt` (flows/cli/options.py).
flows/cli/__init__.py registers the commands, in the order `cai --help` lists them.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import check_writable, console, fail, guarded, preflight_model, split_commas
from flows.cli.options import CONFIG_HELP, SET_HELP, SHOW_HELP, configured, opt, resolve_config, show
from flows.cli.render import esc
from flows.configs import CONFIGS, ExportConfig, PipelineConfig, ReportConfig
from flows.orchestration import run_flow


@guarded
@configured(PipelineConfig)
def run(
    cfg: PipelineConfig,
    constitution: str | None = opt(PipelineConfig, "constitution"),
    prompts: list[str] | None = opt(PipelineConfig, "prompts", convert=split_commas),
    limit: int | None = opt(PipelineConfig, "limit", convert=lambda n: n or None),  # 0: all prompts
    rounds: int | None = opt(PipelineConfig, "rounds"),
    model: str | None = opt(PipelineConfig, "model"),
    judge: str | None = opt(PipelineConfig, "judge"),
    label_source: str | None = opt(PipelineConfig, "label_source"),
    samples: int | None = opt(PipelineConfig, "samples"),
    principles_per_pair: int | None = opt(PipelineConfig, "principles_per_pair"),
    engine: str | None = opt(PipelineConfig, "engine.backend", "--engine"),
    max_new_tokens: int | None = opt(PipelineConfig, "max_new_tokens"),
    train_steps: int | None = opt(PipelineConfig, "trainer.max_steps", "--train-steps"),
    stage: str | None = opt(PipelineConfig, "stage"),
    contrast: bool | None = opt(PipelineConfig, "contrast", "--contrast/--no-contrast"),
    eval_limit: int | None = opt(PipelineConfig, "eval_limit"),
    retrain: bool | None = opt(PipelineConfig, "retrain", "--retrain/--no-retrain"),
    redteam: int | None = opt(PipelineConfig, "redteam"),
    seed: int | None = opt(PipelineConfig, "seed"),
) -> None:
    """The main job: [redteam ->] generate -> contrast -> label -> export -> train -> eval -> report, by stage."""
    if cfg.runner.dry_run:
        fail("cai run has no dry run (it would go on to export and train on what is stored); dry-run its "
             "model stages one by one: cai generate / contrast / label / eval --dry-run")
    from flows.generate import load_inputs
    from flows.output_dir import check_out
    from flows.pipeline import stage_configs
    from flows.report import REPORT

    stages = stage_configs(cfg)
    # the outputs are written at the end of an hour's work: check where they go first
    flags = {"train": "--set model_dir", "report": "--set report_dir"}
    for stage, sub in stages.items():
        if isinstance(sub, ExportConfig):
            check_out(sub.out)  # new, empty or an earlier export, and writable
        elif isinstance(sub, ReportConfig):
            check_out(sub.out, REPORT)  # new, empty or an earlier report: never a person's files
        elif getattr(sub, "out", None) is not None:
            check_writable(sub.out, flags.get(stage, f"the {stage} output"))
    load_inputs(stages["generate"])  # bad constitution / tag / database: fail before Prefect starts
    preflight_model(cfg.model, cfg.engine)
    from flows.pipeline import pipeline_flow

    t0 = __import__("time").perf_counter()
    out = run_flow(pipeline_flow, cfg)
    table = Table("what", "where", title="cai run: done")
    from store.db import shown_url

    table.add_row("database", esc(shown_url(str(out["database"]))))  # never the password
    table.add_row("dataset", esc(out["dataset"]))
    table.add_row("model", esc(out["model"]))
    table.add_row("report", esc(out["report"]))
    console.print(table)
    ev = out["results"].get("eval") or {}
    from flows.cli.render import render_eval

    if ev:
        render_eval(ev, console)
    console.print("stage seconds: " + ", ".join(f"{esc(k)} {esc(v)}" for k, v in out["timings_s"].items())
                  + f"; total {__import__('time').perf_counter() - t0:.0f}s", highlight=False)


FLOW_HELP = ("generate | contrast | label | redteam | train | reward-train | export | eval | report | run "
             "(flows/schedule.py FLOWS)")


def _served_flow_config(verb: str, flow_name: str, constitution: str | None, prompts: list[str] | None,
                        config_file: Path | None, settings: list[str] | None):
    """The validated config a scheduled or deployed flow will run with (exit 2 on a bad flow or setting)."""
    from flows.schedule import FLOWS

    if flow_name not in FLOWS:
        fail(f"cannot {verb} {flow_name!r}: choose one of {', '.join(FLOWS)}")
    flags = {"constitution": constitution} if constitution else {}
    if prompts:
        flags["prompts"] = split_commas(prompts)
    return resolve_config(CONFIGS[flow_name], config_file, settings or (), flags)


@guarded
def schedule(
    flow_name: str = typer.Argument(..., metavar="FLOW", help=FLOW_HELP),
    cron: str | None = typer.Option(None, help='Cron expression, e.g. "0 3 * * *" (required unless --show-config).'),
    constitution: str | None = typer.Option(None, help="Constitution for the scheduled runs (the flow's default)."),
    prompts: list[str] | None = typer.Option(None, help="Prompt tag(s) (the flow's default)."),
    name: str | None = typer.Option(None, help="Deployment name (default: from flow, constitution, tags)."),
    limit_runs: int | None = typer.Option(None, "--max-concurrent", help="At most this many runs at once."),
    config_file: Path | None = typer.Option(None, "--config", metavar="FILE", help=CONFIG_HELP),
    settings: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    show_config: bool = typer.Option(False, "--show-config", help=SHOW_HELP),
) -> None:
    """Create a Prefect deployment with a cron schedule and serve it (needs `prefect server start`).

    The settings are validated against the flow's config before anything is served.
    """
    cfg = _served_flow_config("schedule", flow_name, constitution, prompts, config_file, settings)
    if show_config:
        show(cfg)
        return
    if not cron:
        fail("--cron is required, e.g. --cron \"0 3 * * *\"")
    from flows.schedule import serve_schedule

    serve_schedule(flow_name, cron, cfg.model_dump(mode="json", exclude_unset=True), name=name, limit=limit_runs)


@guarded
def deploy(
    flow_name: str = typer.Argument(..., metavar="FLOW", help=FLOW_HELP),
    pool: str = typer.Option(..., "--pool", help="Prefect work pool; created (process type) if missing."),
    cron: str | None = typer.Option(None, help='Also run on this schedule, e.g. "0 3 * * *".'),
    name: str | None = typer.Option(None, help="Deployment name (default: from flow, constitution, tags)."),
    constitution: str | None = typer.Option(None, help="Constitution for the runs (the flow's default)."),
    prompts: list[str] | None = typer.Option(None, help="Prompt tag(s) (the flow's default)."),
    job_variables: list[str] | None = typer.Option(None, "--job-variable", "-j", metavar="KEY=VALUE",
                                                   help="A work-pool job variable, e.g. working_dir=/srv/cai or "
                                                        "env='{\"CUDA_VISIBLE_DEVICES\": \"0\"}'. Repeatable."),
    pool_type: str = typer.Option("process", help="Type of a pool that is created (an existing pool is kept)."),
    config_file: Path | None = typer.Option(None, "--config", metavar="FILE", help=CONFIG_HELP),
    settings: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    show_config: bool = typer.Option(False, "--show-config", help=SHOW_HELP),
) -> None:
    """Register a deployment on a Prefect work pool; `prefect worker start --pool NAME` runs it anywhere.

    The settings are validated against the flow's config before the server is asked anything.
    """
    from flows.cli.options import merge, parse_set

    cfg = _served_flow_config("deploy", flow_name, constitution, prompts, config_file, settings)
    if show_config:
        show(cfg)
        return
    jv: dict = {}
    for item in job_variables or ():  # dotted keys nest: -j env.CUDA_VISIBLE_DEVICES=0
        jv = merge(jv, parse_set(item, "--job-variable"))
    from flows.schedule import deploy as deploy_flow

    out = deploy_flow(flow_name, pool, cfg.model_dump(mode="json", exclude_unset=True), name=name, cron=cron,
                      job_variables=jv, pool_type=pool_type)
    console.print(f"deployment {esc(out['deployment'])} on work pool {esc(pool)}"
                  + (" (created, type process)" if out["pool_created"] and pool_type == "process" else
                     " (created)" if out["pool_created"] else "")
                  + (f", schedule {esc(cron)}" if cron else "")
                  + f"; working_dir {esc(out['job_variables'].get('working_dir'))}", highlight=False)
    console.print(f"start workers: prefect worker start --pool {esc(pool)} --limit 1   (CAI_DATABASE_URL and "
                  f"PREFECT_API_URL={esc(out['api'])} set)", highlight=False)
    console.print(f"submit runs:   cai submit {esc(out['deployment'])} --shards K", highlight=False)


@guarded
def submit(
    deployment: str = typer.Argument(..., metavar="FLOW/NAME", help="A deployment made by `cai deploy`."),
    shards: int = typer.Option(1, "--shards", min=1, help="Flow runs to create; they split the pending work "
                               "through the store's claims, so any number of workers can take them."),
    settings: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE",
                                              help="Change a setting for these runs only (validated). Repeatable."),
    wait: bool = typer.Option(False, "--wait", help="Wait until every run has finished; exit 1 if one did not "
                              "complete."),
    timeout: float | None = typer.Option(None, help="With --wait: give up after this many seconds."),
) -> None:
    """Create K flow runs of a deployment; workers of its pool pick them up."""
    from flows.cli.options import merge, parse_set
    from flows.prefect_server import wait_runs
    from flows.schedule import submit as submit_runs

    overrides: dict = {}
    for item in settings or ():
        overrides = merge(overrides, parse_set(item))
    runs = submit_runs(deployment, shards, overrides)
    for r in runs:
        console.print(f"flow run {esc(r['name'])} ({esc(r['id'])}) {esc(r['state'])}", highlight=False)
    if not wait:
        return
    states = wait_runs([r["id"] for r in runs], timeout_s=timeout)
    names = {r["id"]: r["name"] for r in runs}
    for rid, st in states.items():
        console.print(f"flow run {esc(names[rid])}: {esc(st)}", highlight=False)
    if any(st != "COMPLETED" for st in states.values()):
        raise typer.Exit(1)
