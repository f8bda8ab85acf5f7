"""Issue 34 item 12b: a SIGKILLed command leaves no temporary Prefect server behind.

With CAI_PREFECT=always and no PREFECT_API_URL, a command starts its own Prefect server (a
`uvicorn prefect.server...` child). `kill -9` of the command (an OOM killer, a lost terminal) used
to leave that server running for ever, holding ~200 MB and a port; every such kill added one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _servers(pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if "prefect.server" in " ".join(k.cmdline()):
                out.append(k)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.prefect_server
def test_a_sigkilled_command_leaves_no_prefect_server(tmp_path, tiny_model_dir):
    env = os.environ | {"CAI_DATABASE_URL": f"sqlite:///{tmp_path / 'cai.db'}", "CAI_PREFECT": "always",
                        "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "generate", "--model", str(tiny_model_dir), "--prompts", "red-team",
           "--limit", "24", "--rounds", "1", "--chunk-size", "2", "--max-new-tokens", "24"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not servers:
            servers = _servers(proc.pid)
            time.sleep(0.1)
        assert servers, "the command never started its temporary Prefect server"
        time.sleep(2)  # the server is up and serving, the command at work
        assert proc.poll() is None and all(_alive(s) for s in servers)
        proc.send_signal(signal.SIGKILL)  # what an OOM killer does: no handler, no cleanup
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(s) for s in servers):
            time.sleep(0.1)
        left = [s.pid for s in servers if _alive(s)]
        assert not left, f"the temporary Prefect server(s) {left} outlived the killed command"
    finally:
        if proc.poll() is None:
            proc.kill()
        for s in servers:  # a server that did outlive it is not left to the next test
            if _alive(s):
                s.kill()
