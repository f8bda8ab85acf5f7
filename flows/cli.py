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
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Constitutional AI / RLAIF data factory.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
constitution_app = typer.Typer(help="List, validate, version and diff constitution files.", no_args_is_help=True)
prompts_app = typer.Typer(help="Load prompt sets into the store.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
app.add_typer(prompts_app, name="prompts")
app.add_typer(db_app, name="db")

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _session():
    from store.db import DatabaseError, session_scope

    try:
        return session_scope()
    except DatabaseError as exc:
        fail(str(exc))


def guarded(fn):
    """Turn the errors a user can act on into one line and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from constitution.load import ConstitutionError
        from engines.bundled import ModelNotFound
        from flows.common import UserError
        from store.db import DatabaseError

        try:
            return fn(*args, **kwargs)
        except (UserError, DatabaseError, ConstitutionError, ModelNotFound, LookupError) as exc:
            msg = exc.args[0] if isinstance(exc, LookupError) and exc.args else str(exc)
            fail(msg)

    return wrapper


# --- constitution --------------------------------------------------------------------------

@constitution_app.command("list")
@guarded
def constitution_list() -> None:
    """The constitution files found, with their current version and principle counts."""
    from constitution.load import ConstitutionError, available, load_file

    table = Table("name", "version", "principles", "preferences", "few-shot", "file")
    for name, path in available().items():
        try:
            c = load_file(path)
            table.add_row(name, c.version, str(len(c.principles)), str(len(c.preferences)),
                          str(len(c.few_shot)), str(path))
        except ConstitutionError as exc:
            table.add_row(name, "[red]invalid[/]", "", "", "", exc.args[0])
    console.print(table)


@constitution_app.command("validate")
@guarded
def constitution_validate(path: Path) -> None:
    """Check a constitution file; print its version id, or the file:line:col of the problem."""
    from constitution.load import load_file

    c = load_file(path)
    console.print(f"{c.ref}  ({len(c.principles)} principles, {len(c.preferences)} preferences, "
                  f"{len(c.few_shot)} few-shot examples)", highlight=False)


@constitution_app.command("log")
@guarded
def constitution_log(name: str) -> None:
    """Versions of NAME the store has seen, oldest first, with dates."""
    from sqlmodel import select

    from store.models import ConstitutionVersion

    with _session() as s:
        rows = s.exec(select(ConstitutionVersion).where(ConstitutionVersion.name == name)
                      .order_by(ConstitutionVersion.created_at, ConstitutionVersion.id)).all()
    if not rows:
        fail(f"the store has seen no version of {name!r} yet (versions are recorded when a flow uses "
             f"the constitution, or with `cai constitution record {name}`)")
    table = Table("version", "first seen (UTC)", "principles", "file")
    for r in rows:
        n = len([k for k in r.principle_hashes if not k.startswith("pref:")])
        table.add_row(f"{name}@{r.version}", r.created_at.strftime("%Y-%m-%d %H:%M:%S"), str(n), r.source_path)
    console.print(table)


@constitution_app.command("record")
@guarded
def constitution_record(name: str) -> None:
    """Store the current version of NAME (flows do this automatically when they use it)."""
    from flows.common import resolve_constitution

    with _session() as s:
        c = resolve_constitution(s, name)
    console.print(f"recorded {c.ref}", highlight=False)


@constitution_app.command("diff")
@guarded
def constitution_diff(old: str, new: str) -> None:
    """Principles added, removed or changed between two versions (NAME@VERSION, NAME, or a file)."""
    from constitution.load import diff
    from flows.common import resolve_constitution

    with _session() as s:
        a = resolve_constitution(s, old)
        b = resolve_constitution(s, new)
    changes = diff(a, b)
    console.print(f"{a.ref} -> {b.ref}", highlight=False)
    if not changes:
        console.print("no differences")
        return
    for ch in changes:
        colour = {"added": "green", "removed": "red", "changed": "yellow"}[ch.kind]
        console.print(f"[{colour}]{ch.kind:8}[/] {ch.section}: {ch.id}", highlight=False)
        if ch.kind == "changed":
            for field_name, (was, now) in ch.fields.items():
                console.print(f"    {field_name}:\n      - {was}\n      + {now}", highlight=False)


# --- prompts -------------------------------------------------------------------------------

@prompts_app.command("add")
@guarded
def prompts_add(
    file: Path,
    tag: list[str] = typer.Option([], "--tag", "-t", help="Tag(s) to select this set by, e.g. red-team."),
) -> None:
    """Load prompts from JSONL, CSV (a `prompt` column), plain text, or a saved HF dataset dir."""
    from flows.prompts import parse_file, store_prompts

    if not file.exists():
        fail(f"{file}: no such file or directory")
    res = parse_file(file)
    for line, message in res.errors:
        err.print(f"{file}:{line}: skipped: {message}", highlight=False)
    with _session() as s:
        new, old = store_prompts(s, res.prompts, str(file), tag or [file.stem.replace("_", "-")])
    console.print(f"{file}: {len(res.prompts)} prompts read ({new} new, {old} already stored), "
                  f"{len(res.errors)} bad rows skipped", highlight=False)
    if res.errors and not res.prompts:
        raise typer.Exit(2)


@prompts_app.command("list")
@guarded
def prompts_list() -> None:
    """Prompt tags and how many prompts carry each."""
    from sqlalchemy import func
    from sqlmodel import select

    from store.models import PromptTag

    with _session() as s:
        rows = s.exec(select(PromptTag.tag, func.count()).group_by(PromptTag.tag).order_by(PromptTag.tag)).all()
    table = Table("tag", "prompts")
    for t, n in rows:
        table.add_row(t, str(n))
    console.print(table)


# --- status and db -------------------------------------------------------------------------

@app.command("status")
@guarded
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Counts per table and stage, failures and quarantined items."""
    from flows.status import collect

    with _session() as s:
        data = collect(s)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    from flows.status import render

    render(data, console)


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
# label / judge-report: flows/label.py, flows/judge_report.py
# train: flows/train.py
# export: flows/export.py
# run / eval / report: flows/pipeline.py, flows/evaluate.py, flows/report.py


def main() -> None:
    app()


if __name__ == "__main__":
    main()
