"""`cai constitution ...` and `cai prompts ...`: the files a team edits and the prompts it loads.

    cai constitution validate constitution/harmless.yaml
    cai constitution diff harmless@<old> harmless
    cai prompts add data/red_team.jsonl --tag red-team
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import _session, console, err, fail, guarded
from flows.cli.render import esc

constitution_app = typer.Typer(help="List, validate, version and diff constitution files.", no_args_is_help=True)
prompts_app = typer.Typer(help="Load prompt sets into the store.", no_args_is_help=True)


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
            table.add_row(esc(name), esc(c.version), str(len(c.principles)), str(len(c.preferences)),
                          str(len(c.few_shot)), esc(path))
        except ConstitutionError as exc:
            table.add_row(esc(name), "[red]invalid[/]", "", "", "", esc(exc.args[0]))
    console.print(table)


@constitution_app.command("lint")
@guarded
def constitution_lint(
    names: list[str] = typer.Argument(None, help="constitution names or YAML paths; default: the governing "
                                      "pair (flows/configs.py GOVERNING)"),
    prompts: str | None = typer.Option(None, "--prompts", help="only prompts with these tags (comma-separated); "
                                       "default: every stored prompt, or the bundled files if the store has none"),
    taxonomy: str = typer.Option("harms", "--taxonomy", help="harm taxonomy whose kinds the stances must agree "
                                 "with; 'none' to skip"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print the info findings"),
) -> None:
    """Find what would make bad data: contradicting stances or examples, texts the gates or the refusal
    detector reject, categories no principle governs. One line per finding; exit 1 on any error."""
    from flows.configs import GOVERNING
    from flows.lint import run_lint

    out = run_lint(names or list(GOVERNING), [t.strip() for t in prompts.split(",")] if prompts else None,
                   None if taxonomy == "none" else taxonomy)
    shown = [f for f in out["findings"] if verbose or f.level != "info"]
    for f in shown:
        colour = {"error": "red", "warning": "yellow"}.get(f.level, "dim")
        console.print(f"[{colour}]{esc(str(f))}[/]", highlight=False, soft_wrap=True)
    levels = {lv: sum(f.level == lv for f in out["findings"]) for lv in ("error", "warning", "info")}
    console.print(esc(f"{', '.join(out['constitutions'])} against {out['prompts_from']}: {levels['error']} errors, "
                      f"{levels['warning']} warnings, {levels['info']} info" + ("" if verbose or not levels["info"]
                                                                                else " (--verbose shows them)")),
                  highlight=False)
    if levels["error"]:
        raise typer.Exit(1)


@constitution_app.command("validate")
@guarded
def constitution_validate(path: Path) -> None:
    """Check a constitution file; print its version id, or the file:line:col of the problem."""
    from constitution.load import load_file

    c = load_file(path)
    console.print(f"{esc(c.ref)}  ({len(c.principles)} principles, {len(c.preferences)} preferences, "
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
        table.add_row(esc(f"{name}@{r.version}"), r.created_at.strftime("%Y-%m-%d %H:%M:%S"), str(n),
                      esc(r.source_path))
    console.print(table)


@constitution_app.command("record")
@guarded
def constitution_record(name: str) -> None:
    """Store the current version of NAME (flows do this automatically when they use it)."""
    from flows.common import resolve_constitution

    with _session() as s:
        c = resolve_constitution(s, name)
    console.print(f"recorded {esc(c.ref)}", highlight=False)


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
    console.print(f"{esc(a.ref)} -> {esc(b.ref)}", highlight=False)
    if not changes:
        console.print("no differences")
        return
    for ch in changes:
        colour = {"added": "green", "removed": "red", "changed": "yellow"}[ch.kind]
        console.print(f"[{colour}]{ch.kind:8}[/] {esc(ch.section)}: {esc(ch.id)}", highlight=False)
        if ch.kind == "changed":
            for field_name, (was, now) in ch.fields.items():
                console.print(f"    {esc(field_name)}:\n      - {esc(was)}\n      + {esc(now)}", highlight=False)


# --- prompts -------------------------------------------------------------------------------

@prompts_app.command("add")
@guarded
def prompts_add(
    file: Path,
    tag: list[str] = typer.Option([], "--tag", "-t", help="Tag(s) to select this set by, e.g. red-team."),
) -> None:
    """Load prompts from JSONL, CSV (a `prompt` column), plain text, or a saved HF dataset dir."""
    from cai.prompts import parse_file, refuse_bundled_tags, user_tags
    from store.queries import store_prompts

    if not file.exists():
        fail(f"{file}: no such file or directory")
    tags = user_tags(tag, file)  # before reading: a bad tag stores nothing
    refuse_bundled_tags(tags, file)  # and a bundled set is never replaced
    res = parse_file(file)
    for line, message in res.errors:
        err.print(esc(f"{file}:{line}: skipped: {message}"), highlight=False, soft_wrap=True)  # one line each
    with _session() as s:
        new, old = store_prompts(s, res.prompts, str(file), tags)
    repeated = len(res.prompts) - new - old
    console.print(esc(f"{file}: {len(res.prompts)} prompts read ({new} new, {old} already stored"
                      + (f", {repeated} repeated in the file" if repeated else "")
                      + f"), {len(res.errors)} bad rows skipped"), highlight=False, soft_wrap=True)
    if res.errors and not res.prompts:
        raise typer.Exit(2)


@prompts_app.command("list")
@guarded
def prompts_list(
    constitutions: str | None = typer.Option(None, "--constitutions", help="whose principles declare each "
                                             "prompt's stance (comma-separated); default: the governing pair"),
) -> None:
    """Prompt tags and categories, how many prompts carry each, and what the constitutions declare for
    them: refuse, answer, or ungoverned (no principle governs them: they make no pairs)."""
    from flows.configs import GOVERNING
    from flows.lint import stance_table

    refs = [c.strip() for c in constitutions.split(",")] if constitutions else list(GOVERNING)
    table = Table("tag", "category", "prompts", "stance", "governed by")
    for r in stance_table(refs):
        colour = {"refuse": "red", "answer": "green"}.get(r["stance"], "yellow")
        table.add_row(esc(r["tag"]), esc(r["category"]), str(r["prompts"]), f"[{colour}]{r['stance']}[/]",
                      esc(f"{r['principle']} ({r['via']})" if r["principle"] else "-"))
    console.print(table)
    console.print(esc(f"stances from {', '.join(refs)}; a category or tag is declared in a principle's "
                      "`governs`, with `stance: refuse` or `stance: answer`"), highlight=False)
