"""Issue 34 item 3: an engine that cannot load fails the run, never the items.

A missing vLLM, a typo in `engine.settings` or an out-of-memory at load made every item of
`cai contrast` / `cai label` a failed attempt, and the third such run quarantined them all for good:
the corrected rerun then computed nothing, silently. Now the run fails in one line (exit 2) with no
failure charged; and quarantined items (from real item failures) can be released, as `cai status` says.
"""

from __future__ import annotations

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from flows.cli import app
from store.db import session_scope
from store.models import MAX_ATTEMPTS, Claim, Failure, Response, Run


def _one_line_exit_2(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.mark.parametrize("command", [
    ["contrast", "--limit", "1", "--model", "{model}"],
    ["label", "--limit", "1", "--policy", "{model}", "--judge", "{model}"],
])
def test_an_engine_that_cannot_load_quarantines_nothing(sqlite_url, tiny_model_dir, tmp_path, monkeypatch, command):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    monkeypatch.chdir(tmp_path)
    args = [a.format(model=tiny_model_dir) for a in command]
    runner = CliRunner()
    for _ in range(MAX_ATTEMPTS + 1):  # more runs than it takes to quarantine an item
        r = runner.invoke(app, [*args, "--set", "engine.settings.no_such_setting=1"], catch_exceptions=False)
        _one_line_exit_2(r, "cannot load model", "no_such_setting")
    with session_scope(sqlite_url) as s:
        assert s.exec(select(Failure)).all() == []  # no item was charged for the engine
        assert s.exec(select(Claim)).all() == []  # and none is held
        assert {r.status for r in s.exec(select(Run)).all()} == {"failed"}
    if command[0] == "contrast":  # the corrected run does the work
        r = runner.invoke(app, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        with session_scope(sqlite_url) as s:
            assert s.exec(select(Response)).all(), "the corrected rerun computed the items"


def _quarantine(url: str) -> None:
    with session_scope(url) as s:
        for stage, key in (("label.judge", "a"), ("label.judge", "b"), ("contrast.plain", "c")):
            s.add(Failure(stage=stage, item_key=key, error="boom", attempts=MAX_ATTEMPTS, quarantined=True))
        s.add(Failure(stage="label.judge", item_key="d", error="once", attempts=1, quarantined=False))


def test_quarantined_items_can_be_released_and_status_says_how(sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    _quarantine(sqlite_url)
    runner = CliRunner()
    r = runner.invoke(app, ["status"], catch_exceptions=False)
    assert r.exit_code == 0 and "3 quarantined" in r.output
    assert "cai db release-quarantine" in " ".join(r.output.split())

    r = runner.invoke(app, ["db", "release-quarantine", "--stage", "label"], catch_exceptions=False)
    assert r.exit_code == 0 and "released 2 quarantined items (label.judge 2)" in " ".join(r.output.split())
    with session_scope(sqlite_url) as s:
        left = {(f.stage, f.item_key, f.quarantined) for f in s.exec(select(Failure)).all()}
    assert left == {("contrast.plain", "c", True), ("label.judge", "d", False)}  # other stages, retrying: kept

    r = runner.invoke(app, ["db", "release-quarantine"], catch_exceptions=False)
    assert r.exit_code == 0 and "released 1 quarantined items (contrast.plain 1)" in " ".join(r.output.split())
    r = runner.invoke(app, ["status"], catch_exceptions=False)
    assert "0 quarantined" in r.output and "release-quarantine" not in r.output
    r = runner.invoke(app, ["db", "release-quarantine"], catch_exceptions=False)
    assert r.exit_code == 0 and "no quarantined items" in r.output
