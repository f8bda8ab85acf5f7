"""SIGTERM and Ctrl-C stop a command within seconds, mark its run `stopped`, and a rerun resumes.

Real `cai` processes on a tiny random model: a process manager sends SIGTERM to the command's
pid, a terminal sends SIGINT; either arrives in the middle of generation or of a training step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]


def _env(url: str, tmp: Path) -> dict[str, str]:
    env = os.environ | {"CAI_DATABASE_URL": url, "PREFECT_HOME": str(tmp / "prefect"),
                        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "prefect" / "results")}
    for key in ("PREFECT_API_URL", "CAI_PREFECT"):  # the default: no Prefect server at all
        env.pop(key, None)
    return env


def _rows(url: str, sql: str) -> list[tuple]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql)).all()]
    except sa.exc.DBAPIError:
        return []  # the run is still creating its tables
    finally:
        eng.dispose()


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the command finished before it could be stopped; make it longer"
    assert ready(), "the command never got going"


def _stop(proc: subprocess.Popen, signum: int) -> float:
    """Send `signum` to the command alone (as systemd or `kill` does) and time its exit."""
    t0 = time.monotonic()
    proc.send_signal(signum)
    proc.wait(timeout=60)
    return time.monotonic() - t0


def _generate(model: Path, n: int) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "generate", "--model", str(model), "--prompts", "red-team",
            "--limit", str(n), "--rounds", "1", "--chunk-size", "2", "--max-new-tokens", "24"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_generation_stops_within_seconds_and_the_rerun_finishes(tmp_path, tiny_model_dir, signum):
    url = f"sqlite:///{tmp_path / 'cai.db'}"
    env = _env(url, tmp_path)
    n = 24
    proc = subprocess.Popen(_generate(tiny_model_dir, n), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(proc, lambda: len(_rows(url, "SELECT id FROM response")) >= 4)
    took = _stop(proc, signum)
    stderr = proc.stderr.read()
    assert took < 5, f"took {took:.1f}s to stop"
    assert proc.returncode == 128 + signum, stderr
    assert "stopped" in stderr and "Traceback" not in stderr, stderr
    assert _rows(url, "SELECT status FROM run WHERE flow = 'generate'") == [("stopped",)]
    kept = {r[0] for r in _rows(url, "SELECT id FROM response")}
    assert kept, "what was written before the signal is kept"

    done = subprocess.run(_generate(tiny_model_dir, n), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    rows = _rows(url, "SELECT id, prompt_id, kind, round FROM response")
    assert kept <= {r[0] for r in rows}
    per_stage = Counter((kind, rnd) for _, _, kind, rnd in rows)
    assert per_stage == {("initial", 0): n, ("critique", 1): n, ("revision", 1): n}, per_stage
    assert max(Counter(r[1:] for r in rows).values()) == 1, "nothing computed twice"
    assert _rows(url, "SELECT count(*) FROM claim") == [(0,)]
    statuses = sorted(s for (s,) in _rows(url, "SELECT status FROM run WHERE flow = 'generate'"))
    assert statuses == ["completed", "stopped"]


@pytest.mark.slow
def test_sigterm_mid_training_stops_within_seconds_and_a_rerun_trains(tmp_path, tiny_model_dir):
    url = f"sqlite:///{tmp_path / 'cai.db'}"
    env = _env(url, tmp_path)
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"Question number {i}: how do plants grow?",
                                "chosen": "They use light, water and air to make sugar. " * 3,
                                "rejected": "No."}) + "\n")

    def train(*extra: str) -> list[str]:
        return [sys.executable, "-m", "flows.cli", "train", "--base", str(tiny_model_dir), "--dataset", str(data),
                "--stage", "sft+dpo", "--out", str(tmp_path / "model"), *extra]

    # far more steps than the test waits for: the signal always lands mid-training
    proc = subprocess.Popen(train("--set", "sft.max_steps=100000", "--set", "sft.eval_every=100000"), cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, lambda: len(_rows(url, "SELECT step FROM training_step")) >= 5)
    took = _stop(proc, signal.SIGTERM)
    stderr = proc.stderr.read()
    assert took < 5, f"took {took:.1f}s to stop"
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr, stderr
    assert _rows(url, "SELECT status FROM run WHERE flow = 'train'") == [("stopped",)]
    assert _rows(url, "SELECT status FROM training_run") == [("stopped",)]
    assert not (tmp_path / "model" / "config.json").exists(), "no half-trained model is left as if finished"

    done = subprocess.run(train("--set", "sft.max_steps=3", "--max-steps", "2"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(s for (s,) in _rows(url, "SELECT status FROM training_run")) == ["completed", "stopped"]
    assert (tmp_path / "model" / "config.json").exists()
