"""Which float type to compute in, decided by measurement: one probe for generation and training.

    from engines.precision import resolve
    resolve("auto", "cpu")          # "bfloat16" on a CPU where it is measurably faster, else "float32"

bf16 is 2-3x faster than fp32 on CPUs with native bf16 units (AVX512-BF16, AMX) and tens of times
slower where it is emulated (AVX2 only: a 512x576 by 576x1536 matmul ran at 1.1 GFLOP/s in bf16
against 74 in fp32 on such an EPYC). So `auto` times one bf16 and one fp32 matmul once per
process (~30 ms) and takes bf16 only when it is at least BF16_MIN_SPEEDUP times faster. On a
GPU, `auto` is bf16 where supported (else fp16 for inference, fp32 for training's autocast).
`CAI_CPU_DTYPE=float32|bfloat16` overrides the CPU measurement for everything in the process.

No imports of the project: the engines and the training loops (training/) both read this module.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.3  # below this, autocast's casts eat the gain
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_BF16_SPEEDUP: float | None = None


def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul of decode-like shape runs than fp32 here (measured once, ~30 ms);
    0 when this torch build has no bf16 kernels for the CPU."""
    global _BF16_SPEEDUP
    if _BF16_SPEEDUP is None:
        try:
            supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            supported = False
        _BF16_SPEEDUP = time_matmul(torch.float32) / time_matmul(torch.bfloat16) if supported else 0.0
        log.info("CPU bf16 matmul speedup over fp32: %.2fx", _BF16_SPEEDUP)
    return _BF16_SPEEDUP


def time_matmul(dtype: torch.dtype, rows: int = 64, reps: int = 10) -> float:
    """Best of three timings of `reps` (rows x 576) @ (576 x 1536) matmuls: SmolLM2-135M's hidden
    size and MLP width (a busy neighbour only ever makes a run slower, so the best is the truth)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, 576, generator=gen).to(dtype)
    b = torch.randn(576, 1536, generator=gen).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_choice() -> torch.dtype:
    forced = os.environ.get("CAI_CPU_DTYPE", "auto")  # float32 | bfloat16 | auto
    if forced != "auto":
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"CAI_CPU_DTYPE must be float32, bfloat16 or auto; got {forced!r}")
        return DTYPES[forced]
    return torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32


def pick_dtype(dtype: str, device: torch.device | str, training: bool = False) -> torch.dtype:
    """The torch dtype for `dtype` (auto, float32, bfloat16, float16) on `device`.

    training: autocast of fp32 master weights, where fp16 would need loss scaling: `auto` on a GPU
    without bf16 is then fp32."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            return torch.float32 if training else torch.float16
        return _cpu_choice()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def resolve(dtype: str, device: torch.device | str, training: bool = True) -> str:
    """`pick_dtype` as its name: "float32" or "bfloat16" (what a run records)."""
    return str(pick_dtype(dtype, device, training)).removeprefix("torch.")
