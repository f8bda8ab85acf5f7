"""Every shell block the docs mark as runnable runs as written, so the docs cannot drift from the CLI.

A block is runnable when the line before its fence is `<!-- runnable -->` (invisible on GitHub and in
the site). The runnable blocks of one page run in order, in one fresh directory that holds copies of
`constitution/` and `data/`, against a fresh SQLite store, with `cai` on PATH; each must exit 0.
Only fast commands are marked (no model is loaded): validating, diffing and linting constitutions,
adding and listing prompts, `--show-config`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- runnable -->"
FENCE = re.compile(r"^```(?:bash|sh|console)?\s*$")


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line of the fence, text) of each marked block; a marker not followed by a shell fence is an error."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("```") or not FENCE.match(lines[i + 1]):
            raise AssertionError(f"{path}:{i + 1}: {MARK} must be followed by a ```bash fence")
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        out.append((i + 2, "\n".join(lines[i + 2:end])))
    return out


PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if MARK in p.read_text("utf-8")]


def _workdir(tmp: Path) -> dict[str, str]:
    shutil.copytree(ROOT / "constitution", tmp / "constitution")
    shutil.copytree(ROOT / "data", tmp / "data")
    bin_dir = tmp / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "cai"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flows.cli "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAI_", "PREFECT_API"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               CAI_DATABASE_URL=f"sqlite:///{tmp / 'cai.db'}", COLUMNS="200")
    return env


def test_pages_have_runnable_blocks() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/guides/constitution.md", "docs/guides/prompts.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_runnable_blocks_run(page: Path, tmp_path: Path) -> None:
    env = _workdir(tmp_path)
    for line, block in runnable_blocks(page):
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        where = f"{page.relative_to(ROOT)}:{line}"
        assert res.returncode == 0, f"{where}: the block exits {res.returncode}:\n{block}\n{res.stdout}{res.stderr}"


def test_a_failing_block_fails(tmp_path: Path) -> None:
    """The runner has teeth: a marked block with an option the CLI does not have fails."""
    page = tmp_path / "page.md"
    page.write_text(f"text\n\n{MARK}\n```bash\ncai constitution validate --no-such-option\n```\n", encoding="utf-8")
    [(line, block)] = runnable_blocks(page)
    assert line == 4
    (tmp_path / "w").mkdir()
    env = _workdir(tmp_path / "w")
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path / "w", env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
