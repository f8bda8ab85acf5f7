"""`cai review ...`: the review page, its agreement figures, and JSONL records in and out.

    cai review [--host 127.0.0.1] [--port 8765] [--reviewer NAME] [--method ai] [--label-max 0.7]
    cai review stats [--constitution harmless] [--json]
    cai review export --out reviews.jsonl [--method ai] [--limit 500]
    cai review import reviews.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from flows.cli.common import console, guarded
from flows.cli.options import configured, opt
from flows.cli.render import esc
from flows.configs import ReviewConfig

# the options that pick the pairs: the page opens its queue on them, `review export` writes what they pick
QUEUE_FILTERS = {"method": str, "status": str, "principle": str, "constitution": str, "tag": str,
                 "label_min": float, "label_max": float, "queue": str}

review_app = typer.Typer(help="People check the factory's pairs: a local review page (the default), agreement "
                              "figures, JSONL records in and out.")


def _reviewer(cfg: ReviewConfig) -> str:
    if cfg.reviewer:
        return cfg.reviewer
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container): a plain default
        return "reviewer"


@review_app.callback(invoke_without_command=True)
@guarded
@configured(ReviewConfig, fields=QUEUE_FILTERS)
def review(
    cfg: ReviewConfig,
    ctx: typer.Context,
    host: str | None = opt(ReviewConfig, "host"),
    port: int | None = opt(ReviewConfig, "port"),
    reviewer: str | None = opt(ReviewConfig, "reviewer"),
) -> None:
    """Serve the review page (127.0.0.1 by default); any other address needs the token it prints."""
    if ctx.invoked_subcommand is not None:
        return
    import os
    import secrets

    from flows.review import TOKEN_ENV, bind, is_loopback, make_app, serve, settings
    from store.db import database_url, get_engine, shown_url

    token = os.environ.get(TOKEN_ENV) or (None if is_loopback(cfg.host) else secrets.token_urlsafe(24))
    s = settings(cfg, token, _reviewer(cfg))
    get_engine(cfg.database_url)  # unreachable or foreign database: one line now, not on the first page
    app = make_app(s)
    sock, url = bind(cfg.host, cfg.port)
    shown = url + (f"?token={token}" if token else "")
    console.print(f"cai review: {esc(shown_url(database_url(cfg.database_url)))} as reviewer {esc(s.reviewer)}; "
                  f"open {esc(shown)}" + ("" if token is None else "  (the token is required: keep it to your team)"),
                  highlight=False, soft_wrap=True)
    console.print("keys: 1/Left, 2/Right, 3/t tie, 4/b both bad, 0/s skip, n note, i the factory's label; "
                  "Ctrl+C stops", highlight=False)
    sys.stdout.flush()
    from store.stop import is_stop

    try:
        serve(app, sock)
    except BaseException as exc:  # uvicorn shuts down cleanly, then passes the signal on: a server's normal end
        if not is_stop(exc):
            raise
    console.print("cai review: stopped; every verdict is stored", highlight=False)


@review_app.command("stats")
@guarded
def review_stats(
    constitution: str | None = typer.Option(None, help="Only pairs of NAME or NAME@VERSION."),
    as_json: bool = typer.Option(False, "--json", help="Print every figure as JSON."),
) -> None:
    """People's agreement with the factory (per method, principle, judge), with each other, and the judge's
    calibration against them; 95 % Wilson intervals."""
    from flows.review_io import stats

    st = stats(None, constitution)
    if as_json:
        sys.stdout.write(json.dumps(st, indent=2, default=str) + "\n")
        return
    render_stats(st)


def _interval(a: dict[str, Any]) -> str:
    if not a["n"]:
        return "n/a"
    return f"{100 * a['rate']:.1f} %  [{100 * a['low']:.1f}, {100 * a['high']:.1f}]  ({a['k']}/{a['n']})"


def render_stats(st: dict[str, Any]) -> None:
    from rich.table import Table

    o = st["overall"]
    if not o["verdicts"]:
        console.print("no verdicts yet: `cai review` shows pairs and stores what people decide")
        return
    n = len(st["reviewers"])
    console.print(esc(f"{o['verdicts']} verdicts on {o['pairs']} pairs by {n} {'person' if n == 1 else 'people'} "
                      f"({', '.join(st['reviewers'])}); latest verdict per person and pair, {st['skips']} skips "
                      "left out. Agreement: share of verdicts preferring one reply that prefer the factory's "
                      "choice, 95 % Wilson interval in brackets."), highlight=False, soft_wrap=True)
    t = Table("figure", "value", title="agreement")
    t.add_row("people agree with the factory", _interval(o["agreement"]))
    t.add_row("  given before opening its label", _interval(st["blind"]))
    t.add_row("ties / both bad", f"{o['tie']} / {o['both_bad']}")
    hh = st["human_human"]
    t.add_row("people agree with each other", _interval(hh) + f" on {hh['pairs']} pairs")
    t.add_row("verdicts picking the left reply", _interval(st["picked_left"]))
    console.print(t)
    for title, key in (("method", "by_method"), ("principle", "by_principle"), ("judge model", "by_judge")):
        t = Table(title, "verdicts", "pairs", "agreement [95 % CI]", "ties", "both bad", title=f"per {title}")
        for k, g in st[key].items():
            t.add_row(esc(k), str(g["verdicts"]), str(g["pairs"]), _interval(g["agreement"]), str(g["tie"]),
                      str(g["both_bad"]))
        console.print(t)
    if st["calibration"]:
        t = Table("judge P(chosen better)", "mean", "people agreeing [95 % CI]", title="judge calibration")
        for c in st["calibration"]:
            t.add_row(f"{c['bin'][0]:.1f}-{c['bin'][1]:.1f}", f"{c['mean_label']:.3f}", _interval(c))
        console.print(t)


@review_app.command("export")
@guarded
@configured(ReviewConfig, fields=QUEUE_FILTERS)
def review_export(
    cfg: ReviewConfig,
    out: Path = typer.Option(..., "--out", help="JSONL file of records (written whole, then moved into place)."),
    limit: int | None = typer.Option(None, min=1, help="At most this many pairs."),
) -> None:
    """Pairs as JSONL records another review tool can load: prompt and two replies as fields, the factory's
    label as a suggestion (value, score, agent), people's verdicts as responses (queue: all pairs by default)."""
    from flows.cli.common import check_writable
    from flows.review_io import export_records

    check_writable(out.parent if str(out.parent) else Path("."), "--out")
    n = export_records(cfg, out, limit)
    console.print(esc(f"wrote {n} records to {out}"), highlight=False)


@review_app.command("import")
@guarded
def review_import(file: Path = typer.Argument(..., help="JSONL records (`cai review export` shape).")) -> None:
    """People's verdicts from JSONL records; a verdict a reviewer already gave on that pair is skipped."""
    from flows.review_io import import_records

    r = import_records(file)
    console.print(esc(f"{file}: {r['records']} records, {r['verdicts']} verdicts: {r['added']} added, "
                      f"{r['already_known']} already stored"), highlight=False)
