"""Schedules: a Prefect deployment with a cron schedule, served by this process.

    prefect server start                       # in another terminal; UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    cai schedule generate --cron "0 3 * * *" --constitution harmless --prompts red-team

Prefect creates the scheduled flow runs on its server; `serve` polls for them and runs each
in this process. Watch them in the UI under Deployments -> <flow>/<name> -> Runs.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from flows.common import UserError

# flow name -> (module, flow object, config class); each flow takes one typed config `cfg`
FLOWS: dict[str, tuple[str, str, str]] = {
    "generate": ("flows.generate", "generate_flow", "GenerateConfig"),
    "label": ("flows.label", "label_flow", "LabelConfig"),
    "train": ("flows.train", "train_flow", "TrainConfig"),
    "export": ("flows.export", "export_flow", "ExportConfig"),
    "run": ("flows.pipeline", "pipeline_flow", "PipelineConfig"),
}


def resolve_flow(name: str):
    if name not in FLOWS:
        raise UserError(f"cannot schedule {name!r}: choose one of {', '.join(FLOWS)}")
    module, flow_attr, cfg_attr = FLOWS[name]
    try:
        mod = importlib.import_module(module)
        return getattr(mod, flow_attr), getattr(mod, cfg_attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"flow {name!r} is not available in this install ({exc})") from None


def check_settings(flow_name: str, params: dict[str, Any]):
    """The flow's typed config for these settings (flows/configs.py, no Prefect import); unknown
    keys and bad values raise pydantic's ValidationError, which `cai` prints as one line."""
    from flows.configs import CONFIGS

    if flow_name not in FLOWS:
        raise UserError(f"cannot schedule {flow_name!r}: choose one of {', '.join(FLOWS)}")
    return CONFIGS[flow_name].model_validate(params)


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


def deployment_name(flow_name: str, params: dict[str, Any]) -> str:
    bits = [flow_name, str(params.get("constitution", "")), ",".join(params.get("prompts", []) or [])]
    return "-".join(b for b in bits if b).replace("@", "-").replace("/", "-")[:60]


def serve_schedule(flow_name: str, cron: str, params: dict[str, Any], name: str | None = None,
                   limit: int | None = None) -> None:
    """Create (or update) the deployment with this cron schedule and serve it; blocks.

    The settings and the cron expression are checked before the server is asked anything, so a
    typo fails here with exit 2 rather than in the first scheduled run.
    """
    cfg = check_settings(flow_name, params)
    try:
        from prefect.client.schemas.schedules import construct_schedule

        construct_schedule(cron=cron)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--cron {cron!r} is not a valid cron expression ({exc})") from None
    url = check_server()
    flow_obj, _ = resolve_flow(flow_name)
    dep_name = name or deployment_name(flow_name, params)
    print(f"serving deployment {flow_obj.name}/{dep_name} on {cron!r} against {url}", flush=True)
    import inspect
    import typing

    # Prefect runs each served flow run in a spawned process and validates its parameters there
    # against the function's annotations. Under `from __future__ import annotations` those are
    # strings ("GenerateConfig") that the copy sent to that process cannot resolve, and every
    # scheduled run failed "Generate_FlowModel is not fully defined". Resolved here, they are classes.
    flow_obj.fn.__annotations__ = typing.get_type_hints(flow_obj.fn)
    # every flow takes its one typed config as its first parameter (named cfg or config)
    param = next(iter(inspect.signature(flow_obj.fn).parameters))
    flow_obj.serve(name=dep_name, cron=cron, parameters={param: cfg.model_dump(mode="json")}, limit=limit,
                   print_starting_message=True)
