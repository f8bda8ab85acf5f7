"""Training checkpoints: out/checkpoints/step-N holds everything needed to continue exactly.

    save_checkpoint(out / "checkpoints", step, model, optimizer, scheduler, meta)
    found = latest_checkpoint(out / "checkpoints")   # -> (path, step) | None
    meta = load_checkpoint(found[0], model, optimizer, scheduler)

The loops do not call these themselves: training/loop.py's `Checkpoints` decides when to save and what a
resume restores. The weights are a plain HF model directory (so a checkpoint can be evaluated or
served as it is); optimizer, scheduler and RNG states (and with keep-best, the best eval's weights)
go in `trainer_state.pt`, our own metadata (step, history, the ids `--resume` checks) in
`trainer_meta.json`. A finished stage's checkpoint has no optimizer or scheduler (None). A
checkpoint is written to a temp sibling and renamed, so a kill mid-save leaves the previous one
intact and never a half-written one that `--resume` would trust.

Nothing here unpickles: `trainer_state.pt` holds only tensors, numbers, strings, lists and dicts
and is read with `torch.load(weights_only=True)`, so a file planted in a run directory cannot
run code on `cai train --resume`; the metadata is plain JSON.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
META_FILE = "trainer_meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory this version cannot (or will not) load; the message names the file."""


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors, numbers and lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": {"version": version, "state": list(internal), "gauss": gauss},
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # numpy is optional to the loop itself
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, meta: dict[str, Any],
                    keep: int = 2, tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write step-`step` under `root` and drop all but the newest `keep` checkpoints; `tensors` are
    more named state dicts to keep (the best eval's weights). No optimizer: a finished stage."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    state: dict[str, Any] = {"step": step, "rng": rng_state(), **(tensors or {})}
    if optimizer is not None:
        state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(state, tmp / STATE_FILE)
    # JSON, not pickle; allow_nan: best_eval starts as inf, and Python reads its Infinity back
    (tmp / META_FILE).write_text(json.dumps({"step": step, "meta": meta}, sort_keys=True), encoding="utf-8")
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
        if m and (p / STATE_FILE).exists() and (p / META_FILE).exists():
            found.append((p, int(m.group(1))))
    return sorted(found, key=lambda x: x[1])


def latest_checkpoint(root: Path) -> tuple[Path, int] | None:
    found = _checkpoints(root)
    return found[-1] if found else None


def _read_json(path: Path) -> dict[str, Any]:
    file = path / META_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot read checkpoint metadata ({exc.__class__.__name__}); "
                              "delete this checkpoint or drop --resume") from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or not isinstance(data.get("step"), int):
        raise CheckpointError(f"{file}: not checkpoint metadata (expected {{step, meta}}); "
                              "delete this checkpoint or drop --resume")
    return data


def read_meta(path: Path) -> dict[str, Any]:
    """The metadata of a checkpoint without loading the optimizer into the model."""
    return _read_json(path)["meta"]


def _read_state(path: Path, optimizer: bool = True) -> dict[str, Any]:
    file = path / STATE_FILE
    try:
        # weights_only: tensors and plain containers only; anything else is refused, never run
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{file}: not a checkpoint this version loads safely "
                              f"({exc.__class__.__name__}: {first}); delete it or drop --resume") from None
    need = {"optimizer", "scheduler", "rng"} if optimizer else {"rng"}
    if not isinstance(state, dict) or not need <= set(state):
        raise CheckpointError(f"{file}: not a trainer state (expected optimizer, scheduler, rng); "
                              "delete this checkpoint or drop --resume")
    return state


def load_weights(model, path: Path) -> None:
    """Load a saved HF directory's weights into `model` in place (ties were dropped on save);
    a LoRA model loads the checkpoint's adapter."""
    from safetensors.torch import load_file

    from training.lora import ADAPTER_WEIGHTS, is_peft, load_adapter_weights

    if is_peft(model):
        try:
            load_adapter_weights(model, path)
        except (FileNotFoundError, RuntimeError) as exc:
            raise CheckpointError(str(exc)) from None
        return
    if (path / ADAPTER_WEIGHTS).exists() and not (path / "config.json").exists():
        raise CheckpointError(f"{path}: a LoRA checkpoint (adapter only); resume it with the same --lora-r")

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
    """Restore weights, optimizer, scheduler (None: not these) and RNG from `path`; returns {"step",
    "meta"} and the checkpoint's other saved tensors (save_checkpoint's `tensors`) by name."""
    saved = _read_json(path)
    state = _read_state(path, optimizer is not None)  # both read before anything is changed in place
    load_weights(model, path)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return {k: v for k, v in state.items() if k not in ("step", "rng", "optimizer", "scheduler")} | saved
