"""Training checkpoints: out/checkpoints/step-N holds everything needed to continue exactly.

    save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler, meta)
    found = latest_checkpoint(out / "checkpoints")   # -> (path, step) | None
    meta = load_checkpoint(found[0], model, optimizer, scheduler)

The weights are a plain HF model directory (so a checkpoint can be evaluated or served as
it is); optimizer, scheduler, RNG states and our own metadata go in `trainer_state.pt`. A
checkpoint is written to a temp sibling and renamed, so a kill mid-save leaves the previous
one intact and never a half-written one that `--resume` would trust.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional to the loop itself
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, meta: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write step-`step` under `root` and drop all but the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "meta": meta}, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep > 0:
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old[0], ignore_errors=True)
    return final


def _checkpoints(root: Path) -> list[tuple[Path, int]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).exists():
            found.append((p, int(m.group(1))))
    return sorted(found, key=lambda x: x[1])


def latest_checkpoint(root: Path) -> tuple[Path, int] | None:
    found = _checkpoints(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint without loading the optimizer into the model."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)["meta"]


def load_weights(model, path: Path) -> None:
    """Load a saved HF directory's weights into `model` in place (ties were dropped on save)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights in this checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(next(model.parameters()).device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(_tied_keys(model))
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {really_missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]})")
    if tied:
        model.tie_weights()


def _tied_keys(model) -> list[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the saved state."""
    load_weights(model, path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
