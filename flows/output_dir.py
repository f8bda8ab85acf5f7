"""The one rule for an output directory (`--out`), and the swap that replaces an earlier output whole.

    check_out(out, REPORT)          # before any work: new, empty, or what `cai report` wrote there before
    tmp = fresh_sibling(out)        # written beside `out`, on the same disk
    swap_in(tmp, out)               # then renamed into place: a crash before this leaves the old output whole

Only a new or empty directory, or one a command of ours wrote before (its mark file names the
generator and lists the files it wrote: an `Owner`), may become `--out`; anything else there is a
person's own files, and the command stops before it starts, touching nothing. `cai export`
(flows/publish.py), `cai report` and `cai judge-report` check with `check_out`; `cai train` and
`cai reward train` swap their model directories in with `fresh_sibling` and `swap_in`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.common import UserError

GENERATOR = "cai-factory export"  # manifest.json's `generator`: the mark of a directory we may replace
OWN_FILES = ("README.md", "manifest.json")  # written beside the data files the manifest lists


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


def fresh_sibling(out: Path, purpose: str = "partial") -> Path:
    """A new empty directory beside `out` (same filesystem, so swap_in is a rename), named fresh:
    never a fixed name that might be a person's file."""
    base = Path(out).resolve()  # `--out .` has no name to put a sibling beside
    base.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{base.name}.{purpose}-", dir=base.parent))


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
