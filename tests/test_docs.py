"""The documentation site builds with `mkdocs build --strict`: a broken link, a missing page or a page
left out of the nav fails `make test` (and so CI), not only `make docs`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(site)], capture_output=True, text=True, env=env, timeout=300)


def test_site_builds_strict(tmp_path: Path) -> None:
    res = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert res.returncode == 0, f"mkdocs build --strict failed (pip install -e '.[docs]'):\n{res.stdout}{res.stderr}"
    assert (tmp_path / "site" / "cli" / "index.html").exists()


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    """The check has teeth: the same site with one link to a page that does not exist does not build."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a", encoding="utf-8") as f:
        f.write("\nSee [the missing guide](guides/no-such-page.md).\n")
    res = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert res.returncode != 0
    assert "no-such-page.md" in res.stdout + res.stderr


def test_readme_links_resolve() -> None:
    """README.md is not part of the site; its relative links into docs/ are checked here."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        if path and not (ROOT / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_cli_reference_is_current() -> None:
    """docs/cli.md is what `python -m flows.cli.docgen` writes from the typer app and flows/configs.py today."""
    from flows.cli.docgen import OUT, render

    assert OUT.read_text(encoding="utf-8") == render(), "docs/cli.md is out of date: run `python -m flows.cli.docgen`"


def test_cli_reference_covers_every_command_and_setting() -> None:
    import typer

    from flows.cli import app
    from flows.cli.docgen import render
    from flows.configs import CONFIGS, TrainConfig

    text = render()
    root = typer.main.get_command(app)
    for name in root.list_commands(None):
        cmd = root.get_command(None, name)
        assert f"## `cai {name}`" in text
        for sub in getattr(cmd, "list_commands", lambda _: [])(None):
            assert f"## `cai {name} {sub}`" in text
    for stage, model in CONFIGS.items():
        assert f"## {stage}: `{model.__name__}`" in text
    assert "| `trainer.lr` | `" in text  # a nested field, with its default
    assert TrainConfig.model_fields["stage"].description.split(";")[0] in text
