"""`cai schedule generate --cron ...` against a real Prefect server creates scheduled runs."""

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
