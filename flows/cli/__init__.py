"""The `cai` command line. Each command parses options and calls a flow or a pure function.

    cai constitution validate constitution/harmless.yaml
    cai prompts add data/red_team.jsonl --tag red-team
    cai status --json
    cai train --config train.yaml --set trainer.loss_type=ipo --lr 1e-5 --show-config

Stage options take their defaults and help from the flow configs (flows/configs.py); every stage
command also reads `--config FILE`, `--set KEY=VALUE` and `--show-config` (flows/cli/options.py).
Heavy imports (torch, transformers, prefect, datasets) happen inside commands, so `cai status`
and `cai constitution ...` answer fast. Bad input exits with code 2 and one line saying what
to fix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from cai.errors import UserError
from engines.bundled import DEFAULT_SPEC
from flows.cli.common import _session, check_writable, console, err, fail, guarded
from flows.cli.data import constitution_app, prompts_app
from flows.cli.options import CONFIG_HELP, SET_HELP, SHOW_HELP, configured, opt, resolve_config, show
from flows.cli.render import esc
from flows.cli.review import review_app
from flows.configs import (
    CONFIGS,
    ContrastConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    LabelConfig,
    PipelineConfig,
    RedteamConfig,
    ReportConfig,
    RewardScoreConfig,
    RewardTrainConfig,
    TrainConfig,
)
from flows.orchestration import run_flow

app = typer.Typer(help="Constitutional AI / RLAIF data factory.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
app.add_typer(prompts_app, name="prompts")
app.add_typer(db_app, name="db")
reward_app = typer.Typer(help="A Bradley-Terry reward model on the store's pairs.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")
app.add_typer(review_app, name="review")

# --- status and db -------------------------------------------------------------------------

@app.command("status")
@guarded
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Counts per table and stage, failures and quarantined items."""
    from store.status import collect

    with _session() as s:
        data = collect(s)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    from flows.cli.render import render_status

    render_status(data, console)


@db_app.command("upgrade")
@guarded
def db_upgrade() -> None:
    """Apply pending schema migrations (also done automatically on first use)."""
    from store.db import current_revision, get_engine

    eng = get_engine()
    console.print(f"database {esc(eng.url.render_as_string(hide_password=True))} at revision "
                  f"{esc(current_revision(eng))}", highlight=False)


@db_app.command("regate")
@guarded
def db_regate() -> None:
    """Give pairs made before the quality gates the status the gates give them now (run once after
    upgrading a store from before them; pairs made since keep theirs)."""
    from flows.common import regate

    counts = regate()
    moved = {k: v for k, v in counts.items() if k != "checked"}
    console.print(f"regate: {counts['checked']} pairs made before the gates checked, {sum(moved.values())} gated"
                  + (f" ({', '.join(f'{k} {v}' for k, v in sorted(moved.items()))})" if moved else ""),
                  highlight=False)


@db_app.command("release-quarantine")
@guarded
def db_release_quarantine(
    stage: str | None = typer.Option(None, help="Only this stage (e.g. label.judge) or flow (e.g. contrast); "
                                     "default: every stage."),
) -> None:
    """Let the next run try quarantined items again (after fixing what made them fail: `cai status` lists them)."""
    from store.work import release_quarantine

    with _session() as s:
        released = release_quarantine(s, stage)
    if not released:
        console.print(f"no quarantined items{f' in stage {esc(stage)}' if stage else ''}", highlight=False)
        return
    console.print(f"released {sum(released.values())} quarantined items ("
                  + ", ".join(f"{esc(k)} {v}" for k, v in released.items())
                  + "); the next run of their stage tries them again", highlight=False)


# --- stages (each command is a thin wrapper around a flow) ---------------------------------
# Options, defaults and help come from the flow configs (flows/configs.py) through `opt`; every
# stage command also takes --config FILE, --set KEY=VALUE and --show-config (flows/cli/options.py).
# generate / schedule: flows/generate.py, flows/schedule.py

def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _preflight_model(spec: str, engine=None) -> None:
    """Fail before any work when a local model path is wrong, or a hub id can be neither
    downloaded nor found in the cache (seconds, not a minute of download retries). A model a
    remote endpoint serves (`engine`: backend openai, or a base_url) is a name only it knows."""
    from engines.bundled import ALIASES, resolve
    from flows.engine_cache import is_loaded

    if engine is not None and (engine.backend == "openai" or engine.settings.get("base_url")):
        return
    if spec.lower() not in ALIASES and not is_loaded(spec):
        resolve(spec)


def _cap_new_tokens(cfg: GenerateConfig, max_new_tokens: int | None = None) -> GenerateConfig:
    """--max-new-tokens caps every stage's length (each keeps its own if it is shorter)."""
    if max_new_tokens:
        for k in ("initial", "critique", "revision"):
            s = getattr(cfg, k)
            s.max_new_tokens = min(s.max_new_tokens, max_new_tokens)
    return cfg


@app.command("generate")
@guarded
@configured(GenerateConfig, adjust=_cap_new_tokens)
def generate(
    cfg: GenerateConfig,
    constitution: str | None = opt(GenerateConfig, "constitution"),
    prompts: list[str] | None = opt(GenerateConfig, "prompts", convert=_split),
    rounds: int | None = opt(GenerateConfig, "rounds"),
    model: str | None = opt(GenerateConfig, "model"),
    engine: str | None = opt(GenerateConfig, "engine.backend", "--engine"),
    limit: int | None = opt(GenerateConfig, "limit"),
    seed: int | None = opt(GenerateConfig, "seed"),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Cap every stage's output length."),
    chunk_size: int | None = opt(GenerateConfig, "runner.chunk_size", "--chunk-size"),
    dry_run: bool | None = opt(GenerateConfig, "runner.dry_run", "--dry-run"),
    budget: str | None = opt(GenerateConfig, "runner.budget", "--budget", metavar="TOKENS|$"),
) -> None:
    """SL-CAI: initial answers, then critique -> revision rounds; stores revision pairs."""
    from flows.generate import load_inputs

    load_inputs(cfg)  # unknown constitution / tag / unreachable database: fail before Prefect starts
    _preflight_model(cfg.model, cfg.engine)
    from flows.generate import generate_flow

    summary = run_flow(generate_flow, cfg)
    _print_summary("generate", summary)


@app.command("contrast")
@guarded
@configured(ContrastConfig)
def contrast(
    cfg: ContrastConfig,
    prompts: list[str] | None = opt(ContrastConfig, "prompts", convert=_split),
    constitutions: list[str] | None = opt(ContrastConfig, "constitutions", convert=_split),
    model: str | None = opt(ContrastConfig, "model"),
    engine: str | None = opt(ContrastConfig, "engine.backend", "--engine"),
    limit: int | None = opt(ContrastConfig, "limit"),
    seed: int | None = opt(ContrastConfig, "seed"),
    dry_run: bool | None = opt(ContrastConfig, "runner.dry_run", "--dry-run"),
    budget: str | None = opt(ContrastConfig, "runner.budget", "--budget", metavar="TOKENS|$"),
) -> None:
    """Contrastive pairs (prompts to refuse) and helpfulness pairs (prompts to answer), steered by the
    governing principle's own texts, quality-gated."""
    from flows.contrast import load_inputs

    load_inputs(cfg)  # unknown constitution / tag / unreachable database: fail before Prefect starts
    _preflight_model(cfg.model, cfg.engine)
    from flows.contrast import contrast_flow

    summary = run_flow(contrast_flow, cfg)
    _print_summary("contrast", summary)


@app.command("redteam")
@guarded
@configured(RedteamConfig)
def redteam(
    cfg: RedteamConfig,
    taxonomy: str | None = opt(RedteamConfig, "taxonomy"),
    per_category: int | None = opt(RedteamConfig, "per_category", min=1),
    categories: list[str] | None = opt(RedteamConfig, "categories", convert=_split),
    model: str | None = opt(RedteamConfig, "model"),
    policy: str | None = opt(RedteamConfig, "policy"),
    engine: str | None = opt(RedteamConfig, "engine.backend", "--engine"),
    campaign: bool | None = opt(RedteamConfig, "campaign", "--campaign/--no-campaign"),
    seed: int | None = opt(RedteamConfig, "seed"),
    chunk_size: int | None = opt(RedteamConfig, "runner.chunk_size", "--chunk-size"),
    dry_run: bool | None = opt(RedteamConfig, "runner.dry_run", "--dry-run"),
    budget: str | None = opt(RedteamConfig, "runner.budget", "--budget", metavar="TOKENS|$"),
) -> None:
    """Model-written attack prompts per harm category, deduplicated and stored; then the policy answers them."""
    from flows.redteam import load_inputs

    load_inputs(cfg)  # bad taxonomy file or category: fail before Prefect starts
    _preflight_model(cfg.model, cfg.engine)
    if cfg.campaign and cfg.policy:  # the campaign's model: found missing only after all attacker generation
        _preflight_model(cfg.policy, cfg.engine)
    from flows.redteam import redteam_flow

    summary = run_flow(redteam_flow, cfg)
    _print_summary("redteam", {k: v for k, v in summary.items() if k not in ("per_category", "attack_success")})
    from flows.cli.render import render_redteam

    render_redteam(summary, console)


def _print_summary(flow_name: str, summary: dict) -> None:
    from flows.cli.render import render_budget_stop, render_plan

    if summary.get("dry_run"):
        render_plan(flow_name, summary, console)
        return
    table = Table("stage", "items", "already done", "computed", "failed", "quarantined", "tokens", "engine s",
                  "total s", title=f"{flow_name} summary (run {esc(summary.get('run_id', '')[:12])})")
    for name, st in summary.get("stages", {}).items():
        table.add_row(esc(name), str(st["items"]), str(st["done_before"]), str(st["computed"]), str(st["failed"]),
                      str(st["quarantined"]), str(st["tokens"]), f"{st['engine_s']:.1f}", f"{st['total_s']:.1f}")
    console.print(table)
    extras = {k: v for k, v in summary.items() if k not in ("stages", "budget_stopped")}
    console.print(esc(" ".join(f"{k}={v}" for k, v in extras.items())), highlight=False)
    render_budget_stop(summary, console)


@app.command("run")
@guarded
@configured(PipelineConfig)
def run(
    cfg: PipelineConfig,
    constitution: str | None = opt(PipelineConfig, "constitution"),
    prompts: list[str] | None = opt(PipelineConfig, "prompts", convert=_split),
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
    from flows.pipeline import stage_configs
    from flows.publish import check_out
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
    _preflight_model(cfg.model, cfg.engine)
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
        flags["prompts"] = _split(prompts)
    return resolve_config(CONFIGS[flow_name], config_file, settings or (), flags)


@app.command("schedule")
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

@app.command("deploy")
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


@app.command("submit")
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
    from flows.schedule import submit as submit_runs
    from flows.schedule import wait_runs

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


# label / judge-report: flows/label.py, flows/judge_report.py

def _clamp(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(",")
    try:
        if sep:
            return float(lo), float(hi)
    except ValueError:
        pass
    raise UserError(f"--cot-clamp {text!r}: expected LO,HI such as 0.4,0.6")


@app.command("label")
@guarded
@configured(LabelConfig)
def label(
    cfg: LabelConfig,
    constitution: str | None = opt(LabelConfig, "constitution"),
    prompts: list[str] | None = opt(LabelConfig, "prompts", convert=_split),
    policy: str | None = opt(LabelConfig, "policy"),
    judge: str | None = opt(LabelConfig, "judge"),
    source: str | None = opt(LabelConfig, "source", "--source", "--label-source"),
    reward_model: str | None = opt(LabelConfig, "reward_model"),
    kinds: list[str] | None = opt(LabelConfig, "kinds", convert=_split),
    samples: int | None = opt(LabelConfig, "samples"),
    principles_per_pair: int | None = opt(LabelConfig, "principles_per_pair"),
    cot: bool | None = opt(LabelConfig, "cot", "--cot/--no-cot"),
    cot_clamp: str | None = opt(LabelConfig, "cot_clamp", convert=_clamp),
    min_margin: float | None = opt(LabelConfig, "min_margin"),
    seed: int | None = opt(LabelConfig, "seed"),
    limit: int | None = opt(LabelConfig, "limit"),
    engine: str | None = opt(LabelConfig, "engine.backend", "--engine"),
    max_new_tokens: int | None = opt(LabelConfig, "max_new_tokens"),
    chunk_size: int | None = opt(LabelConfig, "runner.chunk_size", "--chunk-size"),
    dry_run: bool | None = opt(LabelConfig, "runner.dry_run", "--dry-run"),
    budget: str | None = opt(LabelConfig, "runner.budget", "--budget", metavar="TOKENS|$"),
) -> None:
    """RL-CAI: the judge labels pairs of responses by (A)/(B) log-probs; stores soft-labelled pairs."""
    from flows.label import preflight

    preflight(cfg)  # unknown constitution / tag, nothing stored to pair: fail before Prefect starts
    if cfg.source in ("samples", "best-of-n"):
        _preflight_model(cfg.policy, cfg.engine)
    if cfg.source != "best-of-n":  # best-of-n asks the reward model, not the judge
        _preflight_model(cfg.judge, cfg.judge_engine or cfg.engine)
    from flows.label import label_flow

    summary = run_flow(label_flow, cfg)
    _print_summary("label", summary)


@app.command("judge-report")
@guarded
def judge_report(
    constitution: str | None = typer.Option(None, help="NAME or NAME@VERSION (default: every AI-labelled "
                                                       "pair)."),
    judge: str | None = typer.Option(None, help="Only pairs labelled by this judge model."),
    out: Path = typer.Option(Path("reports/judge"), help="Directory for the PNG plots and figures.json."),
) -> None:
    """How reliable the AI labels are: position consistency, label spread, per-principle agreement."""
    from flows.cli.render import render_judge
    from flows.judge_report import check_out_dir, figures, write

    check_out_dir(out)  # before any work: new, empty or an earlier judge report, and writable
    with _session() as s:
        fig = figures(s, constitution, judge)
    render_judge(fig, console, title=f"judge report ({constitution or 'all constitutions'})")
    paths = write(fig, out)
    console.print("wrote " + ", ".join(esc(p) for p in paths), highlight=False)

# train: flows/train.py

@app.command("train")
@guarded
@configured(TrainConfig)
def train(
    cfg: TrainConfig,
    base: str | None = opt(TrainConfig, "base"),
    stage: str | None = opt(TrainConfig, "stage"),
    constitution: str | None = opt(TrainConfig, "constitution"),
    method: list[str] | None = opt(TrainConfig, "methods", "--method", convert=_split),
    status: list[str] | None = opt(TrainConfig, "statuses", "--status", convert=_split),
    min_label_prob: float | None = opt(TrainConfig, "min_label_prob"),
    reviewed: str | None = opt(TrainConfig, "reviewed"),
    people_order: bool | None = opt(TrainConfig, "people_order", "--people-order"),
    soft_labels: bool | None = opt(TrainConfig, "trainer.use_soft_labels", "--soft-labels/--hard-labels"),
    dataset: str | None = opt(TrainConfig, "dataset"),
    split: str | None = opt(TrainConfig, "dataset_split", "--split"),
    limit: int | None = opt(TrainConfig, "limit"),
    beta: float | None = opt(TrainConfig, "trainer.beta", "--beta"),
    loss_type: str | None = opt(TrainConfig, "trainer.loss_type", "--loss-type"),
    epochs: int | None = opt(TrainConfig, "trainer.epochs", "--epochs"),
    max_steps: int | None = opt(TrainConfig, "trainer.max_steps", "--max-steps"),
    lr: float | None = opt(TrainConfig, "trainer.lr", "--lr"),
    batch_size: int | None = opt(TrainConfig, "trainer.batch_size", "--batch-size"),
    grad_accum: int | None = opt(TrainConfig, "trainer.grad_accum", "--grad-accum"),
    scheduler: str | None = opt(TrainConfig, "trainer.scheduler", "--scheduler"),
    warmup_ratio: float | None = opt(TrainConfig, "trainer.warmup_ratio", "--warmup-ratio"),
    max_length: int | None = opt(TrainConfig, "trainer.max_length", "--max-length"),
    max_prompt_length: int | None = opt(TrainConfig, "trainer.max_prompt_length", "--max-prompt-length"),
    dtype: str | None = opt(TrainConfig, "trainer.dtype", "--dtype"),
    seed: int | None = opt(TrainConfig, "trainer.seed", "--seed"),
    eval_fraction: float | None = opt(TrainConfig, "eval_fraction"),
    early_stop_patience: int | None = opt(TrainConfig, "trainer.early_stop_patience", "--early-stop-patience"),
    checkpoint_every: int | None = opt(TrainConfig, "trainer.checkpoint_every", "--checkpoint-every"),
    gradient_checkpointing: bool | None = opt(TrainConfig, "trainer.gradient_checkpointing",
                                              "--gradient-checkpointing/--no-gradient-checkpointing"),
    lora_r: int | None = opt(TrainConfig, "trainer.lora.r", "--lora-r"),
    lora_alpha: float | None = opt(TrainConfig, "trainer.lora.alpha", "--lora-alpha"),
    lora_target_modules: list[str] | None = opt(TrainConfig, "trainer.lora.target_modules",
                                                "--lora-target-modules", convert=_split),
    merge_lora: bool | None = opt(TrainConfig, "merge_lora", "--merge-lora/--no-merge-lora"),
    out: str | None = opt(TrainConfig, "out"),
    resume: bool | None = opt(TrainConfig, "resume", "--resume"),
) -> None:
    """DPO on the stored preference pairs; writes a HF model directory and metrics.png to OUT."""
    from flows.pair_selection import load_examples

    check_writable(cfg.out)  # the model is written after training: check where it goes first
    load_examples(cfg)  # no pairs / bad dataset / unreachable database: fail before Prefect starts
    _preflight_model(cfg.base)
    from flows.train import train_flow

    s = run_flow(train_flow, cfg)
    final = s.get("final_train", {})
    console.print(esc(f"trained {s['steps']} steps on {s['n_train']} pairs ({s['n_eval']} held out); "
                      f"reference log-probs {s['ref_computed']} computed, {s['ref_reused']} reused; "
                      f"final loss {final.get('loss', float('nan')):.4f}, reward accuracy "
                      f"{final.get('rewards/accuracies', float('nan')):.2f}; model in {s['out']}, "
                      f"plot {s['plot']}"),
                  highlight=False)
    if lora := s.get("lora"):
        merged = f"; merged model in {lora['merged']}" if lora["merged"] else " (add --merge-lora for vLLM)"
        console.print(esc(f"LoRA r={lora['r']}: {lora['trainable_parameters']:,} of {lora['parameters']:,} "
                          f"parameters trained, adapter {lora['adapter_mb']:.2f} MB{merged}"), highlight=False)

# reward: flows/reward.py (run_reward_training, score_rewards)

@reward_app.command("train")
@guarded
@configured(RewardTrainConfig)
def reward_train(
    cfg: RewardTrainConfig,
    base: str | None = opt(RewardTrainConfig, "base"),
    constitution: str | None = opt(RewardTrainConfig, "constitution"),
    method: list[str] | None = opt(RewardTrainConfig, "methods", "--method", convert=_split),
    status: list[str] | None = opt(RewardTrainConfig, "statuses", "--status", convert=_split),
    min_label_prob: float | None = opt(RewardTrainConfig, "min_label_prob"),
    dataset: str | None = opt(RewardTrainConfig, "dataset"),
    limit: int | None = opt(RewardTrainConfig, "limit"),
    eval_fraction: float | None = opt(RewardTrainConfig, "eval_fraction"),
    epochs: int | None = opt(RewardTrainConfig, "reward.epochs", "--epochs"),
    max_steps: int | None = opt(RewardTrainConfig, "reward.max_steps", "--max-steps"),
    lr: float | None = opt(RewardTrainConfig, "reward.lr", "--lr"),
    head_lr: float | None = opt(RewardTrainConfig, "reward.head_lr", "--head-lr"),
    batch_size: int | None = opt(RewardTrainConfig, "reward.batch_size", "--batch-size"),
    grad_accum: int | None = opt(RewardTrainConfig, "reward.grad_accum", "--grad-accum"),
    max_length: int | None = opt(RewardTrainConfig, "reward.max_length", "--max-length"),
    max_prompt_length: int | None = opt(RewardTrainConfig, "reward.max_prompt_length", "--max-prompt-length"),
    soft_labels: bool | None = opt(RewardTrainConfig, "reward.use_soft_labels", "--soft-labels/--hard-labels"),
    lora_r: int | None = opt(RewardTrainConfig, "reward.lora.r", "--lora-r"),
    lora_alpha: float | None = opt(RewardTrainConfig, "reward.lora.alpha", "--lora-alpha"),
    seed: int | None = opt(RewardTrainConfig, "reward.seed", "--seed"),
    checkpoint_every: int | None = opt(RewardTrainConfig, "reward.checkpoint_every", "--checkpoint-every"),
    out: str | None = opt(RewardTrainConfig, "out"),
    resume: bool | None = opt(RewardTrainConfig, "resume", "--resume"),
) -> None:
    """Train a reward model (scalar head, Bradley-Terry on soft labels); prints held-out pair accuracy."""
    from flows.pair_selection import load_examples

    check_writable(cfg.out)
    load_examples(cfg)
    _preflight_model(cfg.base)
    from flows.reward import reward_flow

    s = run_flow(reward_flow, cfg)
    ev = s.get("final_eval") or {}
    held = (f"held-out pair accuracy {ev['accuracy']:.3f} on {s['n_eval']} pairs (margin {ev['margin']:.3f}, "
            f"loss {ev['loss']:.4f})" if ev else "no held-out pairs (raise --eval-fraction)")
    console.print(esc(f"reward model: {s['steps']} steps on {s['n_train']} pairs; {held}; "
                      f"train accuracy {s['final_train'].get('accuracy', float('nan')):.3f}; model in {s['out']}"),
                  highlight=False)


@reward_app.command("score")
@guarded
@configured(RewardScoreConfig)
def reward_score(
    cfg: RewardScoreConfig,
    model: str | None = opt(RewardScoreConfig, "model"),
    input: str | None = opt(RewardScoreConfig, "input"),  # noqa: A002 - the flag's name
    constitution: str | None = opt(RewardScoreConfig, "constitution"),
    method: list[str] | None = opt(RewardScoreConfig, "methods", "--method", convert=_split),
    status: list[str] | None = opt(RewardScoreConfig, "statuses", "--status", convert=_split),
    limit: int | None = opt(RewardScoreConfig, "limit"),
    out: str | None = opt(RewardScoreConfig, "out"),
) -> None:
    """Score replies (a JSONL file, or the store's pairs) with a reward model; pairs get an accuracy."""
    if cfg.out:
        if Path(cfg.out).is_dir():  # found only after all the scoring, before
            raise UserError(f"--out {cfg.out}: is a directory; name the file the scores go to, e.g. "
                            f"{Path(cfg.out) / 'scores.jsonl'}")
        check_writable(Path(cfg.out).parent)
    from flows.reward import score_rewards

    s = score_rewards(cfg)
    for r in s["scored"][:10]:
        text = r.get("response") or r.get("chosen", "")
        value = r.get("reward", r.get("margin"))
        label = "reward" if "reward" in r else "margin"
        console.print(esc(f"{label} {value:+.3f}  {text[:70]!r}"), highlight=False)
    acc = f"; pair accuracy {s['accuracy']:.3f} on {s['pairs']} pairs" if s["pairs"] else ""
    console.print(esc(f"scored {s['rows']} rows with {s['model']}{acc}" + (f"; wrote {s['out']}" if s["out"] else "")),
                  highlight=False)

# export: flows/export.py

def _when(option: str):
    def convert(value: str):
        from flows.export import parse_when

        return parse_when(value, option)
    return convert


@app.command("export")
@guarded
@configured(ExportConfig)
def export(
    cfg: ExportConfig,
    constitution: str | None = opt(ExportConfig, "constitution"),
    out: Path | None = opt(ExportConfig, "out"),
    fmt: str | None = opt(ExportConfig, "format", "--format"),
    method: list[str] | None = opt(ExportConfig, "methods", "--method", convert=_split),
    min_label_prob: float | None = opt(ExportConfig, "min_label_prob"),
    min_margin: float | None = opt(ExportConfig, "min_margin"),
    tag: list[str] | None = opt(ExportConfig, "tags", "--tag", convert=_split),
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

# run / eval / report: flows/pipeline.py, flows/evaluate.py, flows/report.py

def _preflight_eval_model(flag: str, spec: str, engine=None) -> None:
    """runs/NAME that does not exist is a typo or an untrained model, not a hub id: say so."""
    if engine is not None and (engine.backend == "openai" or engine.settings.get("base_url")):
        return  # a name only the remote endpoint knows
    p = Path(spec).expanduser()
    if not p.exists() and "/" in spec and (p.parent.is_dir() or spec.startswith("runs/")):
        fail(f"{flag} {spec}: no such model directory (expected a HF-format directory written by "
             f"`cai train --out`, the bundled `{DEFAULT_SPEC}`, or a hub id)")
    _preflight_model(spec)


@app.command("eval")
@guarded
@configured(EvalConfig)
def eval_cmd(
    cfg: EvalConfig,
    model: str | None = opt(EvalConfig, "model"),
    baseline: str | None = opt(EvalConfig, "baseline"),
    prompts: list[str] | None = opt(EvalConfig, "prompts", convert=_split),
    constitution: str | None = opt(EvalConfig, "constitution"),
    constitutions: list[str] | None = opt(EvalConfig, "constitutions", convert=_split),
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


@app.command("report")
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


def process_defaults() -> None:
    """Process settings the `cai` command wants, set where it starts (not on import of `flows`)."""
    import os

    # A flow run without PREFECT_API_URL starts a temporary local server; on a busy 2-core machine
    # it can need more than Prefect's default 20 s to come up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # torch's worker threads busy-wait by default; when another process shares the cores (a second
    # worker, the Prefect server) that slows every step 3-10x. Passive waiting costs almost nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _log_to_terminal() -> None:
    """Without Prefect (flows/orchestration.py) nobody prints the stages' log lines: show them as
    Prefect's console would (time, level, logger, message) on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
                                           datefmt="%H:%M:%S"))
    for name in ("cai",):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def main() -> None:
    process_defaults()
    from store import stop

    stop.install()  # SIGTERM / Ctrl-C: stop at the next instruction, keep what is stored
    _log_to_terminal()
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:  # typer ends every command this way
        code = exc.code
    except BaseException as exc:
        if not stop.is_stop(exc):
            raise
        signum = getattr(exc, "signum", None) or getattr(exc, "signal", None) or 2
        err.print(f"[yellow]stopped[/] ({escape(str(exc) or exc.__class__.__name__)}): every row already "
                  "written is kept; run the same command again to continue where it stopped", highlight=False)
        code = 128 + int(signum)
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Exit without the interpreter's teardown when nothing needs it: with torch and transformers
    loaded, garbage-collecting every module at exit takes seconds, after the work is done. Every
    file and transaction is closed by then; Prefect's API log worker is the one thing that must
    drain at exit, so a run through Prefect exits normally."""
    import os

    from flows.orchestration import wanted

    if isinstance(code, str):
        err.print(code, highlight=False, markup=False)
        code = 1
    if wanted():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
