"""Issue 13 items 3, 8 and 9: what `cai` prints and how it fails.

Stored text is printed as it is (never read as rich markup); a database, directory or server that
refuses work is one line on stderr and exit code 2, with the rows stored before still there; only
our own error types become one line (a KeyError is a bug and keeps its traceback); `cai run` never
prints a database password.
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import func, select
from typer.testing import CliRunner

from cai.prompts import ParsedPrompt
from flows.cli import app
from store.db import get_engine, reset_engines, session_scope
from store.models import Prompt, PromptTag
from store.queries import store_prompts

TINY = """\
name: tiny
description: A tiny constitution for tests.
principles:
  - id: harm
    critique: Identify ways the response is harmful.
    revision: "Rewrite it; see [link] and [bold]this[/bold] and [/]."
preferences:
  - id: less-harmful
    question: Which response is less harmful?
few_shot:
  - prompt: How do I pick a lock?
    response: Use a tension wrench.
    principle: harm
    critique: It may help a burglary.
    revision: Call a locksmith.
"""


# the same, with a stance: uncategorized prompts (as `seed` stores them) are governed by its default
# principle, so `cai contrast` has something to pair
TINY_GOVERNED = TINY.replace("name: tiny", "name: tinygov").replace(
    "principles:\n", "default_principle: harm\nprinciples:\n").replace(
    '    revision: "Rewrite it; see [link] and [bold]this[/bold] and [/]."\n',
    '    revision: "Rewrite it; see [link] and [bold]this[/bold] and [/]."\n    stance: refuse\n'
    "    examples:\n      - I won't help with that, because it could hurt someone.\n")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    work, cons = tmp_path / "work", tmp_path / "cons"
    work.mkdir()
    cons.mkdir()
    (cons / "tiny.yaml").write_text(TINY)
    (cons / "tinygov.yaml").write_text(TINY_GOVERNED)
    monkeypatch.chdir(work)
    monkeypatch.setenv("CAI_CONSTITUTION_DIR", str(cons))
    return tmp_path


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


def one_line_exit_2(r, *needles: str) -> str:
    """The failure contract: exit 2, exactly one line on stderr, no traceback, nothing on stdout."""
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in flat(r.stderr), r.stderr
    return r.stderr


def seed(url: str, n: int = 5, tag: str = "before") -> None:
    with session_scope(url) as s:
        store_prompts(s, [ParsedPrompt([{"role": "user", "content": f"stored {i}"}]) for i in range(n)],
                      "before.txt", [tag])


def counts(url: str) -> dict[str, int]:
    with session_scope(url) as s:
        return {"prompts": s.exec(select(func.count()).select_from(Prompt)).one(),
                **dict(s.exec(select(PromptTag.tag, func.count()).group_by(PromptTag.tag)).all())}


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


# --- item 3: stored text is printed as it is -------------------------------------------------

def test_status_prints_a_failure_message_with_brackets(runner, home, sqlite_url, monkeypatch):
    from store.work import record_failure

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    with session_scope(sqlite_url) as s:
        record_failure(s, "generate", "item-[/]", "ValueError: prompt ends with [/INST] [bold]x[/]", run_id=None)
    r = invoke(runner, "status")
    assert r.exit_code == 0, r.output
    assert "ValueError: prompt ends with [/INST] [bold]x[/]" in r.stdout and "item-[/]" in r.stdout


def test_prompts_list_and_add_print_tags_and_names_with_brackets(runner, home, sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    (home / "work" / "set[").mkdir()
    f = home / "work" / "set[" / "].jsonl"  # its name reads `set[/].jsonl`: a closing tag with nothing to close
    f.write_text('{"prompt": "hello [/INST]"}\n{"nope": 1}\n')
    r = invoke(runner, "prompts", "add", str(f), "--tag", "mine")
    assert r.exit_code == 0, r.output
    assert f"{f}:2: skipped:" in r.stderr  # the bad-row message, name and all
    assert f"{f}: 1 prompts read" in flat(r.stdout)
    # `prompts add` refuses such tags now (issue 34 item 24); a store written before may hold them
    seed(sqlite_url, 1, tag="[/]")
    seed(sqlite_url, 1, tag="[red]x")
    r = invoke(runner, "prompts", "list")
    assert r.exit_code == 0, r.output
    assert "[/]" in r.stdout and "[red]x" in r.stdout


def test_constitution_diff_keeps_bracketed_principle_text(runner, home, sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    assert invoke(runner, "constitution", "record", "tiny").exit_code == 0
    (home / "cons" / "tiny.yaml").write_text(TINY.replace("and [/].", "and [/] [i]more[/i]."))
    r = invoke(runner, "constitution", "diff", "tiny@" + _version(sqlite_url), "tiny")
    assert r.exit_code == 0, r.output
    out = flat(r.stdout)
    assert "- Rewrite it; see [link] and [bold]this[/bold] and [/]." in out
    assert "+ Rewrite it; see [link] and [bold]this[/bold] and [/] [i]more[/i]." in out
    r = invoke(runner, "constitution", "list")
    assert r.exit_code == 0 and "tiny" in r.stdout


def _version(url: str) -> str:
    from store.models import ConstitutionVersion

    with session_scope(url) as s:
        return s.exec(select(ConstitutionVersion.version)).one()


# --- item 8: one line and exit 2, the rows stored before kept ------------------------------

def test_read_only_database(runner, home, sqlite_url, monkeypatch):
    seed(sqlite_url)
    reset_engines()
    # mode=ro, because chmod does not stop root (these tests run as root in CI)
    monkeypatch.setenv("CAI_DATABASE_URL", f"sqlite:///file:{sqlite_path(sqlite_url)}?mode=ro&uri=true")
    f = home / "work" / "new.txt"
    f.write_text("one\ntwo\n")
    one_line_exit_2(invoke(runner, "prompts", "add", str(f)), "is read-only", "the rows stored before are kept")
    reset_engines()
    assert counts(sqlite_url) == {"prompts": 5, "before": 5}
    monkeypatch.setenv("CAI_DATABASE_URL", f"sqlite:///file:{sqlite_path(sqlite_url)}?mode=ro&uri=true")
    r = invoke(runner, "status")  # reading still works
    assert r.exit_code == 0, r.output


def test_database_locked_longer_than_the_busy_timeout(runner, home, sqlite_url, monkeypatch):
    import store.db

    seed(sqlite_url)
    monkeypatch.setattr(store.db, "BUSY_TIMEOUT_S", 0.3)
    reset_engines()
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    f = home / "work" / "new.txt"
    f.write_text("one\ntwo\n")
    other = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        one_line_exit_2(invoke(runner, "prompts", "add", str(f)), "stayed locked by another process",
                        "0.3 s busy timeout", "the rows stored before are kept")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert counts(sqlite_url) == {"prompts": 5, "before": 5}
    r = invoke(runner, "prompts", "add", str(f))  # and once the lock is gone, it works
    assert r.exit_code == 0, r.output
    assert counts(sqlite_url) == {"prompts": 7, "before": 5, "new": 2}


@pytest.mark.parametrize("command", [
    ["train", "--out", "{bad}"],
    ["report", "--out", "{bad}"],
    ["judge-report", "--out", "{bad}"],
    ["export", "--constitution", "tiny", "--out", "{bad}"],
    ["run", "--set", "model_dir={bad}"],
])
@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_out_is_refused_before_any_work(runner, home, sqlite_url, monkeypatch, command, where):
    seed(sqlite_url)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    (home / "work" / "afile").write_text("x")
    # a directory under a regular file, and /proc (which refuses even root)
    bad = "afile/sub" if where == "under-a-file" else "/proc/cai-test-out"
    if where == "proc" and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    r = invoke(runner, *[a.format(bad=bad) for a in command])
    one_line_exit_2(r, bad)
    assert "cannot write in" in r.stderr or "is a file" in r.stderr
    assert counts(sqlite_url) == {"prompts": 5, "before": 5}
    assert not Path(bad).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_schedule_with_an_unreachable_prefect_server(runner, home, sqlite_url, monkeypatch):
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    url = f"http://127.0.0.1:{_free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    r = invoke(runner, "schedule", "generate", "--cron", "0 3 * * *", "--constitution", "harmless")
    one_line_exit_2(r, f"cannot reach the Prefect server at PREFECT_API_URL={url}", "prefect server start")


def test_corrupt_dataset_directory(runner, home, sqlite_url, monkeypatch):
    seed(sqlite_url)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    d = home / "work" / "broken"
    (d / "train_prefs").mkdir(parents=True)
    (d / "dataset_dict.json").write_text('{"splits": ["train_prefs"]}')
    (d / "train_prefs" / "state.json").write_text("not json")
    one_line_exit_2(invoke(runner, "prompts", "add", str(d)), str(d))
    assert counts(sqlite_url) == {"prompts": 5, "before": 5}


def _raw(url: str):
    return sa.create_engine(url)


def _tables(url: str) -> set[str]:
    eng = _raw(url)
    try:
        return set(sa.inspect(eng).get_table_names())
    finally:
        eng.dispose()


@pytest.mark.parametrize("command", [["status"], ["db", "upgrade"], ["prompts", "list"]])
def test_our_tables_without_alembic_version(runner, home, db_url, monkeypatch, command):
    seed(db_url)
    reset_engines()
    eng = _raw(db_url)
    with eng.begin() as c:
        c.execute(sa.text("DROP TABLE alembic_version"))
    eng.dispose()
    before = _tables(db_url)
    monkeypatch.setenv("CAI_DATABASE_URL", db_url)
    one_line_exit_2(invoke(runner, *command), "has cai-factory tables", "no alembic_version table",
                    "nothing was changed")
    assert _tables(db_url) == before  # not migrated over, no alembic_version made up
    eng = _raw(db_url)
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM prompt")).scalar() == 5
    eng.dispose()


@pytest.mark.parametrize("command", [["status"], ["db", "upgrade"], ["constitution", "record", "tiny"]])
def test_another_applications_database_is_refused(runner, home, db_url, monkeypatch, command):
    eng = _raw(db_url)
    with eng.begin() as c:
        c.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"))
        c.execute(sa.text("INSERT INTO users (id, name) VALUES (1, 'ada')"))
    eng.dispose()
    monkeypatch.setenv("CAI_DATABASE_URL", db_url)
    one_line_exit_2(invoke(runner, *command), "belongs to another application", "(users)", "nothing was changed")
    assert _tables(db_url) == {"users"}
    eng = _raw(db_url)
    with eng.connect() as c:
        assert c.execute(sa.text("SELECT name FROM users")).scalars().all() == ["ada"]
    eng.dispose()


def test_an_empty_database_is_still_set_up(runner, home, sqlite_url, monkeypatch):
    sqlite3.connect(sqlite_path(sqlite_url)).close()  # an empty file is no other application's
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    assert invoke(runner, "db", "upgrade").exit_code == 0
    assert "alembic_version" in _tables(sqlite_url)


# --- only our own errors become one line ---------------------------------------------------

def test_a_bug_keeps_its_traceback_and_our_errors_are_one_line(capsys):
    import typer

    from flows.cli.common import guarded
    from flows.common import UserError
    from training.checkpoint import CheckpointError

    def raising(exc):
        @guarded
        def command():
            raise exc
        return command

    for bug in (KeyError("stage"), IndexError("list index out of range"), LookupError("x")):
        with pytest.raises(type(bug)):
            raising(bug)()
    for ours in (UserError("--out x: bad"), CheckpointError("run/checkpoints/step-2/meta.json: not metadata")):
        with pytest.raises(typer.Exit) as e:
            raising(ours)()
        assert e.value.exit_code == 2
        err = capsys.readouterr().err
        assert err == f"error: {ours}\n"


def test_a_tampered_checkpoint_is_one_line(runner, home, sqlite_url, monkeypatch):
    """`cai train --resume` over a checkpoint whose metadata is not ours: one line, exit 2."""
    import flows.pair_selection
    import flows.train

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    from training.checkpoint import META_FILE, STATE_FILE

    ckpt = home / "work" / "runs" / "x" / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / META_FILE).write_text("[1, 2]")
    (ckpt / STATE_FILE).write_bytes(b"")
    monkeypatch.setattr(flows.pair_selection, "load_examples", lambda cfg: ([], []))  # no pairs needed to reach it

    def train_flow(cfg):
        from training.checkpoint import latest_checkpoint, read_meta

        return read_meta(latest_checkpoint(Path(cfg.out) / "checkpoints")[0])

    monkeypatch.setattr(flows.train, "train_flow", train_flow)
    monkeypatch.setattr("flows.cli.training.preflight_model", lambda spec: None)
    one_line_exit_2(invoke(runner, "train", "--out", "runs/x", "--resume"), f"{META_FILE}: not checkpoint metadata")


# --- item 9: `cai run` never prints a password ----------------------------------------------

def test_run_masks_the_database_password(runner, home, sqlite_url, monkeypatch):
    import flows.generate
    import flows.pipeline

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    monkeypatch.setattr(flows.generate, "load_inputs", lambda cfg: None)
    monkeypatch.setattr(flows.pipeline, "pipeline_flow", lambda cfg: {
        "database": "postgresql+psycopg://cai:s3cret-pw@db.example:5432/cai", "dataset": "exports/x",
        "model": "runs/x", "report": "reports/x", "results": {}, "timings_s": {"generate": 1}})
    r = invoke(runner, "run", "--model", "smollm2-135m")
    assert r.exit_code == 0, r.output
    assert "s3cret-pw" not in r.output
    assert "postgresql+psycopg://cai:***@db.example:5432/cai" in r.stdout


def test_shown_url_masks_passwords():
    from store.db import shown_url

    assert shown_url("postgresql+psycopg://u:p%40ss@h:5432/d") == "postgresql+psycopg://u:***@h:5432/d"
    assert shown_url("sqlite:////tmp/cai.db") == "sqlite:////tmp/cai.db"


def test_get_engine_still_works_for_an_existing_store(sqlite_url):
    seed(sqlite_url)
    reset_engines()
    assert get_engine(sqlite_url) is not None and counts(sqlite_url)["prompts"] == 5
