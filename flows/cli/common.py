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
        from pydantic import ValidationError

        from constitution.load import ConstitutionError
        from engines.bundled import ModelNotFound
        from flows.common import UserError
        from store.db import DatabaseError

        try:
            return fn(*args, **kwargs)
        except (UserError, DatabaseError, ConstitutionError, ModelNotFound, LookupError) as exc:
            msg = exc.args[0] if isinstance(exc, LookupError) and exc.args else str(exc)
            fail(msg)
        except ValidationError as exc:  # a setting the config models reject, e.g. --label-source foo
            fail("invalid setting: " + "; ".join(map(_problem, exc.errors())))

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
