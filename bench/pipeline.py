"""How much time the generate flow spends outside the engine.

    python -m bench.pipeline [--limit N] [--rounds R] [--max-new-tokens T]

Runs the SL-CAI flow on the bundled red-team prompts with the default model against a fresh
temporary SQLite store, and prints one JSON line: engine_s (time inside engine.generate),
total_s (the whole flow, stage bookkeeping, claims, writes and Prefect tasks included) and
overhead = (total - engine) / engine. Model loading is excluded from both.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    from engines.bundled import DEFAULT_SPEC

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_SPEC)
    ap.add_argument("--limit", type=int, default=None, help="first N prompts (default: all)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="cai-bench-")
    os.environ.setdefault("PREFECT_HOME", os.path.join(tmp, "prefect"))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(tmp, "prefect", "results"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["CAI_DATABASE_URL"] = f"sqlite:///{tmp}/bench.db"

    from flows.generate import GenerateConfig, SamplingConfig, generate_flow

    s = SamplingConfig(max_new_tokens=args.max_new_tokens)
    cfg = GenerateConfig(model=args.model, prompts=["red-team"], limit=args.limit, rounds=args.rounds,
                         initial=s, critique=s, revision=s, runner={"show_progress": False})
    t0 = time.perf_counter()
    summary = generate_flow(cfg)
    wall = time.perf_counter() - t0
    engine_s, total_s = summary["engine_s"], summary["total_s"]
    print(json.dumps({
        "bench": "pipeline", "model": args.model, "prompts": summary["prompts"], "rounds": args.rounds,
        "max_new_tokens": args.max_new_tokens, "rows": summary["computed"], "tokens": summary["tokens"],
        "engine_s": round(engine_s, 2), "total_s": round(total_s, 2),
        "overhead": round((total_s - engine_s) / engine_s, 4) if engine_s else None,
        "load_s": summary["load_s"], "wall_s_with_prefect_startup": round(wall, 2),
    }))


if __name__ == "__main__":
    main()
