"""Issue 34 item 4: a user's prompts never take a bundled set's tag.

`cai prompts add my.jsonl --tag benign` before the bundled set's first use made every command that
resolves `benign` use the user's 2 prompts instead of the bundled 34 (the same for the held-out tags
the eval measures on). Now it is refused in one line naming the tag, and nothing is stored.
"""

from __future__ import annotations

import json

import pytest
from sqlmodel import func, select
from typer.testing import CliRunner

from cai.prompts import BUNDLED, DATA_DIR, parse_file
from flows.cli import app
from flows.common import load_prompts
from store.db import session_scope
from store.models import Prompt


@pytest.mark.parametrize(("args", "tag"), [
    (["--tag", "benign"], "benign"),
    (["--tag", "mine", "--tag", "red-team-heldout"], "red-team-heldout"),
    ([], "red-team"),  # no --tag: the file's name is the tag (red_team.jsonl -> red-team)
])
def test_prompts_add_refuses_a_bundled_tag(sqlite_url, tmp_path, monkeypatch, args, tag):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    f = tmp_path / "red_team.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"my prompt {i}"}) + "\n" for i in range(2)))
    r = CliRunner().invoke(app, ["prompts", "add", str(f), *args], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.output
    assert f"tag {tag!r} names a bundled prompt set" in " ".join(r.stderr.split())
    with session_scope(sqlite_url) as s:
        assert s.exec(select(func.count()).select_from(Prompt)).one() == 0  # nothing stored
    # and the bundled set is what the tag resolves to
    assert len(load_prompts(sqlite_url, [tag])) == len(parse_file(DATA_DIR / BUNDLED[tag]).prompts)


def test_prompts_add_keeps_working_with_a_tag_of_ones_own(sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"my prompt {i}"}) + "\n" for i in range(2)))
    r = CliRunner().invoke(app, ["prompts", "add", str(f), "--tag", "my-benign"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(load_prompts(sqlite_url, ["my-benign"])) == 2


def test_the_bundled_file_itself_may_be_added_under_its_tag(sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)  # as the README shows: data/red_team.jsonl --tag red-team
    r = CliRunner().invoke(app, ["prompts", "add", str(DATA_DIR / BUNDLED["red-team"]), "--tag", "red-team"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(load_prompts(sqlite_url, ["red-team"])) == len(parse_file(DATA_DIR / BUNDLED["red-team"]).prompts)
