"""Write an export directory (data files, README.md card, manifest.json) and push it to the Hub.

    cai export --constitution harmless --out exports/harmless --format parquet
    HF_TOKEN=hf_... cai export --constitution harmless --out exports/harmless --push-to-hub me/harmless-cai

Local first, always: the directory is complete before any push, so an unreachable hub loses
nothing. `--out` must be new, empty, or an earlier export: a directory whose manifest.json says
this generator wrote it and that holds only the files that manifest lists. Anything else there
is a person's own files, and the export stops before it starts, touching nothing.
Layout per format (the card's `configs` point at these paths; an empty split is not written,
since neither `load_from_disk` nor `load_dataset` can read one):
- arrow:   DatasetDict.save_to_disk layout, `<split>/data-*.arrow` (+ state.json, dataset_info.json)
- parquet: `data/<split>.parquet`
- jsonl:   `data/<split>.jsonl`, one JSON object per line, columns in schema order
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cai import dataset_schema as schema
from cai.card import render_card, render_manifest
from cai.review import card_lines as review_card_lines
from flows.common import UserError

GENERATOR = "cai-factory export"  # manifest.json's `generator`: the mark of a directory we may replace
OWN_FILES = ("README.md", "manifest.json")  # written beside the data files the manifest lists


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
        with path.open("rb") as f:  # hashed as it is read: a data file is never held in memory whole
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        out[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest}
    return out


def _foreign(out: Path) -> str | None:
    """Why `out` (an existing directory) is not an earlier export we may replace, or None if it is."""
    manifest = out / "manifest.json"
    try:
        facts = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "it is not empty and has no manifest.json"
    except (OSError, UnicodeDecodeError, ValueError):
        return "its manifest.json is not one an export wrote"
    if not isinstance(facts, dict) or facts.get("generator") != GENERATOR or not isinstance(facts.get("files"), dict):
        return f"its manifest.json was not written by `cai export` (no generator {GENERATOR!r})"
    listed = set(facts["files"]) | set(OWN_FILES)
    folders = {parent.as_posix() for f in listed for parent in Path(f).parents if parent != Path(".")}
    for root, dirs, files in os.walk(out):  # never follows links: an export writes none
        rel = Path(root).relative_to(out)
        for name, known in [(d, folders) for d in sorted(dirs)] + [(f, listed) for f in sorted(files)]:
            path = (rel / name).as_posix()
            if path not in known or (out / path).is_symlink():
                return f"it holds {path}, which the earlier export did not write"
    return None


def check_out(out: Path) -> None:
    """Only a new or empty directory, or an earlier export, may become `--out`: never a person's files.

    Also checks that the export can be written there, before any work is done.
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out}: a broken symbolic link; choose a new or empty directory")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is a file, not a directory; choose a new or empty directory")
        why = _foreign(out) if any(out.iterdir()) else None
        if why:
            raise UserError(f"--out {out}: exists and is not an earlier export ({why}); nothing was changed: "
                            "choose a new or empty directory")
    base = out.resolve()
    if base.parent == base:
        raise UserError(f"--out {out}: the root directory cannot be replaced; choose a directory inside it")
    parent = base.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, so no directory can be made under it; "
                        "choose another directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {parent} (permission denied); choose another directory")
    try:  # and a probe: root passes os.access everywhere, yet a read-only filesystem refuses it
        with tempfile.TemporaryFile(dir=parent, prefix=f".{base.name}.check-"):
            pass
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in {parent} ({exc.strerror or exc.__class__.__name__}); "
                        "choose another directory") from None


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
    base.parent.mkdir(parents=True, exist_ok=True)
    # fresh names beside `out` (never a fixed one that might be a person's file) on the same filesystem
    tmp = Path(tempfile.mkdtemp(prefix=f".{base.name}.partial-", dir=base.parent))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Saving the dataset" bars are noise in flow logs
    try:
        _write_data(data, tmp, fmt)
        facts = {**facts, "generator": GENERATOR, "files": _file_facts(tmp)}
        card = render_card(facts, data_files(fmt)) + "\n".join(review_card_lines(facts.get("review")))
        (tmp / "README.md").write_text(card, encoding="utf-8", newline="\n")
        (tmp / "manifest.json").write_text(render_manifest(facts), encoding="utf-8", newline="\n")
        check_out(out)  # again: files a person put there while the data was written are kept too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            datasets.enable_progress_bars()
    tmp.chmod(0o755)  # mkdtemp makes it 0700; an export directory is as readable as any other
    trash = Path(tempfile.mkdtemp(prefix=f".{base.name}.old-", dir=base.parent))
    if base.exists():
        base.rename(trash / "export")  # checked above: only an earlier export (or nothing) is moved
    tmp.rename(base)
    shutil.rmtree(trash, ignore_errors=True)
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
