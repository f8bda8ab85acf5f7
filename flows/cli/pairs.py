"""The stages that make prompts, responses and pairs, and the check of the AI labels: `cai generate`,
`cai contrast`, `cai redteam`, `cai label`, `cai judge-report` (flows/generate.py, contrast.py,
redteam.py, label.py, judge_report.py).

    cai generate --prompts red-team --limit 8 --rounds 1 --dry-run
    cai label --source samples --samples 2 --cot
    cai judge-report --constitution harmless --out reports/judge

Options, defaults and help come from the flow configs through `opt` (flows/cli/options.py).
flows/cli/__init__.py registers the commands, in the order `cai --help` lists them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cai.errors import UserError
from flows.cli.common import _session, console, guarded, preflight_model, split_commas
from flows.cli.options import configured, opt
from flows.cli.render import esc, render_summary
from flows.configs import ContrastConfig, GenerateConfig, LabelConfig, RedteamConfig
from flows.orchestration import run_flow


def _checked_run(flow, cfg, load_inputs, *models: str) -> dict:
    """Check what the flow reads (an unknown constitution, tag or taxonomy, an unreachable database)
    and the models it loads before Prefect starts, then run it."""
    load_inputs(cfg)
    for spec in models:
        preflight_model(spec, cfg.engine)
    return run_flow(flow, cfg)


def _cap_new_tokens(cfg: GenerateConfig, max_new_tokens: int | None = None) -> GenerateConfig:
    """--max-new-tokens caps every stage's length (each keeps its own if it is shorter)."""
    if max_new_tokens:
        for k in ("initial", "critique", "revision"):
            s = getattr(cfg, k)
            s.max_new_tokens = min(s.max_new_tokens, max_new_tokens)
    return cfg


@guarded
@configured(GenerateConfig, adjust=_cap_new_tokens)
def generate(
    cfg: GenerateConfig,
    constitution: str | None = opt(GenerateConfig, "constitution"),
    prompts: list[str] | None = opt(GenerateConfig, "prompts", convert=split_commas),
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
    from flows.generate import generate_flow, load_inputs

    render_summary("generate", _checked_run(generate_flow, cfg, load_inputs, cfg.model), console)


@guarded
@configured(ContrastConfig)
def contrast(
    cfg: ContrastConfig,
    prompts: list[str] | None = opt(ContrastConfig, "prompts", convert=split_commas),
    constitutions: list[str] | None = opt(ContrastConfig, "constitutions", convert=split_commas),
    model: str | None = opt(ContrastConfig, "model"),
    engine: str | None = opt(ContrastConfig, "engine.backend", "--engine"),
    limit: int | None = opt(ContrastConfig, "limit"),
    seed: int | None = opt(ContrastConfig, "seed"),
    dry_run: bool | None = opt(ContrastConfig, "runner.dry_run", "--dry-run"),
    budget: str | None = opt(ContrastConfig, "runner.budget", "--budget", metavar="TOKENS|$"),
) -> None:
    """Contrastive pairs (prompts to refuse) and helpfulness pairs (prompts to answer), steered by the
    governing principle's own texts, quality-gated."""
    from flows.contrast import contrast_flow, load_inputs

    render_summary("contrast", _checked_run(contrast_flow, cfg, load_inputs, cfg.model), console)


@guarded
@configured(RedteamConfig)
def redteam(
    cfg: RedteamConfig,
    taxonomy: str | None = opt(RedteamConfig, "taxonomy"),
    per_category: int | None = opt(RedteamConfig, "per_category", min=1),
    categories: list[str] | None = opt(RedteamConfig, "categories", convert=split_commas),
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
    from flows.cli.render import render_redteam
    from flows.redteam import load_inputs, redteam_flow

    # the campaign's model is found missing only after all attacker generation: check it before
    policy = [cfg.policy] if cfg.campaign and cfg.policy else []
    summary = _checked_run(redteam_flow, cfg, load_inputs, cfg.model, *policy)
    render_summary("redteam", {k: v for k, v in summary.items() if k not in ("per_category", "attack_success")},
                   console)
    render_redteam(summary, console)


def _clamp(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(",")
    try:
        if sep:
            return float(lo), float(hi)
    except ValueError:
        pass
    raise UserError(f"--cot-clamp {text!r}: expected LO,HI such as 0.4,0.6")


@guarded
@configured(LabelConfig)
def label(
    cfg: LabelConfig,
    constitution: str | None = opt(LabelConfig, "constitution"),
    prompts: list[str] | None = opt(LabelConfig, "prompts", convert=split_commas),
    policy: str | None = opt(LabelConfig, "policy"),
    judge: str | None = opt(LabelConfig, "judge"),
    source: str | None = opt(LabelConfig, "source", "--source", "--label-source"),
    reward_model: str | None = opt(LabelConfig, "reward_model"),
    kinds: list[str] | None = opt(LabelConfig, "kinds", convert=split_commas),
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
    from flows.label import label_flow
    from flows.label_inputs import preflight

    preflight(cfg)  # unknown constitution / tag, nothing stored to pair: fail before Prefect starts
    if cfg.source in ("samples", "best-of-n"):
        preflight_model(cfg.policy, cfg.engine)
    if cfg.source != "best-of-n":  # best-of-n asks the reward model, not the judge
        preflight_model(cfg.judge, cfg.judge_engine or cfg.engine)
    render_summary("label", run_flow(label_flow, cfg), console)


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
