"""Where `cai` starts and ends: process settings, stop signals, the stages' log lines, the exit code.

    cai ...                  # pyproject's entry point: flows.cli:main
    python -m flows.cli ...  # the same (flows/cli/__main__.py)
"""

from __future__ import annotations

import sys

from rich.markup import escape

from flows.cli.common import err


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


def _log_to_terminal() -> None:
    """Without Prefect (flows/orchestration.py) nobody prints the stages' log lines: show them as
    Prefect's console would (time, level, logger, message) on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
                                           datefmt="%H:%M:%S"))
    for name in ("cai",):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def main() -> None:
    from flows.cli import app

    process_defaults()
    from store import stop

    stop.install()  # SIGTERM / Ctrl-C: stop at the next instruction, keep what is stored
    _log_to_terminal()
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:  # typer ends every command this way
        code = exc.code
    except BaseException as exc:
        if not stop.is_stop(exc):
            raise
        signum = getattr(exc, "signum", None) or getattr(exc, "signal", None) or 2
        err.print(f"[yellow]stopped[/] ({escape(str(exc) or exc.__class__.__name__)}): every row already "
                  "written is kept; run the same command again to continue where it stopped", highlight=False)
        code = 128 + int(signum)
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Exit without the interpreter's teardown when nothing needs it: with torch and transformers
    loaded, garbage-collecting every module at exit takes seconds, after the work is done. Every
    file and transaction is closed by then; Prefect's API log worker is the one thing that must
    drain at exit, so a run through Prefect exits normally."""
    import os

    from flows.orchestration import wanted

    if isinstance(code, str):
        err.print(code, highlight=False, markup=False)
        code = 1
    if wanted():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
