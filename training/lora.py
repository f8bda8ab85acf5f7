"""LoRA adapters through peft: train a few MB of low-rank weights, the base stays frozen.

    cai train --lora-r 16 --lora-alpha 32 [--lora-target-modules q_proj,k_proj,v_proj,o_proj,gate_proj]
    cai train --lora-r 16 --merge-lora        # also writes OUT/merged, a plain HF model for vLLM

    model = apply_lora(model, LoraSettings(r=16, alpha=32))
    with reference(model): ...                 # the base model: adapters off, no second copy
    save_model(model, tok, out)                # adapter_config.json + adapter_model.safetensors

The reference model of DPO is the base, and the base is the policy with its adapters switched
off (`PeftModel.disable_adapter()`), so LoRA DPO holds one set of weights, never two. peft's
LoRA starts with B = 0, so before the first step policy and reference agree exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from training.config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def backbone(model):
    """The transformers model under a PeftModel (its layers carry the adapters), else `model`."""
    return model.get_base_model() if is_peft(model) else model


def _module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def apply_lora(model, settings: LoraSettings, seed: int = 0, task_type: str = "CAUSAL_LM",
               modules_to_save: list[str] | None = None):
    """`model` with trainable LoRA adapters on `settings.target_modules`, everything else frozen.
    A is drawn at random (B = 0): `seed` makes the same settings give the same start."""
    from peft import LoraConfig, get_peft_model

    targets: list[str] | str = list(settings.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    else:
        have = _module_names(model)
        missing = [t for t in targets if t not in have]
        if missing:
            raise ValueError(f"lora.target_modules: {', '.join(missing)} not in this model (its linear layers: "
                             f"{', '.join(sorted(have))})")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type=task_type,
                        modules_to_save=modules_to_save)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def reference(model):
    """Context in which `model` computes as its base: adapters off (a no-op for a plain model)."""
    return model.disable_adapter() if is_peft(model) else nullcontext()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_adapter_weights(model, path: Path) -> None:
    """Load a checkpoint's adapter weights into the PeftModel `model` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = path / ADAPTER_WEIGHTS
    if not file.exists():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (a full-weight checkpoint; drop --lora-r to "
                                "resume it, or pick another --out)")
    state = load_file(str(file), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"{path}: adapter does not match this LoRA setup (unexpected {unexpected[:3]}); "
                           "resume with the same --lora-r and --lora-target-modules")


def merge(model):
    """The plain transformers model with the adapters folded into its weights (in place)."""
    return model.merge_and_unload() if is_peft(model) else model
