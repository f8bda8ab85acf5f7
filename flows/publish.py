"""Write an export: its rows streamed into arrow files (`to_dataset_dict`), the export directory
(data files, README.md card, manifest.json: `write_export`), and the push to the Hub.

    cai export --constitution harmless --out exports/harmless --format parquet
    HF_TOKEN=hf_... cai export --constitution harmless --out exports/harmless --push-to-hub me/harmless-cai

Local first, always: the directory is complete before any push, so an unreachable hub loses
nothing. `--out` must be new, empty, or an earlier export: a directory whose manifest.json says
this generator wrote it and that holds only the files that manifest lists. Anything else there
is a person's own files, and the export stops before it starts, touching nothing (the rule, and
the swap that replaces an earlier export whole, are flows/output_dir.py's).
Layout per format (cai/dataset_schema.py `data_files`, where the card's `configs` point; an empty
split is not written, since neither `load_from_disk` nor `load_dataset` can read one):
- arrow:   DatasetDict.save_to_disk layout, `<split>/data-*.arrow` (+ state.json, dataset_info.json)
- parquet: `data/<split>.parquet`
- jsonl:   `data/<split>.jsonl`, one JSON object per line, columns in schema order
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cai import dataset_schema as schema
from cai.card import render_card, render_manifest
from cai.review import card_lines as review_card_lines
from flows.common import UserError
from flows.output_dir import GENERATOR, check_out, fresh_sibling, swap_in
from store.keys import RowsHash


def _write_data(data, root: Path, fmt: str) -> None:
    if fmt == "arrow":
        data.save_to_disk(str(root))
        return
    (root / "data").mkdir()
    for name, ds in data.items():
        path = root / schema.data_files(fmt)[name]
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


def hub_token(repo: str) -> str:
    from huggingface_hub import constants

    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise UserError(f"--push-to-hub {repo}: set HF_TOKEN to a Hugging Face write token "
                        f"({constants.ENDPOINT}/settings/tokens); nothing was pushed")
    return token


def staging_dir(out: Path) -> Path:
    """Where an export's rows go while they are written (to_dataset_dict): beside `out`, on the same
    disk, not the system temp dir, which may be memory (tmpfs)."""
    return fresh_sibling(out, "rows")


# --- the rows, streamed into arrow files ------------------------------------------------------

def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _padded(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def _as_sliced(table: Any, batch: list[dict[str, Any]], after: list[dict[str, Any]], n: int, first: bool):
    """This batch as arrow's IPC writer would see it as a slice of one table of all `n` rows.

    The writer keeps a slice's data buffers up to 64-byte padding, filled by the rows after it
    (here: the next batch), and copies a slice's null bitmap to its exact size, except for a
    first slice whose padded bitmap would reach past the whole table's (then it keeps that
    whole bitmap). A slice that starts past a row it does not hold gets the exact copy.
    """
    if n <= len(batch):  # the whole split in one batch: the whole table, no slice
        return table(batch)
    if first and _padded(-(-len(batch) // 8)) >= -(-n // 8):
        return table(batch + after).slice(0, len(batch))
    return table(batch[:1] + batch + after).slice(1, len(batch))


def to_dataset_dict(plan: Mapping[str, Sequence[Any]], rows: Callable[[str, Sequence[Any]], Iterator[dict[str, Any]]],
                    staging: Path):
    """A DatasetDict against the schema, each split's rows (`rows(split, plan[split])`, as many as
    `plan[split]` holds items) streamed into arrow files under `staging` (memory-mapped, so no split
    is ever held in memory), with content fingerprints.

    Byte-identical to building each split as one in-memory table (what export did before it
    streamed; tests compare): `save_to_disk` writes a split by datasets' DEFAULT_MAX_BATCH_SIZE
    rows, each batch a slice of that table, and arrow's IPC writer pads a slice's data buffers to
    64 bytes with the rows that follow it. So each batch here is written as the slice of a table
    that also holds the next batch (two batches in memory at most; `_as_sliced`). The one case
    this cannot reproduce: a column whose next batch holds under 64 bytes while later rows
    hold more; then that buffer's padding differs, never the data read back. Not from_generator: its cache
    can serve stale rows after the store changes. The fingerprint (written to state.json by
    save_to_disk) is a hash of the rows, so two exports of the same data are byte-identical and
    different data never shares a fingerprint. An empty split is left out: `load_from_disk`
    raises IndexError on one and `load_dataset` cannot infer its format, so every client could
    load none of the export.
    """
    from datasets import Dataset, DatasetDict, NamedSplit
    from datasets import config as hf_config
    from datasets.arrow_writer import ArrowWriter

    size = hf_config.DEFAULT_MAX_BATCH_SIZE  # what save_to_disk and to_parquet read by
    out = {}
    for name, features in schema.SPLITS.items():
        if not plan[name]:
            continue
        path = Path(staging) / f"{name}.arrow"
        digest = RowsHash(schema.SCHEMA_VERSION, name, features.to_dict())

        def table(batch: list[dict[str, Any]], features=features):
            return Dataset.from_dict({column: [r[column] for r in batch] for column in features},
                                     features=features).data.table

        n = len(plan[name])
        writer = ArrowWriter(features=features, path=str(path), writer_batch_size=size)
        try:
            batches = _batches(rows(name, plan[name]), size)
            batch, first = next(batches), True
            while batch:
                digest.add_all(batch)
                after = next(batches, [])
                writer.write_table(_as_sliced(table, batch, after, n, first))
                batch, first = after, False
            writer.finalize()
        finally:
            writer.close()
        built = Dataset.from_file(str(path), split=NamedSplit(name))
        out[name] = Dataset(built.data, info=built.info, split=built.split, fingerprint=digest.hexdigest(16))
    return DatasetDict(out)


# --- the export directory ----------------------------------------------------------------------

def write_export(data, facts: dict[str, Any], out: Path, fmt: str) -> dict[str, Any]:
    """Write data, README.md and manifest.json into `out`, replacing an earlier export there.

    Written beside `out` and swapped in at the end, so a crash leaves the old export whole.
    Returns the facts with `files` (path -> bytes, sha256) added.
    """
    import datasets

    out = Path(out)
    check_out(out)
    tmp = fresh_sibling(out)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Saving the dataset" bars are noise in flow logs
    try:
        _write_data(data, tmp, fmt)
        facts = {**facts, "generator": GENERATOR, "files": _file_facts(tmp)}
        card = render_card(facts, schema.data_files(fmt)) + "\n".join(review_card_lines(facts.get("review")))
        (tmp / "README.md").write_text(card, encoding="utf-8", newline="\n")
        (tmp / "manifest.json").write_text(render_manifest(facts), encoding="utf-8", newline="\n")
        check_out(out)  # again: files a person put there while the data was written are kept too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            datasets.enable_progress_bars()
    swap_in(tmp, out)  # checked above: only an earlier export (or nothing) is replaced
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
