"""What every `cai` command shares: the consoles, one-line errors with exit code 2, sessions."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    # escape: a message like "method in [revision, ai]" must not be read as rich markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_writable(path, flag: str = "--out") -> None:
    """Fail now, before any work, if the directory `path` cannot be created or written to.

    A write probe rather than os.access: root passes os.access everywhere, yet a read-only
    filesystem or /proc still refuses it.
    """
    import tempfile
    from pathlib import Path

    from flows.common import UserError

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is a file, not a directory; choose a directory")
    base = path.absolute()
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, so no directory can be made under it; "
                        "choose another directory")
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".cai-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in {base} ({exc.strerror or exc.__class__.__name__}); "
                        "choose another directory") from None


def _session():
    from store.db import DatabaseError, session_scope

    try:
        return session_scope()
    except DatabaseError as exc:
        fail(str(exc))


def _ours(exc: BaseException) -> bool:
    from flows.common import ours

    return ours(exc)


def guarded(fn):
    """Turn the errors a user can act on into one line and exit code 2, whether they are raised
    before a flow starts or inside one of its tasks (the flow call re-raises the task's error;
    Prefect's log of it keeps one line, without the traceback: the filter flows/common.py
    installs when a flow module is imported)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:  # a setting the config models reject, e.g. --label-source foo
            fail("invalid setting: " + "; ".join(map(_problem, exc.errors())))
        except Exception as exc:
            if not _ours(exc):
                raise
            fail(str(exc))

    return wrapper


def _problem(e: dict) -> str:
    """One pydantic error as `field.path: what is wrong (got value)`, on one line."""
    where = ".".join(map(str, e["loc"]))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown setting (check the spelling; --show-config lists them all)"
    if e["type"] == "missing":
        return f"{where}: required (pass --{where.replace('_', '-')} or --set {where}=...)"
    if not where:  # a check across fields: the message names them
        return msg
    return f"{where}: {msg} (got {e.get('input')!r})"
