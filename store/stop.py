"""Stopping on SIGTERM or Ctrl-C within seconds, at a point where nothing is half-written.

    from store import stop
    stop.install()                   # `cai` does this at start
    with stop.critical():            # a file swap, a multi-step write: the signal waits for it
        ...

A process manager stops a command with SIGTERM, a person with Ctrl-C. The first signal raises
`StopRequested` in the main thread at the next Python instruction, so a stage ends between two
tensor operations, not at the end of a long step. That is safe for the store: every batch of a
stage commits in one transaction (an exception rolls it back and the rerun computes the batch
again, keyed by content, so nothing is doubled). The few places that are not safe to leave
half-way (swapping an output directory into place) run under `critical()`, which holds the
signal until they finish. A second signal while stopping exits at once.

The Run row of an interrupted flow gets status `stopped` (store.runs.recorded_run), its
TrainingRun too; the command exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """Raised by the first SIGTERM/SIGINT. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"critical": 0, "pending": None, "stopping": False}
_lock = threading.Lock()


def _handler(signum: int, frame) -> None:
    if _state["stopping"]:  # the second signal: no more waiting
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _state["stopping"] = True
    if _state["critical"]:
        _state["pending"] = signum
        return
    raise StopRequested(signum)


def install() -> None:
    """Handle SIGTERM and SIGINT this way (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)


def reset() -> None:
    """Forget a stop (tests that send signals to their own process)."""
    _state.update(critical=0, pending=None, stopping=False)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold a stop signal until the block has finished; then raise it."""
    with _lock:
        _state["critical"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["critical"] -= 1
            pending = _state["pending"] if _state["critical"] == 0 else None
            if pending is not None:
                _state["pending"] = None
        if pending is not None:
            raise StopRequested(pending)


def is_stop(exc: BaseException) -> bool:
    """A stop by signal: ours, Ctrl-C before our handler was installed, or Prefect's bridge of
    SIGTERM inside a flow run (prefect.exceptions.TerminationSignal)."""
    if isinstance(exc, StopRequested | KeyboardInterrupt):
        return True
    return type(exc).__name__ == "TerminationSignal" and hasattr(exc, "signal")
