"""What every `cai` command shares: the consoles, one-line errors with exit code 2, sessions,
comma-separated lists and the model check before any work."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    from constitution.load import one_line

    # escape: a message like "method in [revision, ai]" must not be read as rich markup; one_line: a
    # line break from the input (a --set key, a file's text) is written as an escape, so one line
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
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


def split_commas(values: list[str]) -> list[str]:
    """`--prompts a,b --prompts c` -> [a, b, c]."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def preflight_model(spec: str, engine=None) -> None:
    """Fail before any work when a local model path is wrong, or a hub id can be neither
    downloaded nor found in the cache (seconds, not a minute of download retries). A model a
    remote endpoint serves (`engine`: backend openai, or a base_url) is a name only it knows."""
    from engines.bundled import ALIASES, resolve
    from flows.engine_cache import is_loaded

    if engine is not None and (engine.backend == "openai" or engine.settings.get("base_url")):
        return
    if spec.lower() not in ALIASES and not is_loaded(spec):
        resolve(spec)


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

        from cai.errors import invalid_settings

        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:  # a setting the config models reject, e.g. --label-source foo
            fail(invalid_settings(exc.errors()))
        except Exception as exc:
            if not _ours(exc):
                raise
            fail(str(exc))

    return wrapper

