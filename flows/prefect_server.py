"""The Prefect server that `cai schedule`, `cai deploy` and `cai submit` (flows/schedule.py) talk to:
whether one is reachable, the names and cron expressions it takes, its work pools, its runs' states.

    url = check_server()                      # a UserError naming PREFECT_API_URL when none answers
    created = ensure_pool("cai")              # a process work pool, made when missing
    states = wait_runs(run_ids, timeout_s=600)

Names and cron expressions are checked before the server is asked anything (`check_name`,
`check_cron`); what a person can get wrong becomes one line (exit 2), not a Prefect traceback or
a setting Prefect rejects later.
"""

from __future__ import annotations

import os

from flows.common import UserError


def check_server() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        try:
            from prefect.settings import PREFECT_API_URL

            url = PREFECT_API_URL.value()
        except Exception:  # noqa: BLE001
            url = None
    if not url:
        raise UserError("schedules need a running Prefect server: start one with `prefect server start` "
                        "and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    import httpx

    try:
        # any HTTP answer means a server is there (Prefect Cloud may answer 401/404 on /health);
        # only a connection that fails is "unreachable"
        httpx.get(url.rstrip("/") + "/health", timeout=10)
    except httpx.TransportError as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"cannot reach the Prefect server at PREFECT_API_URL={url} ({exc.__class__.__name__}: "
                        f"{detail}); start one with `prefect server start`, or fix PREFECT_API_URL") from None
    return url


def check_name(value: str, flag: str) -> str:
    """A deployment or work-pool name Prefect will take, checked before the server is asked
    anything (Prefect's own check came after the pool was created, as an "invalid setting")."""
    from prefect.types.names import BANNED_CHARACTERS

    bad = sorted({ch for ch in value if ch in BANNED_CHARACTERS})
    if not value.strip("' \""):
        raise UserError(f"{flag} {value!r}: empty; give a name")
    if bad or any(ch in value for ch in "\n\r\x00"):
        shown = " ".join(bad) or "a line break or NUL"
        raise UserError(f"{flag} {value!r}: a Prefect name cannot contain {shown} (nor any of "
                        f"{' '.join(BANNED_CHARACTERS)}); e.g. {flag} nightly-harmless")
    return value


def check_cron(cron: str | None) -> None:
    if cron is None:
        return
    try:
        from prefect.client.schemas.schedules import construct_schedule

        construct_schedule(cron=cron)
    except Exception as exc:  # noqa: BLE001
        errors = getattr(exc, "errors", None)
        why = errors()[0]["msg"].removeprefix("Value error, ") if callable(errors) else str(exc).splitlines()[0]
        raise UserError(f"--cron {cron!r} is not a valid cron expression ({why})") from None


def ensure_pool(pool: str, pool_type: str = "process") -> bool:
    """Create the work pool with its type's default job template if it is missing; True if created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.base import BaseWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            pass
        worker_cls = BaseWorker.get_worker_class_from_type(pool_type)
        if worker_cls is None:
            raise UserError(f"--pool-type {pool_type!r}: no worker of that type is installed here (process is "
                            f"built in); create the pool yourself with `prefect work-pool create {pool} --type ...`")
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type,
                                                   base_job_template=worker_cls.get_default_base_job_template()))
        except ObjectAlreadyExists:  # another `cai deploy` made it meanwhile
            return False
    return True


def wait_runs(run_ids: list[str], timeout_s: float | None = None, poll_s: float = 2.0) -> dict[str, str]:
    """Poll until every run is in a final state (or timeout); returns run id -> state type."""
    import time

    from prefect import get_client

    end = None if timeout_s is None else time.monotonic() + timeout_s
    states: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while True:
            for rid in run_ids:
                st = client.read_flow_run(rid).state
                states[rid] = st.type.value if st else "UNKNOWN"
            if all(s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()):
                return states
            if end is not None and time.monotonic() > end:
                return states
            time.sleep(poll_s)
