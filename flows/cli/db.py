"""`cai status` and `cai db ...`: what the store holds, and its upkeep.

    cai status --json
    cai db upgrade
    cai db release-quarantine --stage label.judge

flows/cli/__init__.py registers `cai status`, in the order `cai --help` lists the commands.
"""

from __future__ import annotations

import json
import sys

import typer

from flows.cli.common import _session, console, guarded
from flows.cli.render import esc

db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


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
