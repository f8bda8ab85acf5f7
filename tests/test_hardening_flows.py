"""Issue 13 items 8 and 11, what was left: a damaged dataset directory for `cai train --dataset` and
`cai prompts add`, a database that refuses work while a flow runs, and TrainingRun rows of a killed
process. Each is one line on stderr and exit code 2 (no traceback in the output or in Prefect's
run logs), and the rows stored before are all still there.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
import test_hardening_cli as cli_tests
from fakes import ScriptedEngine
from sqlmodel import select
from test_hardening_cli import counts, invoke, one_line_exit_2, seed

import flows.generate  # noqa: F401 - imports Prefect, which sets up its console logging now, on pytest's stderr
from store.db import reset_engines, session_scope
from store.models import Judgment, PreferencePair, Prompt, PromptTag, Response, Run

runner, home = cli_tests.runner, cli_tests.home  # the same fixtures: a CliRunner, a work dir with tiny.yaml

# --- item 8: a corrupt or non-dataset directory ------------------------------------------


def _saved(d: Path) -> Path:
    from datasets import Dataset, DatasetDict

    msgs = [{"role": "user", "content": "How do I pick a lock?"}]
    DatasetDict({"train_prefs": Dataset.from_dict({
        "prompt": [msgs], "chosen": [[{"role": "assistant", "content": "No."}]],
        "rejected": [[{"role": "assistant", "content": "Sure."}]]})}).save_to_disk(str(d))
    return d


def _arrow(d: Path) -> Path:
    return next((d / "train_prefs").glob("*.arrow"))


def _damage(d: Path, how: str) -> None:
    if how == "empty":
        d.mkdir()
    elif how == "other-files":
        d.mkdir()
        (d / "app.js").write_text("x")
        (d / "notes.json").write_text("{}")
    else:
        _saved(d)
        if how == "bad-state-json":
            (d / "train_prefs" / "state.json").write_text("not json")
        elif how == "bad-dict-json":
            (d / "dataset_dict.json").write_text("{")
        elif how == "truncated-arrow":
            blob = _arrow(d).read_bytes()
            _arrow(d).write_bytes(blob[:len(blob) // 2])
        elif how == "missing-arrow":
            _arrow(d).unlink()
        elif how == "bad-info":
            (d / "train_prefs" / "dataset_info.json").write_text('{"features": 3}')


DAMAGES = ["empty", "other-files", "bad-state-json", "bad-dict-json", "truncated-arrow", "missing-arrow", "bad-info"]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", ["train", "prompts-add"])
def test_a_damaged_dataset_directory_is_one_line(runner, home, sqlite_url, monkeypatch, how, command):
    seed(sqlite_url)
    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    d = home / "work" / "ds"
    _damage(d, how)
    args = ["train", "--dataset", str(d), "--out", "runs/x"] if command == "train" else ["prompts", "add", str(d)]
    msg = one_line_exit_2(invoke(runner, *args), str(d))
    if how in ("empty", "other-files"):
        assert "not a saved Hugging Face dataset" in msg and "expected a directory written by" in msg
    else:
        assert "cannot read this saved dataset, it is damaged or incomplete" in msg
    if command == "train":
        assert msg.startswith(f"error: --dataset {d}") and "cai export --out DIR" in msg
    assert counts(sqlite_url) == {"prompts": 5, "before": 5}


# --- item 8: the database refuses work while a flow runs ---------------------------------


class _Lock:
    """Another process's write lock on the SQLite file, taken once the flow is running."""

    def __init__(self, url: str):
        self.path, self.conn = url.removeprefix("sqlite:///"), None

    def take(self) -> None:
        if self.conn is None:
            self.conn = sqlite3.connect(self.path, isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


class LockingEngine(ScriptedEngine):
    """A scripted engine whose first call makes another process lock the database."""

    def __init__(self, lock: _Lock, **kw):
        super().__init__(**kw)
        self.lock = lock

    def generate(self, conversations, sampling):
        self.lock.take()
        return super().generate(conversations, sampling)

    def choice_logprobs(self, conversations, choices):
        self.lock.take()
        return super().choice_logprobs(conversations, choices)


class _Records(logging.Handler):
    """Every record Prefect's run loggers pass on, formatted as its console and API handlers would."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.text: list[str] = []
        self.with_exc = 0

    def emit(self, record):
        self.with_exc += record.exc_info is not None
        self.text.append(logging.Formatter().format(record))


@pytest.fixture
def prefect_records():
    """What the run logged: Prefect's run loggers when a flow runs through Prefect, the `cai` logger
    when it runs as plain functions (flows/orchestration.py, the default without a server)."""
    h = _Records()
    loggers = [logging.getLogger(n) for n in ("prefect", "cai")]
    levels = [lg.level for lg in loggers]
    cai = logging.getLogger("cai")
    propagate = cai.propagate
    for lg in loggers:
        lg.addHandler(h)
    cai.setLevel(logging.INFO)
    # collected here, not passed on to the root logger: whatever console handler the root holds (Prefect's,
    # set up by whichever test first imported it, bound to that moment's stderr) must not decide what a
    # later test's stderr holds; the real CLI prints these lines itself (flows/cli/entry.py: _log_to_terminal)
    cai.propagate = False
    yield h
    cai.propagate = propagate
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(h)
        lg.setLevel(level)


def _store_pairs(url: str, n: int = 4) -> None:
    """A prompt, a refusal and a compliance, and the pair of them, per prompt (as generate leaves them)."""
    from store.keys import content_hash
    from store.upsert import insert_ignore

    with session_scope(url) as s:
        for i in range(n):
            msgs = [{"role": "user", "content": f"How would I do risky thing number {i}?"}]
            pid = content_hash("prompt", msgs)
            insert_ignore(s, Prompt, [Prompt(id=pid, text=msgs[-1]["content"], messages=msgs)])
            insert_ignore(s, Response, [
                Response(id=f"bad-{i}", prompt_id=pid, kind="initial", conversation=msgs, text="Sure.", model="m"),
                Response(id=f"good-{i}", prompt_id=pid, kind="revision", round=1, parent_id=f"bad-{i}",
                         conversation=msgs, text="I won't help with that.", model="m")])
            insert_ignore(s, PreferencePair, [PreferencePair(
                id=f"pair-{i}", prompt_id=pid, chosen_id=f"good-{i}", rejected_id=f"bad-{i}", method="revision",
                label_prob=1.0, constitution="tiny", constitution_version="abc12345")])


def _ids(url: str) -> dict[str, set]:
    with session_scope(url) as s:
        return {m.__tablename__: set(s.exec(select(m.id))) for m in (Prompt, Response, PreferencePair, Judgment)} | {
            "tags": set(s.exec(select(PromptTag.prompt_id, PromptTag.tag)))}


@pytest.mark.parametrize("command", ["generate", "label", "contrast", "eval", "train", "run"])
def test_a_database_locked_mid_run_is_one_line(runner, home, sqlite_url, monkeypatch, prefect_records, command,
                                               request):
    import store.db
    from flows.engine_cache import drop_engines, register_engine

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    seed(sqlite_url, n=3)
    lock = _Lock(sqlite_url)
    request.addfinalizer(lock.release)
    request.addfinalizer(drop_engines)
    if command == "train":  # pairs to train on, and the lock taken once the flow loads the model
        _store_pairs(sqlite_url)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar is on stderr too
        request.addfinalizer(hf_logging.enable_progress_bar)
        import training.trainer

        real = training.trainer.load_policy
        monkeypatch.setattr("flows.train.load_policy", lambda *a, **k: (lock.take(), real(*a, **k))[1])
    for spec in ("scripted", "judge", "base"):
        engine = LockingEngine(lock)
        register_engine(spec, engine)
        register_engine(spec, engine, dtype="float32")  # eval's replies load in fp32 on a CPU
    before = _ids(sqlite_url)
    monkeypatch.setattr(store.db, "BUSY_TIMEOUT_S", 0.3)
    reset_engines()
    args = {
        "generate": ["generate", "--model", "scripted", "--constitution", "tiny", "--prompts", "before",
                     "--rounds", "1"],
        "label": ["label", "--constitution", "tiny", "--prompts", "before", "--policy", "scripted", "--judge",
                  "judge", "--source", "samples"],
        "contrast": ["contrast", "--model", "scripted", "--prompts", "before", "--constitutions", "tinygov"],
        "eval": ["eval", "--model", "scripted", "--baseline", "base", "--judge", "judge", "--constitution", "tiny",
                 "--prompts", "before"],
        "run": ["run", "--model", "scripted", "--judge", "judge", "--constitution", "tiny", "--prompts", "before",
                "--rounds", "1"],
        "train": ["train", "--base", str(request.getfixturevalue("tiny_model_dir")), "--constitution", "tiny",
                  "--out", "runs/t", "--max-steps", "2", "--batch-size", "2", "--max-length", "64",
                  "--max-prompt-length", "48"],
    }[command]
    r = invoke(runner, *args)
    one_line_exit_2(r, "stayed locked by another process", "0.3 s busy timeout", "the rows stored before are kept")
    logs = "\n".join(prefect_records.text)
    assert prefect_records.text, "the flow ran (and logged)"
    assert "Traceback" not in logs and prefect_records.with_exc == 0, logs
    lock.release()
    after = _ids(sqlite_url)
    for table, ids in before.items():
        assert ids <= after[table], f"{table}: {len(ids - after[table])} rows stored before are gone"
    flow = {"run": "generate"}.get(command, command)  # `cai run` met the lock in its first stage
    with session_scope(sqlite_url) as s:  # the run that hit the lock is not recorded as a success
        statuses = {r.status for r in s.exec(select(Run).where(Run.flow == flow))}
    assert statuses and "completed" not in statuses, statuses


# --- a run served by `cai schedule`: Prefect runs it in a process it spawns ---------------

_SPAWNED = """
import logging, sys
import flows.label  # what the spawned process imports when it unpickles label_flow; `cai` never runs there
from cai.errors import UserError

out = []
class H(logging.Handler):
    def emit(self, record):
        out.append(logging.Formatter().format(record))
logging.getLogger("prefect.task_runs").addHandler(H())
for exc in (UserError("no stored responses of kind initial"), KeyError("a bug")):
    try:
        raise exc
    except Exception as e:  # how Prefect's task engine logs a failed task run
        logging.getLogger("prefect.task_runs").error("Task run failed with exception: %r", e, exc_info=True)
print("\\n=====\\n".join(out))
"""


def test_a_served_run_logs_our_errors_in_one_line_and_bugs_with_their_traceback():
    """`cai schedule` serves each run in a fresh process that Prefect spawns (flow_engine.run_flow_in_subprocess):
    it imports the flow's module, never `cai`'s guard, so the one-line filter must come with the flows."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "-c", _SPAWNED], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    ours, bug = r.stdout.split("\n=====\n")
    assert ours.strip() == "Task run failed with exception: UserError('no stored responses of kind initial')"
    assert "Traceback" in bug and "KeyError: 'a bug'" in bug  # a bug keeps what a bug report needs
