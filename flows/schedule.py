"""Deployments: served by this process (`cai schedule`), or on a work pool for workers anywhere (`cai deploy`).

    prefect server start                       # in another terminal; UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    cai schedule generate --cron "0 3 * * *" --constitution harmless --prompts red-team

    cai deploy generate --pool cai --name nightly --set limit=200      # the pool is created if missing
    prefect worker start --pool cai --limit 1                           # on every machine (CAI_DATABASE_URL set)
    cai submit generate/nightly --shards 4                              # 4 runs that split the work

`serve` polls for scheduled runs and runs each in this process. A work-pool deployment names its
flow by module path (`flows.prefect_flows.generate_flow`), so a `prefect worker` on any machine where
the project is installed imports it; the K runs of `cai submit` are identical and share the
pending items through the store's claims (store/work.py). Watch them in the UI under Deployments.
What the server is asked besides (is it there, its names, cron, pools, run states) is
flows/prefect_server.py.
"""

from __future__ import annotations

import importlib
from typing import Any

from flows.common import UserError
from flows.prefect_server import check_cron, check_name, check_server, ensure_pool

# flow name -> (module, flow object, config class); each flow takes one typed config `cfg`
FLOWS: dict[str, tuple[str, str, str]] = {
    "generate": ("flows.prefect_flows", "generate_flow", "GenerateConfig"),
    "contrast": ("flows.prefect_flows", "contrast_flow", "ContrastConfig"),
    "label": ("flows.prefect_flows", "label_flow", "LabelConfig"),
    "redteam": ("flows.prefect_flows", "redteam_flow", "RedteamConfig"),
    "train": ("flows.prefect_flows", "train_flow", "TrainConfig"),
    "reward-train": ("flows.prefect_flows", "reward_flow", "RewardTrainConfig"),
    "export": ("flows.prefect_flows", "export_flow", "ExportConfig"),
    "eval": ("flows.prefect_flows", "eval_flow", "EvalConfig"),
    "report": ("flows.prefect_flows", "report_flow", "ReportConfig"),
    "run": ("flows.prefect_flows", "pipeline_flow", "PipelineConfig"),
}
# `cai reward score` is no flow (it prints scores or writes a file, and records no run): not deployable


# flows whose pending items are claimed through the store (store/work.py): only these can run as K
# copies at once; two trainings or exports would write one output directory together
CLAIMED = ("generate", "label", "eval")


def _check_shards(flow_name: str | None, shards: int, deployment: str) -> None:
    known = {"pipeline": "run"}.get(flow_name, flow_name)
    if shards > 1 and known in FLOWS and known not in CLAIMED:
        raise UserError(f"--shards {shards}: {deployment} runs the {known} flow, which claims no work, so {shards} "
                        f"runs would do the same work into one output at once; submit it with --shards 1 (only "
                        f"{', '.join(CLAIMED)} split their work)")


def resolve_flow(name: str):
    if name not in FLOWS:
        raise UserError(f"cannot schedule {name!r}: choose one of {', '.join(FLOWS)}")
    module, flow_attr, cfg_attr = FLOWS[name]
    try:
        mod = importlib.import_module(module)
        return getattr(mod, flow_attr), getattr(importlib.import_module("flows.configs"), cfg_attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"flow {name!r} is not available in this install ({exc})") from None


def check_settings(flow_name: str, params: dict[str, Any]):
    """The flow's typed config for these settings (flows/configs.py, no Prefect import); unknown
    keys and bad values raise pydantic's ValidationError, which `cai` prints as one line."""
    from flows.configs import CONFIGS

    if flow_name not in FLOWS:
        raise UserError(f"cannot schedule {flow_name!r}: choose one of {', '.join(FLOWS)}")
    cfg = CONFIGS[flow_name].model_validate(params)
    refuse_secrets(cfg.model_dump(mode="json"))
    return cfg


def refuse_secrets(params: dict[str, Any]) -> None:
    """A deployment's parameters are stored on the Prefect server and shown in its UI: no password
    goes there. Workers read the store's URL from their own CAI_DATABASE_URL."""
    from store.db import has_secret

    for key, value in params.items():
        if has_secret(value):
            raise UserError(f"{key}: holds a password, which would be stored on the Prefect server in the "
                            "deployment's parameters; drop it and set CAI_DATABASE_URL on the workers instead")


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
    check_cron(cron)
    dep_name = check_name(name or deployment_name(flow_name, params), "--name")
    url = check_server()
    flow_obj, _ = resolve_flow(flow_name)
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


# --- work-pool deployments: `cai deploy`, `cai submit` -------------------------------------------

FLOW_TAG = "cai-flow:"  # a deployment's tag naming its cai flow, so `cai submit` can check settings


def deploy(flow_name: str, pool: str, params: dict[str, Any], *, name: str | None = None, cron: str | None = None,
           job_variables: dict[str, Any] | None = None, pool_type: str = "process") -> dict[str, Any]:
    """Register a deployment of `flow_name` on work pool `pool` (created if missing); returns what was made.

    Settings and cron are checked before the server is asked anything. The flow is named by module path,
    so workers need the project installed (or on PYTHONPATH), not this checkout. `working_dir` defaults to
    this directory: relative output paths (train's runs/, export's exports/) land there, not in a
    temporary directory the worker deletes; give `-j working_dir=...` where workers keep their data.
    """
    import inspect
    import typing
    from pathlib import Path

    cfg = check_settings(flow_name, params)
    check_cron(cron)
    dep_name = check_name(name or deployment_name(flow_name, params), "--name")
    check_name(pool, "--pool")
    url = check_server()
    flow_obj, _ = resolve_flow(flow_name)
    created = ensure_pool(pool, pool_type)
    from prefect.deployments.runner import EntrypointType

    # the parameter schema is built from the annotations; resolved here, they are classes, not strings
    flow_obj.fn.__annotations__ = typing.get_type_hints(flow_obj.fn)
    param = next(iter(inspect.signature(flow_obj.fn).parameters))
    variables = {"working_dir": str(Path.cwd())} | (job_variables or {})
    # flow.deploy() would do the same, but Prefect 3.8.8's first asks the server for the pool's workers
    # with limit=null, which its own server answers 422; to_deployment + apply skip that query
    runner_dep = flow_obj.to_deployment(name=dep_name, cron=cron, parameters={param: cfg.model_dump(mode="json")},
                                        work_pool_name=pool, job_variables=variables,
                                        tags=["cai", FLOW_TAG + flow_name], entrypoint_type=EntrypointType.MODULE_PATH)
    dep_id = runner_dep.apply(work_pool_name=pool)
    return {"deployment": f"{flow_obj.name}/{dep_name}", "id": str(dep_id), "pool": pool, "pool_created": created,
            "cron": cron, "job_variables": variables, "api": url}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _full_name(dep: Any) -> str:
    """FLOW/NAME of a deployment made by `cai deploy` (its tag names the cai flow), else its name."""
    key = next((t.removeprefix(FLOW_TAG) for t in dep.tags if t.startswith(FLOW_TAG)), None)
    return f"{ {'run': 'pipeline'}.get(key, key)}/{dep.name}" if key else dep.name


def submit(deployment: str, shards: int = 1, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Create `shards` flow runs of `deployment` ("flow/name"), each with the same settings.

    They are K identical runs, not K disjoint slices: each run computes whatever is still pending and
    claims it chunk by chunk, so a fast machine takes more, later stages (which only exist once
    earlier ones ran) split as well, and a run that dies leaves its items to the others once its
    lease ends, instead of a slice nobody does. `overrides` (from --set) change these runs only.
    """
    if shards < 1:
        raise UserError(f"--shards {shards}: expected 1 or more")
    if "/" not in deployment:
        raise UserError(f"deployment {deployment!r}: expected FLOW/NAME as `cai deploy` printed it, "
                        "e.g. generate/nightly")
    _check_shards(deployment.split("/", 1)[0], shards, deployment)  # FLOW/NAME as `cai deploy` printed it
    check_server()
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            from prefect.client.schemas.sorting import DeploymentSort

            # sort given: Prefect 3.8.8's server answers 422 to the client's default sort=null
            known = sorted(_full_name(d) for d in client.read_deployments(limit=50, sort=DeploymentSort.NAME_ASC))
            raise UserError(f"no deployment {deployment!r} on the Prefect server (deployments: "
                            f"{', '.join(known) or 'none'}; make one with `cai deploy FLOW --pool NAME`)") from None
        flow_name = next((t.removeprefix(FLOW_TAG) for t in dep.tags if t.startswith(FLOW_TAG)), None)
        _check_shards(flow_name, shards, deployment)  # the flow its tag names, whatever the deployment is called
        params = dict(dep.parameters or {})
        if flow_name in FLOWS and len(params) == 1:
            (param, base), = params.items()
            cfg = check_settings(flow_name, _merge(base or {}, overrides or {}))
            params = {param: cfg.model_dump(mode="json")}
        elif overrides:
            raise UserError(f"deployment {deployment!r} was not made by `cai deploy`: --set cannot be checked; "
                            "submit it without --set")
        runs = []
        for i in range(shards):
            fr = client.create_flow_run_from_deployment(dep.id, parameters=params,
                                                        tags=["cai", f"shard-{i + 1}-of-{shards}"])
            runs.append({"id": str(fr.id), "name": fr.name, "state": fr.state.type.value if fr.state else None})
    return runs
