"""Engine-test fixtures: a tiny model whose greedy replies depend on the prompt.

The shared `tiny_model_dir` keeps the default init (std 0.02), whose logits are so flat that
every prompt yields the same reply ("\\n" over and over); that cannot show a reordering bug.
Re-drawing the matrices with std 0.2 gives prompt-dependent, well-separated logits (no
near-ties), so batched and one-by-one greedy runs must agree token for token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("varied-model")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2, generator=gen)
    model.save_pretrained(out, safe_serialization=True)
    for f in tiny_model_dir.iterdir():  # tokenizer files and chat template
        if f.is_file() and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    return out
