"""The engine cache: one loaded engine per process and settings, which every flow's tasks share.

    engine = cached_engine("smollm2-135m", "hf", device="cpu")   # loaded once, reused by later tasks
    register_engine("scripted", fake)                            # tests plug in scripted engines

Tasks take configs, never models: they call `cached_engine` with their config's model and engine
settings, and the first call loads. `engine_facts` and `machine_facts` say what a run computed on.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from cai.errors import UserError
from engines.bundled import DEFAULT_SPEC
from flows.common import run_logger

_ENGINES: dict[tuple, Any] = {}
_ENGINE_LOCK = threading.Lock()


def _engine_key(spec: str, backend: str, settings: dict[str, Any]) -> tuple:
    return spec, backend, tuple(sorted(settings.items()))


def cached_engine(spec: str, backend: str = "auto", *, job_tokens: int | None = None, job_scorings: int = 0,
                  **settings: Any):
    """Load an engine once per process: tasks call this instead of taking a model as input.

    job_tokens / job_scorings: the size of the job the first caller is about to run (new tokens
    at most, choice scorings), which `auto` weighs (engines.choose_backend); later calls reuse
    the engine whatever they pass."""
    key = _engine_key(spec, backend, settings)
    with _ENGINE_LOCK:
        if key not in _ENGINES:
            from engines import load

            t0 = time.perf_counter()
            job = {"job_tokens": job_tokens, "job_scorings": job_scorings} if backend == "auto" else {}
            try:
                _ENGINES[key] = load(spec, engine=backend, **job, **settings)
            except Exception as exc:  # noqa: BLE001 - one line a person can act on
                why = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if backend == "openai" or settings.get("base_url"):  # a remote endpoint: the message says what
                    err = UserError(f"engine openai for model {spec!r}: {why}")
                else:
                    err = UserError(f"cannot load model {spec!r} ({why}); pass a local HF directory, "
                                    f"a .gguf file, or `{DEFAULT_SPEC}` for the bundled model")
                # no item is at fault: the stage runner frees its claims and fails the run, charging no
                # item a failed attempt (which would quarantine every item after three runs)
                err.fatal = True  # type: ignore[attr-defined]
                raise err from exc
            facts = engine_facts(_ENGINES[key])
            run_logger().info("loaded %s in %.1fs: %s", spec, time.perf_counter() - t0,
                               ", ".join(f"{k} {v}" for k, v in facts.items()))
            if why := (getattr(getattr(_ENGINES[key], "stats", None), "extra", None) or {}).get("auto"):
                run_logger().info("engine auto chose %s: %s", facts["backend"], why)
        return _ENGINES[key]


def engine_facts(engine: Any) -> dict[str, Any]:
    """Backend, device and dtype of a loaded engine: what a run should record about how it computed."""
    extra = getattr(getattr(engine, "stats", None), "extra", None) or {}
    return {"backend": getattr(engine, "backend", "?")} | {k: extra[k] for k in ("device", "dtype") if k in extra}


def machine_facts() -> dict[str, Any]:
    """The CPU a run computed on, as a report should name it: bf16 kernels (AMX, AVX-512 BF16)
    round differently, so a bf16 figure belongs to its CPU."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    facts = {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def loaded_engine_facts(spec: str, backend: str = "auto", **settings: Any) -> dict[str, Any] | None:
    """engine_facts of the engine `cached_engine` holds for these arguments; None if never loaded."""
    with _ENGINE_LOCK:
        eng = _ENGINES.get(_engine_key(spec, backend, settings))
    return engine_facts(eng) if eng is not None else None


def register_engine(spec: str, engine: Any, backend: str = "auto", **settings: Any) -> None:
    """Make `cached_engine(spec, ...)` return `engine` (tests plug in scripted engines this way)."""
    with _ENGINE_LOCK:
        _ENGINES[_engine_key(spec, backend, settings)] = engine


def is_loaded(spec: str) -> bool:
    """Does this process hold an engine for `spec` already (loaded, or registered by a caller)?"""
    with _ENGINE_LOCK:
        return any(key[0] == spec for key in _ENGINES)


def drop_engines() -> None:
    with _ENGINE_LOCK:
        for eng in _ENGINES.values():
            try:
                eng.close()
            except Exception:  # noqa: BLE001
                pass
        _ENGINES.clear()
