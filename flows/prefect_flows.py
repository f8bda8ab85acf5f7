"""The stage flows as Prefect flows: what deployments, schedules and orchestrated runs execute.

    from flows.prefect_flows import generate_flow      # a prefect.Flow named "generate"

The stage modules (flows/generate.py, ...) hold plain functions and never import Prefect, so a
command that runs without a Prefect server (flows/orchestration.py) does not pay for importing
it. This module wraps each of them once, with the options its `@stage_flow` names. A work-pool
deployment names its flow by module path (`flows.prefect_flows.generate_flow`), and a
`prefect worker` on any machine with the project installed imports it from here.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

from prefect import flow

from flows import contrast, evaluate, export, generate, label, pipeline, redteam, report, reward, train

STAGE_FLOWS: tuple[Callable[..., Any], ...] = (
    generate.generate_flow, contrast.contrast_flow, label.label_flow, train.train_flow, reward.reward_flow,
    export.export_flow, evaluate.eval_flow, report.report_flow, redteam.redteam_flow, pipeline.pipeline_flow,
)


def _prefect_flow(fn: Callable[..., Any]):
    def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    functools.update_wrapper(run, fn)  # name, docstring, annotations
    run.__module__, run.__qualname__ = __name__, fn.__name__  # the entrypoint workers import
    # the parameter schema, with the config classes themselves rather than the strings
    # `from __future__ import annotations` leaves: a worker validates a run's parameters against it
    # in a fresh process, where "GenerateConfig" would resolve against this module and fail
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    run.__annotations__ = typing.get_type_hints(fn)
    del run.__wrapped__  # type: ignore[attr-defined]
    return flow(**fn.flow_options)(run)


for _fn in STAGE_FLOWS:
    globals()[_fn.__name__] = _prefect_flow(_fn)
