"""`cai schedule generate --cron ...` against a real Prefect server creates scheduled runs, and a
run of the served deployment completes and stores its rows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]
CAI = [sys.executable, "-m", "flows.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, procs=()):
    end = time.time() + timeout
    while time.time() < end:
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read() if p.stdout else ""
                pytest.fail(f"{what}: process exited early with {p.returncode}:\n{out[-3000:]}")
        try:
            value = pred()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.mark.prefect_server
def test_schedule_creates_deployment_with_scheduled_runs(tmp_path, sqlite_url):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "CAI_DATABASE_URL": sqlite_url,
    }
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120, "prefect server", [server])
        serve = subprocess.Popen(CAI + ["schedule", "generate", "--cron", "0 3 * * *", "--constitution", "harmless",
                                        "--prompts", "red-team", "--set", "limit=2", "--set", "rounds=1",
                                        "--name", "nightly-harmless"],
                                 env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)

        def deployment():
            r = httpx.get(f"{api}/deployments/name/generate/nightly-harmless", timeout=5)
            return r.json() if r.status_code == 200 else None

        dep = _wait(deployment, 120, "the deployment", [serve])
        assert dep["parameters"]["cfg"]["constitution"] == "harmless"
        assert dep["parameters"]["cfg"]["limit"] == 2
        crons = [s["schedule"].get("cron") for s in dep["schedules"]]
        assert crons == ["0 3 * * *"]

        def scheduled_runs():
            r = httpx.post(f"{api}/flow_runs/filter", timeout=5,
                           json={"deployments": {"id": {"any_": [dep["id"]]}},
                                 "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
            runs = r.json()
            return runs if runs else None

        runs = _wait(scheduled_runs, 90, "scheduled flow runs")
        times = sorted(r["expected_start_time"] for r in runs)
        assert all("T03:00:00" in t for t in times), times
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)


@pytest.mark.prefect_server
def test_a_served_run_completes_and_stores_its_rows(tmp_path, sqlite_url, tiny_model_dir):
    """The scheduled deployment's run is executed by `cai schedule` itself (the serving process) and
    reaches Completed, with a completed generate Run and its responses in the store."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # serve looks for runs to start every 2 s (default 10)
        "CAI_DATABASE_URL": sqlite_url,
    }
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 120, "prefect server", [server])
        serve = subprocess.Popen(CAI + ["schedule", "generate", "--cron", "0 3 * * *", "--constitution", "harmless",
                                        "--prompts", "red-team", "--name", "served", "--set", f"model={tiny_model_dir}",
                                        "--set", "limit=1", "--set", "rounds=1",
                                        "--set", "initial.max_new_tokens=8", "--set", "critique.max_new_tokens=8",
                                        "--set", "revision.max_new_tokens=8"],
                                 env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)

        def deployment():
            r = httpx.get(f"{api}/deployments/name/generate/served", timeout=5)
            return r.json() if r.status_code == 200 else None

        dep = _wait(deployment, 120, "the deployment", [serve])
        # a run of the deployment due now (rather than at 03:00): what the schedule makes, on demand
        for _ in range(10):  # a busy 2-core box can make the server answer 503 for a moment: ask again
            r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", timeout=10, json={})
            if r.status_code < 500:
                break
            time.sleep(2)
        assert r.status_code in (200, 201), r.text
        run_id = r.json()["id"]

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]
            if state["type"] in ("FAILED", "CRASHED", "CANCELLED"):
                out = ""
                if serve.poll() is not None and serve.stdout:
                    out = serve.stdout.read()[-3000:]
                pytest.fail(f"the served run ended {state['type']}: {state.get('message')}\n{out}")
            return state if state["type"] == "COMPLETED" else None

        _wait(finished, 90, "the served flow run to complete", [serve])
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
    eng = sa.create_engine(sqlite_url)
    with eng.connect() as c:
        runs = c.execute(sa.text("SELECT status, model FROM run WHERE flow = 'generate'")).all()
        kinds = dict(c.execute(sa.text("SELECT kind, count(*) FROM response GROUP BY kind")).all())
    eng.dispose()
    assert runs == [("completed", str(tiny_model_dir))]
    assert kinds == {"initial": 1, "critique": 1, "revision": 1}
