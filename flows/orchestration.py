"""Whether a command runs through Prefect, and the one place that decides it.

    from flows.orchestration import run_flow, stage_task
    summary = run_flow(generate_flow, cfg)     # what every `cai` stage command calls

A flow needs Prefect for what Prefect adds: a server that records and shows runs, schedules,
deployments, workers. Without `PREFECT_API_URL`, Prefect starts a temporary server for every
command (6-12 s on a 2-core CPU, ~200 MB, a port), and that is the whole cost of a small
command. So the mode follows `CAI_PREFECT`:

- `auto` (default): through Prefect when `PREFECT_API_URL` names a server; otherwise the flow
  and its tasks run as plain functions in this process (no server, same store rows: every
  flow's Run row comes from `store.runs.recorded_run`, not from Prefect);
- `always`: through Prefect; with no server named, a temporary one this process starts and
  that dies with it (Linux `PR_SET_PDEATHSIG`: a `kill -9` of the command leaves no server);
- `never`: plain functions even when a server is named.

Tasks follow their flow: inside a Prefect flow run they are Prefect tasks, in a plain call the
plain function. Deployments and schedules always run flows through Prefect (`cai deploy`,
`cai schedule`, `prefect worker`): their processes get `PREFECT_API_URL` from Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

MODES = ("auto", "always", "never")


def mode() -> str:
    value = os.environ.get("CAI_PREFECT", "auto").strip().lower() or "auto"
    if value not in MODES:
        from cai.errors import UserError

        raise UserError(f"CAI_PREFECT={value!r}: expected one of {', '.join(MODES)}")
    return value


def wanted() -> bool:
    """Should a command run its flow through Prefect?"""
    m = mode()
    return m == "always" or (m == "auto" and bool(os.environ.get("PREFECT_API_URL")))


def in_flow_run() -> bool:
    """Is this code running inside a Prefect flow run (so a task call is a Prefect task run)?"""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def stage_flow(name: str, **options: Any) -> Callable[[Callable], Callable]:
    """Mark a plain function as the stage flow `name`; flows/prefect_flows.py makes its Prefect
    flow (what deployments, schedules and orchestrated runs use) with these options."""
    def mark(fn: Callable) -> Callable:
        fn.flow_options = {"name": name, **options}  # type: ignore[attr-defined]
        return fn

    return mark


def stage_task(**options: Any) -> Callable[[Callable], Callable]:
    """A flow's task: a Prefect task when its flow runs through Prefect, else the plain function.
    The Prefect task is made on first use, so a plain run never imports Prefect."""
    def wrap(fn: Callable) -> Callable:
        made: list[Any] = []

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not in_flow_run():
                return fn(*args, **kwargs)
            if not made:
                from prefect import task
                from prefect.cache_policies import NO_CACHE

                # configs and run ids as inputs: a cached result would skip work the store says is missing
                made.append(task(**({"cache_policy": NO_CACHE} | options))(fn))
            return made[0](*args, **kwargs)

        call.fn = fn  # type: ignore[attr-defined]
        return call

    return wrap


def as_prefect(fn: Callable) -> Any:
    """The Prefect flow of a stage flow function (flows/prefect_flows.py)."""
    from flows import prefect_flows

    return getattr(prefect_flows, fn.__name__)


def run_flow(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a stage flow the way this process should: as a subflow inside a flow run, through
    Prefect when wanted (starting a temporary server that dies with this process if none is
    named), else as the plain function."""
    if in_flow_run():
        return as_prefect(fn)(*args, **kwargs)
    if not wanted():
        return fn(*args, **kwargs)
    with _url_from_environment(args) as args:
        if os.environ.get("PREFECT_API_URL"):
            return as_prefect(fn)(*args, **kwargs)
        with temporary_server() as url:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: url}):
                return as_prefect(fn)(*args, **kwargs)


@contextlib.contextmanager
def _url_from_environment(args: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
    """A flow run's parameters are stored on the Prefect server: a config whose `database_url` holds
    a password goes there without it, and the flow (in this process) reads the URL from
    CAI_DATABASE_URL, set here for the run's duration."""
    from store.db import has_secret

    url = next((a.database_url for a in args if has_secret(getattr(a, "database_url", None))), None)
    if url is None:
        yield args
        return
    before = os.environ.get("CAI_DATABASE_URL")
    os.environ["CAI_DATABASE_URL"] = url
    try:
        yield tuple(a.model_copy(update={"database_url": None}) if getattr(a, "database_url", None) == url else a
                    for a in args)
    finally:
        if before is None:
            os.environ.pop("CAI_DATABASE_URL", None)
        else:
            os.environ["CAI_DATABASE_URL"] = before


# --- a temporary Prefect server that cannot outlive this process ---------------------------

def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent (a forked child of a threaded process should not load
    libraries); None off Linux, where the server is stopped on a normal exit only."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(parent: int, prctl: Callable[..., int] | None) -> None:  # pragma: no cover - in the child
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when the parent dies
        if os.getppid() != parent:  # it died between fork and prctl: no signal would ever come
            os._exit(1)
    os.setpgrp()  # a Ctrl-C in the terminal goes to the command, which stops the server itself


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int) -> list[str]:
    """The command Prefect itself uses for its temporary server (no UI, errors only)."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


@contextlib.contextmanager
def temporary_server(timeout_s: float | None = None) -> Iterator[str]:
    """Start a Prefect server for this process (API URL yielded), stop it on the way out; if this
    process is killed, the kernel kills the server too."""
    import httpx

    timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    log = logging.getLogger("cai")
    log.info("starting a temporary Prefect server on 127.0.0.1:%d (it stops with this command)", port)
    die_with_us = functools.partial(_die_with_parent, os.getpid(), _prctl())
    proc = subprocess.Popen(server_command(port), env=env, preexec_fn=die_with_us,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout_s
        with httpx.Client() as client:
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
                    raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode}"
                                       + (f": {err[-1]}" if err else ""))
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
