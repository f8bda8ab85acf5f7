"""The `cai` command line. Each command parses options and calls a flow or a pure function.

    cai constitution validate constitution/harmless.yaml
    cai prompts add data/red_team.jsonl --tag red-team
    cai status --json

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

from flows.cli.common import _session, console, err, fail, guarded
from flows.cli.data import constitution_app, prompts_app

app = typer.Typer(help="Constitutional AI / RLAIF data factory.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
app.add_typer(prompts_app, name="prompts")
app.add_typer(db_app, name="db")

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
    console.print(f"database {eng.url.render_as_string(hide_password=True)} at revision {current_revision(eng)}",
                  highlight=False)


# --- stages (each command is a thin wrapper around a flow) ---------------------------------
# generate / schedule: flows/generate.py, flows/schedule.py

def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _preflight_model(spec: str) -> None:
    """Fail before starting Prefect when a local model path is wrong."""
    from engines.bundled import resolve

    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        resolve(spec)


@app.command("generate")
@guarded
def generate(
    constitution: str = typer.Option("harmless", help="Name, NAME@VERSION, or a YAML path."),
    prompts: list[str] = typer.Option(["red-team"], help="Prompt tag(s); bundled sets import themselves."),
    rounds: int = typer.Option(2, min=1, help="Critique/revision rounds per prompt."),
    model: str = typer.Option("smollm2-135m", help="smollm2-135m, an HF directory, a .gguf file or a hub id."),
    engine: str = typer.Option("auto", help="hf | vllm | auto."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N prompts (by id)."),
    seed: int = typer.Option(0, help="Fixes principle draws and sampling."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Cap every stage's output length."),
    chunk_size: int = typer.Option(64, min=1, help="Items per engine call and per transaction."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Only do what is missing (always on: rows are keyed by content)."),
) -> None:
    """SL-CAI: initial answers, then critique -> revision rounds; stores revision pairs."""
    from flows.generate import GenerateConfig, load_inputs

    cfg = GenerateConfig(constitution=constitution, prompts=_split(prompts), rounds=rounds, model=model,
                         engine=engine, limit=limit, seed=seed, chunk_size=chunk_size)
    if max_new_tokens:
        for k in ("initial", "critique", "revision"):
            getattr(cfg, k).max_new_tokens = min(getattr(cfg, k).max_new_tokens, max_new_tokens)
    load_inputs(cfg)  # unknown constitution / tag / unreachable database: fail before Prefect starts
    _preflight_model(model)
    from flows.generate import generate_flow

    summary = generate_flow(cfg)
    _print_summary("generate", summary)


def _print_summary(flow_name: str, summary: dict) -> None:
    table = Table("stage", "items", "already done", "computed", "failed", "quarantined", "tokens", "engine s",
                  "total s", title=f"{flow_name} summary (run {summary.get('run_id', '')[:12]})")
    for name, st in summary.get("stages", {}).items():
        table.add_row(name, str(st["items"]), str(st["done_before"]), str(st["computed"]), str(st["failed"]),
                      str(st["quarantined"]), str(st["tokens"]), f"{st['engine_s']:.1f}", f"{st['total_s']:.1f}")
    console.print(table)
    extras = {k: v for k, v in summary.items() if k not in ("stages",)}
    console.print(" ".join(f"{k}={v}" for k, v in extras.items()), highlight=False)


@app.command("run")
@guarded
def run(
    constitution: str = typer.Option("harmless", help="Name, NAME@VERSION, or a YAML path."),
    prompts: list[str] = typer.Option(["red-team"], help="Prompt tag(s) for generate and label."),
    limit: int | None = typer.Option(32, help="Prompts used (0 = all); the default fits a 2-core CPU."),
    rounds: int = typer.Option(2, min=1, help="Critique/revision rounds."),
    model: str = typer.Option("smollm2-135m", help="Policy, DPO base and eval baseline."),
    judge: str | None = typer.Option(None, help="Feedback model (default: the same model)."),
    label_source: str = typer.Option("store", help="What the judge compares: store (initial answer vs final "
                                     "revision) | samples (fresh policy samples)."),
    samples: int = typer.Option(2, min=2, help="Policy samples per prompt with --label-source samples."),
    principles_per_pair: int = typer.Option(4, min=1, help="Preference principles per pair (both orders each)."),
    engine: str = typer.Option("auto", help="hf | vllm | auto."),
    max_new_tokens: int = typer.Option(96, min=8, help="Tokens per generated answer/critique/revision."),
    train_steps: int = typer.Option(50, min=1, help="DPO optimizer steps."),
    eval_limit: int | None = typer.Option(None, help="Held-out prompts per set (default: all)."),
    retrain: bool = typer.Option(False, help="Train again even if the model dir holds a finished run."),
    seed: int = typer.Option(0),
) -> None:
    """The main job: generate -> label -> export -> train -> eval -> report, resumable by stage."""
    from flows.pipeline import PipelineConfig, stage_configs

    cfg = PipelineConfig(constitution=constitution, prompts=_split(prompts), limit=limit or None, rounds=rounds,
                         model=model, judge=judge, engine=engine, max_new_tokens=max_new_tokens,
                         label_source=label_source, samples=samples, principles_per_pair=principles_per_pair,
                         train_steps=train_steps, eval_limit=eval_limit, retrain=retrain, seed=seed)
    from flows.generate import load_inputs

    load_inputs(stage_configs(cfg)["generate"])  # bad constitution / tag / database: fail before Prefect starts
    _preflight_model(model)
    from flows.pipeline import pipeline_flow

    t0 = __import__("time").perf_counter()
    out = pipeline_flow(cfg)
    table = Table("what", "where", title="cai run: done")
    table.add_row("database", out["database"])
    table.add_row("dataset", out["dataset"])
    table.add_row("model", out["model"])
    table.add_row("report", out["report"])
    console.print(table)
    ev = out["results"].get("eval") or {}
    from flows.cli.render import render_eval

    if ev:
        render_eval(ev, console)
    console.print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in out["timings_s"].items())
                  + f"; total {__import__('time').perf_counter() - t0:.0f}s", highlight=False)


@app.command("schedule")
@guarded
def schedule(
    flow_name: str = typer.Argument(..., metavar="FLOW", help="generate | label | train | export | run"),
    cron: str = typer.Option(..., help='Cron expression, e.g. "0 3 * * *".'),
    constitution: str | None = typer.Option(None, help="Constitution for the scheduled runs."),
    prompts: list[str] = typer.Option([], help="Prompt tag(s)."),
    name: str | None = typer.Option(None, help="Deployment name (default: from flow, constitution, tags)."),
    setting: list[str] = typer.Option([], "--set", help="Other config fields as key=value (JSON values ok)."),
    limit_runs: int | None = typer.Option(None, "--max-concurrent", help="At most this many runs at once."),
) -> None:
    """Create a Prefect deployment with a cron schedule and serve it (needs `prefect server start`)."""
    from flows.schedule import serve_schedule

    params: dict = {}
    if constitution:
        params["constitution"] = constitution
    if prompts:
        params["prompts"] = _split(prompts)
    for item in setting:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set {item!r}: expected key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    serve_schedule(flow_name, cron, params, name=name, limit=limit_runs)

# label / judge-report: flows/label.py, flows/judge_report.py

@app.command("label")
@guarded
def label(
    constitution: str = typer.Option("harmless", help="Name, NAME@VERSION, or a YAML path."),
    prompts: list[str] = typer.Option(["red-team"], help="Prompt tag(s); bundled sets import themselves."),
    policy: str = typer.Option("smollm2-135m", help="Model sampled for candidates (with --source store: "
                                                    "whose stored responses are used)."),
    judge: str = typer.Option("smollm2-135m", help="Feedback model that picks (A) or (B)."),
    source: str = typer.Option("samples", help="samples (fresh policy samples) | store (stored responses)."),
    kinds: list[str] = typer.Option(["initial", "final-revision"],
                                    help="With --source store: response kinds to pair (initial, "
                                         "final-revision, revision, sample, ...)."),
    samples: int = typer.Option(2, help="Policy samples per prompt (every unordered pair is judged)."),
    principles_per_pair: int = typer.Option(4, help="Preference principles per pair, each judged in both "
                                                    "orders."),
    cot: bool = typer.Option(False, "--cot/--no-cot", help="The judge reasons before answering."),
    cot_clamp: str = typer.Option("0.4,0.6", help="LO,HI bounds for chain-of-thought probabilities."),
    min_margin: float = typer.Option(0.05, help="Labels closer than this to 0.5 are ties."),
    seed: int = typer.Option(0, help="Fixes samples and principle draws."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N prompts (by id)."),
    engine: str = typer.Option("auto", help="hf | vllm | auto."),
    max_new_tokens: int = typer.Option(128, min=1, help="Length of each policy sample."),
    chunk_size: int = typer.Option(64, min=1, help="Items per engine call and per transaction."),
) -> None:
    """RL-CAI: the judge labels pairs of responses by (A)/(B) log-probs; stores soft-labelled pairs."""
    from flows.label import make_config, preflight

    lo, sep, hi = cot_clamp.partition(",")
    try:
        bounds = (float(lo), float(hi))
    except ValueError:
        fail(f"--cot-clamp {cot_clamp!r}: expected LO,HI such as 0.4,0.6")
    if not sep:
        fail(f"--cot-clamp {cot_clamp!r}: expected LO,HI such as 0.4,0.6")
    cfg = make_config(constitution=constitution, prompts=_split(prompts), policy=policy, judge=judge,
                      source=source, kinds=_split(kinds), samples=samples,
                      principles_per_pair=principles_per_pair, cot=cot, cot_clamp=bounds,
                      min_margin=min_margin, seed=seed, limit=limit, engine=engine,
                      max_new_tokens=max_new_tokens, chunk_size=chunk_size)
    preflight(cfg)  # unknown constitution / tag, nothing stored to pair: fail before Prefect starts
    if cfg.source == "samples":
        _preflight_model(policy)
    _preflight_model(judge)
    from flows.label import label_flow

    summary = label_flow(cfg)
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
    from flows.judge_report import figures, write

    with _session() as s:
        fig = figures(s, constitution, judge)
    render_judge(fig, console, title=f"judge report ({constitution or 'all constitutions'})")
    paths = write(fig, out)
    console.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)

# train: flows/train.py

@app.command("train")
@guarded
def train(
    base: str = typer.Option("smollm2-135m", help="Start and reference model: smollm2-135m, HF dir, hub id."),
    constitution: str | None = typer.Option(None, help="Only pairs of NAME or NAME@VERSION (default: any)."),
    method: list[str] = typer.Option(["revision", "ai"], help="Pair sources, e.g. revision,ai."),
    status: list[str] = typer.Option(["ok"], help="Pair statuses to use (ok, tie, position-inconsistent)."),
    min_label_prob: float | None = typer.Option(None, help="Drop AI labels less sure than this."),
    soft_labels: bool = typer.Option(True, "--soft-labels/--hard-labels",
                                     help="AI pairs train with label smoothing 1 - label_prob."),
    dataset: Path | None = typer.Option(None, help="A saved HF dataset dir or .jsonl instead of the store."),
    split: str = typer.Option("train_prefs", help="Split of --dataset to read."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N selected pairs."),
    beta: float = typer.Option(0.1, help="KL strength; lower drifts further from the base model."),
    loss_type: str = typer.Option("sigmoid", help="sigmoid | ipo | hinge."),
    epochs: int = typer.Option(1, min=1, help="Passes over the training pairs."),
    max_steps: int | None = typer.Option(None, min=1, help="Optimizer steps (overrides --epochs)."),
    lr: float = typer.Option(5e-6, help="Peak learning rate."),
    batch_size: int = typer.Option(4, min=1, help="Pairs per forward."),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimizer step."),
    scheduler: str = typer.Option("linear", help="linear | cosine | constant."),
    warmup_ratio: float = typer.Option(0.1, help="Share of steps to ramp the lr up."),
    max_length: int = typer.Option(512, help="Tokens per prompt + answer."),
    max_prompt_length: int = typer.Option(256, help="Prompt tokens kept (from the end)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 (autocast)."),
    seed: int = typer.Option(0, help="Data order and anything random."),
    eval_fraction: float = typer.Option(0.1, help="Held-out share of prompts."),
    early_stop_patience: int | None = typer.Option(None, help="Stop after N evals without improvement."),
    checkpoint_every: int = typer.Option(0, help="Steps between checkpoints (0: none)."),
    gradient_checkpointing: bool = typer.Option(False, help="Less memory, ~30% more compute."),
    out: Path = typer.Option(Path("runs/dpo"), help="Output directory for the trained model."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUT."),
) -> None:
    """DPO on the stored preference pairs; writes a HF model directory and metrics.png to OUT."""
    from flows.train import TrainConfig, load_examples

    cfg = TrainConfig(base=base, constitution=constitution, methods=_split(method), statuses=_split(status),
                      min_label_prob=min_label_prob, use_soft_labels=soft_labels,
                      dataset=str(dataset) if dataset else None, dataset_split=split, limit=limit, beta=beta,
                      loss_type=loss_type, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
                      grad_accum=grad_accum, scheduler=scheduler, warmup_ratio=warmup_ratio,
                      max_length=max_length, max_prompt_length=max_prompt_length, dtype=dtype, seed=seed,
                      eval_fraction=eval_fraction,
                      early_stop_patience=early_stop_patience, checkpoint_every=checkpoint_every,
                      gradient_checkpointing=gradient_checkpointing, out=str(out), resume=resume)
    try:
        cfg.trainer_config().validate()
    except ValueError as exc:
        fail(f"bad training settings: {exc}")
    load_examples(cfg)  # no pairs / bad dataset / unreachable database: fail before Prefect starts
    _preflight_model(base)
    from flows.train import train_flow

    s = train_flow(cfg)
    final = s.get("final_train", {})
    console.print(f"trained {s['steps']} steps on {s['n_train']} pairs ({s['n_eval']} held out); "
                  f"reference log-probs {s['ref_computed']} computed, {s['ref_reused']} reused; "
                  f"final loss {final.get('loss', float('nan')):.4f}, reward accuracy "
                  f"{final.get('rewards/accuracies', float('nan')):.2f}; model in {s['out']}, "
                  f"plot {s['plot']}",
                  highlight=False)

# export: flows/export.py

@app.command("export")
@guarded
def export(
    constitution: str = typer.Option(..., help="NAME (its newest version that has pairs) or NAME@VERSION."),
    out: Path = typer.Option(..., help="Directory to write (replaces an earlier export there)."),
    fmt: str = typer.Option("arrow", "--format",
                            help="arrow (load_from_disk) | parquet | jsonl (one file per split)."),
    method: list[str] = typer.Option([], help="Only these pair methods: revision, ai (default: both)."),
    min_label_prob: float | None = typer.Option(None, help="Drop pairs with label_prob below this."),
    min_margin: float | None = typer.Option(None, help="Drop pairs with |label_prob - 0.5| below this."),
    tag: list[str] = typer.Option([], help="Only prompts with any of these tags."),
    since: str | None = typer.Option(None, help="Pairs created at or after this UTC date/time (2024-05-01)."),
    until: str | None = typer.Option(None, help="Pairs created before this UTC date/time (exclusive)."),
    include_ties: bool = typer.Option(False, "--include-ties", help="Also export pairs judged a tie."),
    include_inconsistent: bool = typer.Option(False, "--include-inconsistent",
                                              help="Also export position-inconsistent pairs."),
    include_quarantined: bool = typer.Option(False, "--include-quarantined",
                                             help="Also export pairs touching quarantined items."),
    test_fraction: float = typer.Option(0.1, help="Share of prompts in the test splits (hash of prompt id)."),
    license_id: str = typer.Option("other", "--license", help="License for the card, e.g. cc-by-4.0."),
    push_to_hub: str | None = typer.Option(None, metavar="OWNER/NAME",
                                           help="Then push data and card to this hub dataset (HF_TOKEN)."),
    private: bool = typer.Option(False, "--private", help="Create the hub repo private."),
) -> None:
    """HF DatasetDict (train_sft, test_sft, train_prefs, test_prefs) with a dataset card and manifest."""
    from flows.export import make_config, parse_when, preflight

    cfg = make_config(constitution=constitution, out=out, format=fmt, methods=_split(method),
                      min_label_prob=min_label_prob, min_margin=min_margin, tags=_split(tag),
                      since=parse_when(since, "--since"), until=parse_when(until, "--until"),
                      include_ties=include_ties, include_inconsistent=include_inconsistent,
                      include_quarantined=include_quarantined, test_fraction=test_fraction,
                      license=license_id, push_to_hub=push_to_hub, private=private)
    preflight(cfg)  # nothing selected, bad --out, no HF_TOKEN: fail before Prefect starts
    from flows.export import export_flow

    s = export_flow(cfg)
    console.print(f"exported {s['constitution']} to {s['out']} ({s['format']}): "
                  + ", ".join(f"{k} {n}" for k, n in s["counts"].items())
                  + (f"; pushed to {s['url']}" if s.get("url") else ""), highlight=False)
    if s.get("warning"):
        err.print(f"[yellow]warning:[/] {escape(s['warning'])}", highlight=False, soft_wrap=True)

# run / eval / report: flows/pipeline.py, flows/evaluate.py, flows/report.py

def _preflight_eval_model(flag: str, spec: str) -> None:
    """runs/NAME that does not exist is a typo or an untrained model, not a hub id: say so."""
    p = Path(spec).expanduser()
    if not p.exists() and "/" in spec and (p.parent.is_dir() or spec.startswith("runs/")):
        fail(f"{flag} {spec}: no such model directory (expected a HF-format directory written by "
             "`cai train --out`, the bundled `smollm2-135m`, or a hub id)")
    _preflight_model(spec)


@app.command("eval")
@guarded
def eval_cmd(
    model: str = typer.Option(..., help="The trained model: a HF directory such as runs/harmless-dpo."),
    baseline: str = typer.Option("smollm2-135m", help="What it is compared with (usually its base model)."),
    prompts: list[str] = typer.Option(["red-team-heldout,benign-heldout"],
                                      help="Held-out prompt tag(s); bundled sets import themselves."),
    constitution: str = typer.Option("harmless", help="Whose preference principles the judge answers."),
    judge: str | None = typer.Option(None, help="Feedback model (default: the baseline)."),
    principles: int = typer.Option(3, min=1, help="Preference principles per prompt, each in both orders."),
    max_new_tokens: int = typer.Option(128, min=1, help="Answer length cap, the same for both models."),
    limit: int | None = typer.Option(None, min=1, help="Only the first N prompts of each set (by id)."),
    name: str | None = typer.Option(None, help="Label for this comparison (default MODEL-vs-BASELINE)."),
    engine: str = typer.Option("auto", help="hf | vllm | auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Trained model vs baseline on held-out prompts: refusal rates and judged win rates."""
    from flows.evaluate import EvalConfig, load_items

    cfg = EvalConfig(model=model, baseline=baseline, prompts=_split(prompts), constitution=constitution,
                     judge=judge, principles=principles, max_new_tokens=max_new_tokens, limit=limit,
                     name=name, engine=engine)
    load_items(cfg)  # unknown constitution / tag, unreachable database: fail before Prefect starts
    for flag, spec in (("--model", model), ("--baseline", baseline), ("--judge", cfg.judge_model)):
        _preflight_eval_model(flag, spec)
    from flows.cli.render import render_eval
    from flows.evaluate import eval_flow

    summary = eval_flow(cfg)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    else:
        render_eval(summary, console)


@app.command("report")
@guarded
def report(
    out: Path = typer.Option(Path("reports/latest"), help="Directory for index.html, report.json and PNGs."),
    constitution: str | None = typer.Option(None, help="NAME or NAME@VERSION (default: everything)."),
    examples: int = typer.Option(5, min=0, help="Example chains shown on the page."),
) -> None:
    """A static HTML report of the store (opens offline in any browser)."""
    from flows.report import ReportConfig, make_report

    data = make_report(ReportConfig(out=out, constitution=constitution, examples=examples))
    plots = sum(len(v) for v in data["images"].values())
    console.print(f"wrote {data['index']} ({plots} plot{'' if plots == 1 else 's'}, figures in "
                  f"{out / 'report.json'})", highlight=False)


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


def main() -> None:
    process_defaults()
    app()


if __name__ == "__main__":
    main()
