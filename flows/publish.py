"""Write an export: its rows streamed into arrow files (`to_dataset_dict`), the export directory
(data files, README.md card, manifest.json: `write_export`), and the push to the Hub.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai import dataset_schema as schema
from cai.card import render_card, render_manifest
from cai.review import card_lines as review_card_lines
from flows.common import UserError
from store.keys import canonical_json

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


@dataclass(frozen=True)
class Owner:
    """A command that may replace a directory it wrote: the JSON file it leaves there names it
    (`generator`) and lists the files it wrote (`files`); `own` are written beside those."""

    command: str  # as a person types it: "cai export"
    what: str  # "export": "is not an earlier export"
    mark: str  # the JSON file holding `generator` and `files`
    generator: str
    own: tuple[str, ...]
    # a mark written before marks named their generator: how to recognise one (its JSON), and the
    # files such a directory may hold (every name that command ever writes)
    legacy: Callable[[Any], bool] | None = None
    known: tuple[str, ...] = ()


EXPORT = Owner("cai export", "export", "manifest.json", GENERATOR, OWN_FILES)


def _foreign(out: Path, owner: Owner = EXPORT) -> str | None:
    """Why `out` (an existing directory) is not one `owner` wrote and may replace, or None if it is."""
    manifest = out / owner.mark
    try:
        facts = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it is not empty and has no {owner.mark}"
    except (OSError, UnicodeDecodeError, ValueError):
        return f"its {owner.mark} is not one {'an' if owner.what[0] in 'aeiou' else 'a'} {owner.what} wrote"
    if owner.legacy is not None and isinstance(facts, dict) and "generator" not in facts and owner.legacy(facts):
        listed = set(owner.known) | set(owner.own)
    elif not isinstance(facts, dict) or facts.get("generator") != owner.generator \
            or not isinstance(facts.get("files"), dict | list):
        return f"its {owner.mark} was not written by `{owner.command}` (no generator {owner.generator!r})"
    else:
        listed = set(facts["files"]) | set(owner.own)
    folders = {parent.as_posix() for f in listed for parent in Path(f).parents if parent != Path(".")}
    for root, dirs, files in os.walk(out):  # never follows links: we write none
        rel = Path(root).relative_to(out)
        for name, known in [(d, folders) for d in sorted(dirs)] + [(f, listed) for f in sorted(files)]:
            path = (rel / name).as_posix()
            if path not in known or (out / path).is_symlink():
                return f"it holds {path}, which the earlier {owner.what} did not write"
    return None


def check_out(out: Path, owner: Owner = EXPORT) -> None:
    """Only a new or empty directory, or one `owner` wrote before, may become `--out`: never a
    person's files. One rule for `cai export`, `cai report` and `cai judge-report`.

    Also checks that the output can be written there, before any work is done.
    """
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out}: a broken symbolic link; choose a new or empty directory")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is a file, not a directory; choose a new or empty directory")
        why = _foreign(out, owner) if any(out.iterdir()) else None
        if why:
            raise UserError(f"--out {out}: exists and is not an earlier {owner.what} ({why}); nothing was changed: "
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


def fresh_sibling(out: Path, purpose: str = "partial") -> Path:
    """A new empty directory beside `out` (same filesystem, so swap_in is a rename), named fresh:
    never a fixed name that might be a person's file."""
    base = Path(out).resolve()  # `--out .` has no name to put a sibling beside
    base.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{base.name}.{purpose}-", dir=base.parent))


def staging_dir(out: Path) -> Path:
    """Where an export's rows go while they are written (to_dataset_dict): beside `out`, on the same
    disk, not the system temp dir, which may be memory (tmpfs)."""
    return fresh_sibling(out, "rows")


def swap_in(tmp: Path, out: Path, keep: tuple[str, ...] = ()) -> None:
    """Make `tmp` (a fresh_sibling of `out`) be `out`: what `out` held goes, except the entries named
    in `keep`, which move into the new directory; no stale file of an earlier output is left beside
    the new ones, and a crash before this leaves the old output whole."""
    base = Path(out).resolve()
    tmp.chmod(0o755)  # mkdtemp makes it 0700; an output directory is as readable as any other
    trash = Path(tempfile.mkdtemp(prefix=f".{base.name}.old-", dir=base.parent))
    if base.exists():
        for name in keep:
            if (base / name).exists() and not (tmp / name).exists():
                (base / name).rename(tmp / name)
        base.rename(trash / "old")  # the caller checked that it holds only an earlier output
    tmp.rename(base)
    shutil.rmtree(trash, ignore_errors=True)


# --- the rows, streamed into arrow files ------------------------------------------------------

class _RowsHash:
    """content_hash(*head, rows) computed as rows arrive: the same digest, without the list."""

    def __init__(self, *head: Any) -> None:
        self._h = hashlib.sha256(canonical_json(list(head))[:-1].encode("utf-8") + b",[")
        self._first = True

    def add_all(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._h.update((b"" if self._first else b",") + canonical_json(row).encode("utf-8"))
            self._first = False

    def hexdigest(self, length: int) -> str:
        h = self._h.copy()
        h.update(b"]]")
        return h.hexdigest()[:length]


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
        digest = _RowsHash(schema.SCHEMA_VERSION, name, features.to_dict())

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
