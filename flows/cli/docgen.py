"""Writes docs/cli.md, the CLI reference, from the code: every `cai` command with its options, defaults
and help (from the typer app), and every config field `--config`/`--set` accept (from flows/configs.py).

    python -m flows.cli.docgen            # rewrite docs/cli.md
    python -m flows.cli.docgen --check    # exit 1 if docs/cli.md is out of date (tests/test_docs.py does this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel

OUT = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: Any) -> str:
    """A table cell in code font; a pipe inside backticks would end the cell (or keep its backslash)."""
    text = " ".join(str(text).split())
    if "|" in text:
        return "<code>" + text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "&#124;") + "</code>"
    return f"`{text}`"


def _split_default(text: str) -> tuple[str, str]:
    """('help', 'default') from click's help text, which ends '  [default: (X)]' or '[required]'."""
    m = re.search(r"\s*\[(default: \(?(.*?)\)?|required)\]\s*$", text)
    if not m:
        return text, ""
    return text[: m.start()], "(required)" if m.group(1) == "required" else m.group(2)


def _command(ctx: Any, cmd: Any, path: str, out: list[str]) -> None:
    out += [f"## `{path}`", ""]
    if cmd.help:
        out += [cmd.help.strip(), ""]
    sub = cmd.context_class(cmd, info_name=path.split()[-1], parent=ctx)
    usage = " ".join(cmd.collect_usage_pieces(sub))
    out += ["```text", f"{path} {usage}".rstrip(), "```", ""]
    rows = []
    for p in cmd.params:
        record = None if getattr(p, "hidden", False) else p.get_help_record(sub)
        if record is None:
            continue
        name, text = record
        help_text, default = _split_default(text)
        rows.append(f"| {_code(name)} | {_code(default) if default else ''} | {_cell(help_text)} |")
    if rows:
        out += ["| argument or option | default | help |", "|---|---|---|", *rows, ""]
    if hasattr(cmd, "list_commands"):  # a group (typer vendors its own click)
        for name in cmd.list_commands(sub):
            _command(sub, cmd.get_command(sub, name), f"{path} {name}", out)


def _fields(model: type[BaseModel], instance: Any, prefix: str, rows: list[str]) -> None:
    for name, f in model.model_fields.items():
        if instance is None and f.is_required():
            rows.append(f"| `{prefix}{name}` | (required) | {_cell(f.description or '')} |")
            continue
        value = getattr(instance, name) if instance is not None else f.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            _fields(type(value), value, f"{prefix}{name}.", rows)
            continue
        shown = "" if value is None or value == {} or value == [] else repr(value)
        rows.append(f"| `{prefix}{name}` | {_code(shown) if shown else ''} | {_cell(f.description or '')} |")


def render() -> str:
    from flows.cli import app
    from flows.configs import CONFIGS

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="cai")
    out = ["# CLI reference", "",
           "Generated from the code by `python -m flows.cli.docgen`; do not edit by hand "
           "(`tests/test_docs.py` fails when this page is out of date).", "",
           "Every stage command also takes `--config FILE` (YAML), repeated `--set key=value` (dotted keys for "
           "nested settings) and `--show-config`; precedence is file < `--set` < flags. The settings each one "
           "accepts are listed under [Settings](#settings).", ""]
    _command(ctx, root, "cai", out)
    out += ["# Settings", "",
            "The fields `--config FILE` and `--set key=value` accept, per stage, with their defaults "
            "(`flows/configs.py`).", ""]
    for stage, model in CONFIGS.items():
        out += [f"## {stage}: `{model.__name__}`", ""]
        if model.__doc__:
            out += [" ".join(model.__doc__.split()), ""]
        out += ["| setting | default | what it does |", "|---|---|---|"]
        _fields(model, None, "", out)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT}: out of date with the CLI; run `python -m flows.cli.docgen`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
