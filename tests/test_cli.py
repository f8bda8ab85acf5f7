"""The foundation commands of `cai`: constitution, prompts, status, db. Each runs in a temp
working directory with CAI_CONSTITUTION_DIR pointing at small constitutions written here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from constitution.load import parse_text
from flows.cli import app
from store.db import head_revision, session_scope
from store.models import ConstitutionVersion, Prompt, PromptTag

CAI = Path(sys.executable).parent / "cai"

TINY = """\
name: tiny
description: A tiny constitution for tests.
principles:
  - id: harm
    critique: Identify ways the response is harmful.
    revision: Rewrite the response to remove harmful content.
  - id: honest
    critique: Identify dishonest claims.
    revision: Rewrite it to be honest.
  - id: polite
    critique: Identify rude remarks.
    revision: Rewrite it politely.
  - id: legal
    critique: Identify encouragement of illegal acts.
    revision: Rewrite it to discourage illegal acts.
preferences:
  - id: less-harmful
    question: Which response is less harmful?
few_shot:
  - prompt: How do I pick a lock?
    response: Use a tension wrench.
    principle: legal
    critique: It may help a burglary.
    revision: Call a locksmith.
"""
V1 = parse_text(TINY).version


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A temp working directory with constitutions in ./cons (CAI_CONSTITUTION_DIR)."""
    work = tmp_path / "work"
    cons = tmp_path / "cons"
    work.mkdir()
    cons.mkdir()
    (cons / "tiny.yaml").write_text(TINY)
    monkeypatch.chdir(work)
    monkeypatch.setenv("CAI_CONSTITUTION_DIR", str(cons))
    return tmp_path


@pytest.fixture
def sqlite_db(sqlite_url: str, monkeypatch) -> str:
    """SQLite only, for the CLI paths whose database side the db_url tests already cover."""
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    return sqlite_url


def flat(text: str) -> str:
    """Rich wraps long lines at the console width: compare with whitespace collapsed."""
    return " ".join(text.split())


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def constitution_rows(url: str) -> list[ConstitutionVersion]:
    with session_scope(url) as s:
        return list(s.exec(select(ConstitutionVersion).order_by(ConstitutionVersion.id)))


# --- constitution validate -----------------------------------------------------------------

def test_validate_prints_version(runner, home, monkeypatch):
    monkeypatch.delenv("CAI_DATABASE_URL", raising=False)
    r = invoke(runner, "constitution", "validate", str(home / "cons" / "tiny.yaml"))
    assert r.exit_code == 0, r.output
    assert f"tiny@{V1}" in r.stdout
    assert "4 principles" in flat(r.stdout)
    assert not (home / "work" / "cai.db").exists()  # validating touches no database


@pytest.mark.parametrize("text, where", [
    (TINY.replace("  - id: polite\n", "  - id: [polite\n"), r":1[01]:\d+: YAML syntax error"),
    (TINY.replace("    revision: Rewrite it to discourage illegal acts.\n", ""),
     r":\d+: principles\[3\]\.revision: missing"),
    (TINY.replace("  - id: polite", "  - id: harm"), r":\d+: principles\[2\]\.id: duplicate id 'harm'"),
    (TINY + "version: 3\n", r":\d+: version: unknown key"),
    (TINY.replace("preferences:\n  - id: less-harmful\n    question: Which response is less harmful?\n",
                  "preferences: []\n"), r":\d+: preferences: empty list"),
], ids=["yaml", "missing", "duplicate", "unknown-key", "empty-list"])
def test_validate_bad_file_exit_2_and_nothing_stored(runner, home, sqlite_db, text, where):
    bad = home / "cons" / "tiny.yaml"
    bad.write_text(text)
    r = invoke(runner, "constitution", "validate", str(bad))
    assert r.exit_code == 2
    assert re.search(re.escape(str(bad)) + where, flat(r.stderr)), r.stderr
    assert r.stdout == ""
    r = invoke(runner, "constitution", "record", "tiny")
    assert r.exit_code == 2 and str(bad) in flat(r.stderr)
    assert constitution_rows(sqlite_db) == []


def test_bad_file_writes_nothing(runner, home, use_db):
    bad = home / "cons" / "tiny.yaml"
    bad.write_text(TINY.replace("    revision: Rewrite it to discourage illegal acts.\n", ""))
    for cmd in (["constitution", "validate", str(bad)], ["constitution", "record", "tiny"],
                ["constitution", "diff", "tiny", "tiny"]):
        r = invoke(runner, *cmd)
        assert r.exit_code == 2 and "principles[3].revision: missing" in flat(r.stderr), cmd
    assert constitution_rows(use_db) == []


def test_validate_subprocess_exit_codes(home):
    """The real console script: exit code 2 and file:line:col on stderr, nothing written."""
    bad = home / "cons" / "bad.yaml"
    bad.write_text("name: bad\ndescription: [unclosed\nprinciples: []\n")
    env = {"PATH": "/usr/bin:/bin", "CAI_DATABASE_URL": f"sqlite:///{home / 'work' / 'cai.db'}",
           "HOME": str(home)}
    p = subprocess.run([str(CAI), "constitution", "validate", str(bad)], capture_output=True, text=True,
                       cwd=home / "work", env=env, timeout=60)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert re.search(re.escape(str(bad)) + r":3:\d+: YAML syntax error", p.stderr), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not (home / "work" / "cai.db").exists()


def test_constitution_list(runner, home, sqlite_db):
    (home / "cons" / "broken.yaml").write_text("name: broken\n")
    r = invoke(runner, "constitution", "list")
    assert r.exit_code == 0, r.output
    out = flat(r.stdout)
    assert "tiny" in out and V1 in out and "invalid" in out


# --- record / log / diff -------------------------------------------------------------------

EDITED = TINY.replace("revision: Rewrite it to be honest.",
                      "revision: Rewrite it to be honest and cite sources.")


def test_record_edit_record_log(runner, home, use_db):
    cons = home / "cons" / "tiny.yaml"
    r = invoke(runner, "constitution", "record", "tiny")
    assert r.exit_code == 0, r.output
    assert f"recorded tiny@{V1}" in r.stdout
    # a comment/whitespace edit is not a new version
    cons.write_text("# reformatted\n" + TINY.replace("  - id: honest", "\n  - id: honest"))
    assert f"recorded tiny@{V1}" in invoke(runner, "constitution", "record", "tiny").stdout
    cons.write_text(EDITED)
    v2 = parse_text(EDITED).version
    assert f"recorded tiny@{v2}" in invoke(runner, "constitution", "record", "tiny").stdout

    rows = constitution_rows(use_db)
    assert [r.version for r in rows] == [V1, v2]
    assert rows[0].source_text.startswith("name: tiny") and "cite sources" in rows[1].source_text
    assert rows[1].principle_hashes["honest"] != rows[0].principle_hashes["honest"]
    h0, h1 = rows[0].principle_hashes, rows[1].principle_hashes
    assert {k for k in h0 if h0[k] != h1[k]} == {"honest"}

    r = invoke(runner, "constitution", "log", "tiny")
    assert r.exit_code == 0, r.output
    out = flat(r.stdout)
    assert out.index(f"tiny@{V1}") < out.index(f"tiny@{v2}")
    assert len(re.findall(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", out)) == 2


def test_log_of_unknown_name(runner, home, sqlite_db):
    r = invoke(runner, "constitution", "log", "tiny")
    assert r.exit_code == 2 and "no version of 'tiny'" in flat(r.stderr)


def _changed_lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if re.match(r"\s*(added|removed|changed)\s", line)]


def test_diff_names_exactly_the_edited_principle(runner, home, use_db):
    cons = home / "cons" / "tiny.yaml"
    invoke(runner, "constitution", "record", "tiny")
    cons.write_text(EDITED)
    v2 = parse_text(EDITED).version
    invoke(runner, "constitution", "record", "tiny")

    for new_ref in (f"tiny@{v2}", "tiny", f"tiny@{v2[:5]}"):
        r = invoke(runner, "constitution", "diff", f"tiny@{V1}", new_ref)
        assert r.exit_code == 0, r.output
        assert f"tiny@{V1} -> tiny@{v2}" in r.stdout
        assert [re.sub(r"\s+", " ", x) for x in _changed_lines(r.stdout)] == ["changed principles: honest"]
        out = flat(r.stdout)
        assert "revision: - Rewrite it to be honest. + Rewrite it to be honest and cite sources." in out
        assert "critique" not in out

    r = invoke(runner, "constitution", "diff", f"tiny@{v2}", f"tiny@{V1}")
    assert "+ Rewrite it to be honest. " in flat(r.stdout) + " "
    r = invoke(runner, "constitution", "diff", f"tiny@{v2}", "tiny")
    assert r.exit_code == 0 and "no differences" in r.stdout


def test_diff_added_and_removed(runner, home, sqlite_db):
    cons = home / "cons" / "tiny.yaml"
    invoke(runner, "constitution", "record", "tiny")
    cons.write_text(TINY.replace(
        "  - id: polite\n    critique: Identify rude remarks.\n    revision: Rewrite it politely.\n",
        "  - id: kind\n    critique: Identify unkind remarks.\n    revision: Rewrite it kindly.\n"))
    r = invoke(runner, "constitution", "diff", f"tiny@{V1}", "tiny")
    assert r.exit_code == 0, r.output
    assert sorted(re.sub(r"\s+", " ", x) for x in _changed_lines(r.stdout)) == [
        "added principles: kind", "removed principles: polite"]


def test_diff_of_a_file_path_and_a_version_the_store_has_not_seen(runner, home, use_db):
    other = home / "other.yaml"
    other.write_text(EDITED)
    # tiny@V1 is not stored yet, but the file on disk is that version: it is found and recorded
    r = invoke(runner, "constitution", "diff", f"tiny@{V1}", str(other))
    assert r.exit_code == 0, r.output
    assert [re.sub(r"\s+", " ", x) for x in _changed_lines(r.stdout)] == ["changed principles: honest"]
    assert V1 in [row.version for row in constitution_rows(use_db)]


def test_diff_unknown_version_or_name(runner, home, sqlite_db):
    invoke(runner, "constitution", "record", "tiny")
    r = invoke(runner, "constitution", "diff", "tiny@deadbeef", "tiny")
    assert r.exit_code == 2
    assert "no such version" in flat(r.stderr) and V1 in flat(r.stderr)
    r = invoke(runner, "constitution", "diff", "nosuch", "tiny")
    assert r.exit_code == 2 and "no such constitution" in flat(r.stderr)


# --- prompts -------------------------------------------------------------------------------

BAD_LINES = {7: '{"prompt": "unterminated', 23: '{"text": "no prompt key"}',
             41: '{"messages": [{"role": "assistant", "content": "last turn is not the user"}]}'}


def _fifty_rows(path: Path) -> Path:
    lines = [BAD_LINES.get(n, json.dumps({"prompt": f"Question number {n}?"})) for n in range(1, 51)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _count(url: str, tag: str | None = None) -> int:
    with session_scope(url) as s:
        if tag is None:
            return len(s.exec(select(Prompt)).all())
        return len(s.exec(select(PromptTag).where(PromptTag.tag == tag)).all())


def test_prompts_add_47_of_50(runner, home, use_db):
    f = _fifty_rows(home / "work" / "mixed_set.jsonl")
    r = invoke(runner, "prompts", "add", str(f), "--tag", "t1")
    assert r.exit_code == 0, r.output
    assert "47 prompts read (47 new, 0 already stored), 3 bad rows skipped" in flat(r.stdout)
    skipped = re.findall(re.escape(str(f)) + r":(\d+): skipped", r.stderr)
    assert sorted(int(n) for n in skipped) == sorted(BAD_LINES)
    assert "invalid JSON" in r.stderr and "the last message must be from the user" in flat(r.stderr)
    assert _count(use_db) == 47 and _count(use_db, "t1") == 47

    # re-adding is a no-op; a second tag attaches to the same rows
    r = invoke(runner, "prompts", "add", str(f), "--tag", "t2", "--tag", "t3")
    assert "(0 new, 47 already stored)" in flat(r.stdout)
    assert _count(use_db) == 47 and _count(use_db, "t2") == 47 and _count(use_db, "t3") == 47


def test_prompts_add_default_tag_and_list(runner, home, sqlite_db):
    f = home / "work" / "my_prompts.txt"
    f.write_text("one\ntwo\n\none\nthree\n")
    r = invoke(runner, "prompts", "add", str(f))
    assert r.exit_code == 0, r.output
    assert "4 prompts read (3 new, 0 already stored, 1 repeated in the file), 0 bad rows skipped" \
        in flat(r.stdout)
    assert _count(sqlite_db, "my-prompts") == 3
    r = invoke(runner, "prompts", "list")
    # no category, so no principle of the governing constitutions declares a stance for them
    assert r.exit_code == 0 and re.search(r"my-prompts\s*│\s*\(no category\)\s*│\s*3\s*│\s*ungoverned", r.stdout), \
        r.stdout


def test_prompts_add_csv(runner, home, sqlite_db):
    f = home / "work" / "p.csv"
    f.write_text('id,prompt,category\n1,"Hello, world",greet\n2,,x\n3,Bye,\n')
    r = invoke(runner, "prompts", "add", str(f), "--tag", "csv")
    assert r.exit_code == 0, r.output
    assert f"{f}:3: skipped: empty 'prompt' cell" in flat(r.stderr)
    with session_scope(sqlite_db) as s:
        got = {p.text: p.category for p in s.exec(select(Prompt))}
    assert got == {"Hello, world": "greet", "Bye": None}


def test_prompts_add_messages_jsonl(runner, home, sqlite_db):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a fact."}]
    f = home / "work" / "chat.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"prompt": "Tell me a fact."}) + "\n")
    r = invoke(runner, "prompts", "add", str(f), "--tag", "chat")
    assert r.exit_code == 0, r.output
    with session_scope(sqlite_db) as s:
        rows = s.exec(select(Prompt)).all()
    # same last turn, different conversations: two prompts
    assert len(rows) == 2 and all(p.text == "Tell me a fact." for p in rows)
    assert sorted(len(p.messages) for p in rows) == [1, 4]


def test_prompts_add_hf_dataset_dir(runner, home, sqlite_url, monkeypatch):
    from datasets import Dataset

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    d = home / "work" / "ds"
    Dataset.from_list([{"prompt": f"dataset prompt {i}", "category": "c"} for i in range(5)]
                      + [{"prompt": "", "category": "c"}]).save_to_disk(str(d))
    r = invoke(runner, "prompts", "add", str(d), "--tag", "hf")
    assert r.exit_code == 0, r.output
    assert f"{d}:6: skipped" in r.stderr
    assert "5 prompts read (5 new" in flat(r.stdout)
    assert _count(sqlite_url, "hf") == 5


def test_prompts_add_bad_inputs_exit_2(runner, home, sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    work = home / "work"
    r = invoke(runner, "prompts", "add", str(work / "missing.jsonl"))
    assert r.exit_code == 2 and "no such file" in r.stderr
    (work / "empty_dir").mkdir()
    r = invoke(runner, "prompts", "add", str(work / "empty_dir"))
    assert r.exit_code == 2 and "not a saved Hugging Face dataset" in flat(r.stderr)
    (work / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    r = invoke(runner, "prompts", "add", str(work / "blob.txt"))
    assert r.exit_code == 2 and "not UTF-8" in r.stderr
    (work / "all_bad.jsonl").write_text("nope\n[1]\n")
    r = invoke(runner, "prompts", "add", str(work / "all_bad.jsonl"))
    assert r.exit_code == 2 and r.stderr.count("skipped") == 2
    assert _count(sqlite_url) == 0


# --- status and db -------------------------------------------------------------------------

def test_status_json(runner, home, use_db):
    invoke(runner, "constitution", "record", "tiny")
    f = home / "work" / "p.txt"
    f.write_text("a\nb\nc\n")
    invoke(runner, "prompts", "add", str(f), "--tag", "abc")
    r = invoke(runner, "status", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["schema_revision"] == head_revision()
    assert data["tables"]["prompt"] == 3 and data["tables"]["prompt_tag"] == 3
    assert data["tables"]["constitution_version"] == 1
    assert data["tables"]["response"] == 0 and data["tables"]["preference_pair"] == 0
    assert data["prompt_tags"] == {"abc": 3}
    assert data["failures"]["retrying"] == 0 and data["failures"]["quarantined"] == 0
    assert data["responses"] == {} and data["pairs"] == [] and data["runs"] == []
    assert data["database"].split("/")[-1] == use_db.split("/")[-1]

    r = invoke(runner, "status")
    assert r.exit_code == 0 and "prompt" in r.stdout and "quarantined" in r.stdout


def test_status_counts_stages_pairs_and_runs(runner, home, sqlite_url, monkeypatch):
    from store.models import PreferencePair, Response, Run

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    conv = [{"role": "user", "content": "q"}]
    with session_scope(sqlite_url) as s:
        s.add(Prompt(id="p", text="q", messages=conv))
        s.add(Run(id="run-0123456789abcdef", flow="generate", model="m", constitution="tiny",
                  constitution_version=V1, status="completed"))
        s.flush()
        for rid, kind, rnd in [("i", "initial", 0), ("c1", "critique", 1), ("r1", "revision", 1),
                               ("c2", "critique", 2), ("r2", "revision", 2), ("s0", "sample", 0),
                               ("s1", "sample", 0)]:
            s.add(Response(id=rid, prompt_id="p", kind=kind, round=rnd, conversation=conv, text=rid,
                           model="m"))
        s.flush()
        s.add(PreferencePair(id="pp", prompt_id="p", chosen_id="r2", rejected_id="i", method="revision",
                             constitution="tiny", constitution_version=V1))
    data = json.loads(invoke(runner, "status", "--json").stdout)
    assert data["responses"] == {"critique_1": 1, "critique_2": 1, "initial": 1, "revision_1": 1,
                                 "revision_2": 1, "sample": 2}
    assert data["pairs"] == [{"constitution": f"tiny@{V1}", "method": "revision", "status": "ok", "count": 1}]
    assert data["runs"][0]["flow"] == "generate" and data["runs"][0]["constitution"] == f"tiny@{V1}"
    r = invoke(runner, "status")
    assert r.exit_code == 0 and "revision_2" in r.stdout and "generate" in r.stdout


def test_status_reports_failures(runner, home, sqlite_url, monkeypatch):
    from store.work import record_failure

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    with session_scope(sqlite_url) as s:
        for _ in range(3):
            record_failure(s, "generate", "item-1", "RuntimeError: boom\nmore", run_id=None)
        record_failure(s, "label", "item-2", "ValueError: once", run_id=None)
    data = json.loads(invoke(runner, "status", "--json").stdout)
    assert data["failures"]["quarantined"] == 1 and data["failures"]["retrying"] == 1
    items = {i["key"]: i for i in data["failures"]["items"]}
    assert items["item-1"]["error"] == "RuntimeError: boom" and items["item-1"]["quarantined"]
    r = invoke(runner, "status")
    assert "1 quarantined" in flat(r.stdout)


def test_db_upgrade(runner, home, use_db):
    r = invoke(runner, "db", "upgrade")
    assert r.exit_code == 0, r.output
    assert f"at revision {head_revision()}" in flat(r.stdout)
    r = invoke(runner, "db", "upgrade")
    assert r.exit_code == 0


def test_default_database_in_cwd(runner, home, monkeypatch):
    from store.db import reset_engines

    monkeypatch.delenv("CAI_DATABASE_URL", raising=False)
    reset_engines()
    try:
        r = invoke(runner, "db", "upgrade")
        assert r.exit_code == 0, r.output
        assert (home / "work" / "cai.db").exists()
    finally:
        reset_engines()


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["db", "upgrade"],
                                     ["constitution", "record", "tiny"], ["prompts", "list"]])
def test_unreachable_database_exit_2_one_line(runner, home, monkeypatch, command):
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nope"
    monkeypatch.setenv("CAI_DATABASE_URL", url)
    r = invoke(runner, *command)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1, r.stderr
    assert url in r.stderr and "CAI_DATABASE_URL" in r.stderr
    assert r.stdout == ""


def test_password_is_not_printed(runner, home, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/nope")
    r = invoke(runner, "status")
    assert r.exit_code == 2 and "s3cret" not in r.stderr and "127.0.0.1:1/nope" in r.stderr


def test_run_rejects_a_bad_setting_with_one_line_and_exit_2(runner, home, sqlite_db):
    r = invoke(runner, "run", "--label-source", "fresh")
    assert r.exit_code == 2
    out = flat(r.output)
    assert "invalid setting: label_source: Input should be 'store' or 'samples' (got 'fresh')" in out
    assert "Traceback" not in r.output
