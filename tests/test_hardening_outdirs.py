"""Issue 34 item 2: `cai report --out` and `cai judge-report --out` never delete or overwrite a
person's files. Like `cai export` (flows/output_dir.py `check_out`, the one rule), they write only
into a new or empty directory or one they wrote before, and refuse anything else in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_hardening_cli as cli_tests
from test_hardening_cli import invoke, one_line_exit_2

runner, home = cli_tests.runner, cli_tests.home  # their fixtures, used here too

MINE = {"eval.png": b"my own plot", "index.html": b"<p>my homepage</p>", "report.json": b'{"mine": 1}',
        "dpo.png": b"mine too", "figures.json": b'{"mine": 2}', "label_prob_hist.png": b"mine"}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("command", ["report", "judge-report"])
def test_report_commands_refuse_a_directory_of_someone_elses_files(runner, home, sqlite_url, monkeypatch,
                                                                    command):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    out = home / "mine"
    out.mkdir()
    for name, data in MINE.items():
        (out / name).write_bytes(data)
    r = invoke(runner, command, "--out", str(out))
    one_line_exit_2(r, f"--out {out}", "nothing was changed", "choose a new or empty directory")
    assert _files(out) == MINE  # every file as it was: none deleted, none overwritten


def test_report_rewrites_its_own_directory_and_keeps_refusing_a_file_added_there(runner, home, sqlite_url,
                                                                                 monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    out = home / "rep"
    assert invoke(runner, "report", "--out", str(out)).exit_code == 0
    assert json.loads((out / "report.json").read_text())["generator"] == "cai-factory report"
    assert invoke(runner, "report", "--out", str(out)).exit_code == 0  # its own earlier report: replaced
    (out / "notes.txt").write_text("my notes")
    r = invoke(runner, "report", "--out", str(out))
    one_line_exit_2(r, "notes.txt", "which the earlier report did not write")
    assert (out / "notes.txt").read_text() == "my notes"
    assert invoke(runner, "report", "--out", str(home / "empty")).exit_code == 0  # new: fine


def test_a_report_an_older_version_wrote_is_still_ours(runner, home, sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    out = home / "old"
    out.mkdir()
    # report.json as reports wrote it before it named its generator, with their plots beside it
    (out / "report.json").write_text(json.dumps({"generated_at": "2026-12-01", "stages": {}, "images": {}}))
    (out / "index.html").write_text("<p>old report</p>")
    (out / "dpo.png").write_bytes(b"old plot")
    assert invoke(runner, "report", "--out", str(out)).exit_code == 0
    assert json.loads((out / "report.json").read_text())["generator"] == "cai-factory report"
    assert not (out / "dpo.png").exists()  # last run's plot, of a section with no data now, is gone


def test_cai_run_refuses_a_foreign_report_dir_before_any_work(runner, home, sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    out = home / "mine"
    out.mkdir()
    (out / "eval.png").write_bytes(b"my own plot")
    r = invoke(runner, "run", "--set", f"report_dir={out}", "--set", f"model_dir={home / 'model'}")
    one_line_exit_2(r, f"--out {out}", "is not an earlier report")
    assert (out / "eval.png").read_bytes() == b"my own plot"
    assert not (home / "model").exists()
