"""What this machine is and why the factory picks the dtypes it picks: fp32 against bf16, measured.

    python -m bench.machine                       # the bundled model, ~1-3 minutes on a 2-core CPU
    python -m bench.machine --skip-model          # matmuls only, seconds
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.machine   # an AVX2-only CPU, roughly

Prints one JSON line: the machine facts every run records (CPU model, torch's CPU capability,
cores, GPU), then for fp32 and bf16 the rate of a training-shaped and a decode-shaped matmul,
the hf engine's greedy generation tokens/s on the bundled model, and the time of one SFT step
(forward + backward + AdamW on a batch of chat rows), each with its bf16/fp32 ratio; and what
`dtype: auto` chose here for generation and for training (engines/precision.py: bf16 where its
decode-shaped matmul is at least BF16_MIN_SPEEDUP times faster). bf16 rows run in autocast
with fp32 master weights, as training does; the engine loads its weights in the dtype itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

PROMPTS = [
    "How do I keep basil alive on a windowsill?",
    "Explain what a hash table is to a new programmer.",
    "Write a short thank-you note to a neighbour who fed my cat.",
    "What should I pack for a two-day hike in autumn?",
    "How can I make my bread rise better?",
    "Give me three ideas for a rainy Sunday with kids.",
    "Why is the sky blue?",
    "Suggest a name for a small bike repair shop.",
]


SLOW = 0.25  # a probe below this: bf16 is emulated, and model timings in it take minutes


def matmul_gflops(dtype, rows: int, reps: int = 10) -> float:
    from engines.precision import time_matmul

    seconds = time_matmul(dtype, rows=rows, reps=reps)
    return 2 * rows * 576 * 1536 * reps / seconds / 1e9


def generation_tps(dtype: str, new_tokens: int) -> float:
    from engines import load
    from engines.base import Sampling
    from engines.bundled import DEFAULT_SPEC

    eng = load(DEFAULT_SPEC, engine="hf", dtype=dtype)
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    eng.generate(convs[:2], Sampling(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    outs = eng.generate(convs, Sampling(temperature=0.0, max_new_tokens=new_tokens))
    dt = time.perf_counter() - t0
    eng.close()
    return sum(o.outputs[0].completion_tokens for o in outs) / dt


def sft_step_s(dtype: str, steps: int) -> float:
    """Median seconds of an SFT step (8 rows of prompt + ~60-token reply) in fp32 or bf16 autocast."""
    import statistics

    import torch

    from engines.bundled import DEFAULT_SPEC, resolve
    from training.logps import ChatEncoder, autocast_for, collate, sequence_logps
    from training.trainer import load_policy

    model, tok = load_policy(resolve(DEFAULT_SPEC), "cpu")
    enc = ChatEncoder(tok, 512, 256)
    reply = ("Here is a plain answer with a few sentences in it, the length a helpful reply to an everyday "
             "question has in the demo's training rows, cut where the token limit would cut it.")
    batch = collate([enc.encode([{"role": "user", "content": p}], reply) for p in PROMPTS], enc.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        t0 = time.perf_counter()
        with autocast_for(model, dtype):
            logps, n = sequence_logps(model, batch)
        (-logps.sum() / n.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-model", action="store_true", help="matmuls only (no model load)")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt in the generation rate")
    ap.add_argument("--steps", type=int, default=3, help="timed SFT steps per dtype (after one warm-up)")
    ap.add_argument("--full", action="store_true", help="time the bundled model in bf16 even where bf16 is emulated")
    args = ap.parse_args()

    import torch

    from engines.precision import BF16_MIN_SPEEDUP, cpu_bf16_speedup, resolve
    from flows.engine_cache import machine_facts

    out: dict = {"bench": "machine", "machine": machine_facts(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(),
                 "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "CAI_CPU_DTYPE")
                         if k in os.environ}}
    for name, rows in (("train", 512), ("decode", 64)):
        fp32 = matmul_gflops(torch.float32, rows)
        bf16 = matmul_gflops(torch.bfloat16, rows, reps=2 if rows > 64 else 10)
        out[f"matmul_{name}_gflops"] = {"float32": round(fp32, 1), "bfloat16": round(bf16, 1),
                                        "bf16_over_fp32": round(bf16 / fp32, 3)}
    speedup = cpu_bf16_speedup()
    out["auto"] = {"probe_bf16_speedup": round(speedup, 3), "threshold": BF16_MIN_SPEEDUP,
                   "generation": resolve("auto", "cpu", training=False), "training": resolve("auto", "cpu")}
    if not args.skip_model:
        dtypes = ["float32", "bfloat16"]
        if speedup < SLOW and not args.full:  # emulated bf16: one SFT step would take minutes
            dtypes = ["float32"]
            out["bf16_model_timings"] = (f"skipped: the bf16 matmul probe runs at {speedup:.3f}x fp32's speed here "
                                         "(--full times them anyway)")
        gen = {d: generation_tps(d, args.new_tokens) for d in dtypes}
        step = {d: sft_step_s(d, args.steps) for d in dtypes}
        out["generation_tokens_per_s"] = {d: round(v, 1) for d, v in gen.items()}
        out["sft_step_s"] = {d: round(v, 3) for d, v in step.items()}
        if len(dtypes) == 2:
            out["generation_tokens_per_s"]["bf16_over_fp32"] = round(gen["bfloat16"] / gen["float32"], 3)
            out["sft_step_s"]["bf16_speedup"] = round(step["float32"] / step["bfloat16"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
