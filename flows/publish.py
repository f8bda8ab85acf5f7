"""Write an export directory (data files, README.md card, manifest.json) and push it to the Hub.

    cai export --constitution harmless --out exports/harmless --format parquet
    HF_TOKEN=hf_... cai export --constitution harmless --out exports/harmless --push-to-hub me/harmless-cai

Local first, always: the directory is complete before any push, so an unreachable hub loses
nothing. Layout per format (the card's `configs` point at these paths):
- arrow:   DatasetDict.save_to_disk layout, `<split>/data-*.arrow` (+ state.json, dataset_info.json)
- parquet: `data/<split>.parquet`
- jsonl:   `data/<split>.jsonl`, one JSON object per line, columns in schema order
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cai import dataset_schema as schema
from cai.card import render_card, render_manifest
from flows.common import UserError


def data_files(fmt: str) -> dict[str, str]:
    """Split -> path (glob) inside the export directory, for the card's `configs`."""
    if fmt == "arrow":
        return {s: f"{s}/data-*.arrow" for s in schema.SPLITS}
    return {s: f"data/{s}.{fmt}" for s in schema.SPLITS}


def _write_data(data, root: Path, fmt: str) -> None:
    if fmt == "arrow":
        data.save_to_disk(str(root))
        return
    (root / "data").mkdir()
    for name, ds in data.items():
        path = root / data_files(fmt)[name]
        if fmt == "parquet":
            ds.to_parquet(str(path))
        else:  # our own writer: pandas' to_json escapes "/" and reformats floats
            with path.open("w", encoding="utf-8", newline="\n") as f:
                for row in ds:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _file_facts(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        out[path.relative_to(root).as_posix()] = {"bytes": len(blob), "sha256": digest}
    return out


def check_out(out: Path) -> None:
    """Only an empty directory or an earlier export may be replaced: never a person's own files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").exists())):
        raise UserError(f"--out {out}: exists and is not an earlier export (no manifest.json); "
                        "choose a new or empty directory")


def hub_token(repo: str) -> str:
    from huggingface_hub import constants

    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError(f"--push-to-hub {repo}: set HF_TOKEN to a Hugging Face write token "
                        f"({constants.ENDPOINT}/settings/tokens); nothing was pushed")
    return token


def write_export(data, facts: dict[str, Any], out: Path, fmt: str) -> dict[str, Any]:
    """Write data, README.md and manifest.json into `out`, replacing an earlier export there.

    Written beside `out` and swapped in at the end, so a crash leaves the old export whole.
    Returns the facts with `files` (path -> bytes, sha256) added.
    """
    import datasets

    out = Path(out)
    check_out(out)
    base = out.resolve()  # `--out .` has no name to put a sibling beside
    tmp = base.with_name(f".{base.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Saving the dataset" bars are noise in flow logs
    try:
        _write_data(data, tmp, fmt)
        facts = {**facts, "files": _file_facts(tmp)}
        (tmp / "README.md").write_text(render_card(facts, data_files(fmt)), encoding="utf-8", newline="\n")
        (tmp / "manifest.json").write_text(render_manifest(facts), encoding="utf-8", newline="\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            datasets.enable_progress_bars()
    old = base.with_name(f".{base.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if base.exists():
        base.rename(old)
    tmp.rename(base)
    shutil.rmtree(old, ignore_errors=True)
    return facts


def push_export(out: Path, repo: str, private: bool, message: str) -> str:
    """Upload the export directory (data + card + manifest) to a hub dataset repo; returns its URL.

    The token comes from HF_TOKEN and goes only to the hub client: never into config, logs or files.
    """
    from huggingface_hub import HfApi, constants

    token = hub_token(repo)
    endpoint = constants.ENDPOINT
    try:
        api = HfApi(token=token)
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="dataset", commit_message=message)
    except Exception as exc:  # noqa: BLE001 - network, auth, quota: all one line a person can act on
        detail = (str(exc).strip().splitlines() or [""])[0].replace(token, "***")
        raise UserError(f"cannot push to the Hugging Face Hub at {endpoint} (dataset {repo}): "
                        f"{exc.__class__.__name__}: {detail}; the export is saved locally in {out}") from None
    return f"{endpoint}/datasets/{repo}"
