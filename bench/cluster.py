"""Scale-out on one machine: a Prefect server, a process work pool, N `prefect worker` processes and one
store; one worker against two on the same `cai submit`, in one run. Prints one JSON line.

    python -m bench.cluster --prompts 24 --max-new-tokens 24                  # the tiny random model
    python -m bench.cluster --model smollm2-135m --prompts 16 --max-new-tokens 32
    CAI_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test python -m bench.cluster

Each case gets a fresh seed, so both compute the same amount of new work; by default each case submits
one run per worker (`cai submit --shards N`), the way the recipe in docs/guides/scaling.md does. The wall
time counts from `cai submit` to the last run completed, so it includes each flow run's start (Python imports, model
load), which a worker pays once per run. tests/flows/test_deploy.py uses the helpers below.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CAI = [sys.executable, "-m", "flows.cli"]
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A Prefect server and workers as subprocesses of this one; `stop()` ends them all."""

    def __init__(self, home: Path, db_url: str, extra_env: dict[str, str] | None = None):
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.home = home
        self.env = os.environ | {
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # workers look for runs every second (default 10)
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
            "CAI_DATABASE_URL": db_url,
            # the flow runs import this checkout (not another install of cai-factory)
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_WAIT_POLICY": "PASSIVE",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        } | (extra_env or {})
        self.env.pop("PREFECT__WORKER_NAME", None)
        self.port = port
        self.server: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs[name] = log
        with open(log, "w") as fh:
            return subprocess.Popen(cmd, env=self.env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def log_tail(self, name: str, n: int = 3000) -> str:
        try:
            return self.logs[name].read_text(errors="replace")[-n:]
        except (KeyError, OSError):
            return ""

    def start_server(self, timeout: float = 120) -> None:
        import httpx

        self.server = self._spawn("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                                             str(self.port)])

        def up() -> bool:
            try:
                return httpx.get(f"{self.api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout, "the Prefect server", lambda: self._check("server"))

    def _check(self, name: str) -> None:
        p = self.server if name == "server" else self.workers[name]
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")

    def cai(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(CAI + list(args), env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def start_worker(self, name: str, pool: str, limit: int = 1) -> None:
        self.workers[name] = self._spawn(name, [PREFECT, "worker", "start", "--pool", pool, "--name", name,
                                                "--limit", str(limit)])

    def workers_online(self, pool: str) -> set[str]:
        import httpx

        r = httpx.post(f"{self.api}/work_pools/{pool}/workers/filter", timeout=5, json={})
        return {w["name"] for w in r.json() if w.get("status") == "ONLINE"} if r.status_code == 200 else set()

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL a worker and every process under it (its flow runs): what a machine going down does."""
        import psutil

        p = self.workers[name]
        try:
            procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for q in procs:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        p.wait()
        return [q.pid for q in procs]

    def stop(self) -> None:
        for p in [*self.workers.values(), self.server]:
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def wait_for(pred: Callable[[], Any], timeout: float, what: str, check: Callable[[], None] | None = None,
             poll_s: float = 0.5) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check is not None:
            check()
        value = pred()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def flow_run_states(api: str, run_ids: list[str]) -> dict[str, str]:
    import httpx

    return {rid: httpx.get(f"{api}/flow_runs/{rid}", timeout=10).json()["state"]["type"] for rid in run_ids}


def submit(cluster: Cluster, deployment: str, shards: int, *settings: str) -> list[str]:
    args = ["submit", deployment, "--shards", str(shards)]
    for s in settings:
        args += ["--set", s]
    r = cluster.cai(*args)
    if r.returncode != 0:
        raise RuntimeError(f"cai submit failed ({r.returncode}): {r.stdout}{r.stderr}")
    return [line.split("(", 1)[1].split(")", 1)[0] for line in r.stdout.splitlines() if line.startswith("flow run ")]


def wait_completed(cluster: Cluster, run_ids: list[str], timeout: float) -> dict[str, str]:
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    def done():
        states = flow_run_states(cluster.api, run_ids)
        return states if all(s in final for s in states.values()) else None

    return wait_for(done, timeout, f"flow runs {run_ids} to finish", poll_s=1)


def progress(db_url: str, run_ids: set[str] | None = None) -> dict[str, dict[str, int]]:
    """worker -> {claimed, done, failed} summed over work_progress rows (of these cai runs, if given)."""
    import sqlalchemy as sa

    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as c:
            if not sa.inspect(c).has_table("work_progress"):
                return {}
            rows = c.execute(sa.text("SELECT run_id, worker, claimed, done, failed FROM work_progress")).all()
    finally:
        eng.dispose()
    out: dict[str, dict[str, int]] = {}
    for run_id, worker, claimed, done, failed in rows:
        if run_ids is not None and run_id not in run_ids:
            continue
        w = out.setdefault(worker, {"claimed": 0, "done": 0, "failed": 0})
        w["claimed"] += claimed
        w["done"] += done
        w["failed"] += failed
    return out


def run_times(db_url: str, workers: list[str]) -> list[dict[str, float]]:
    """Each cai run these workers started: model load and stage seconds (from its Run summary)."""
    import sqlalchemy as sa

    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as c:
            ids = {r for (r,) in c.execute(sa.text("SELECT DISTINCT run_id FROM work_progress WHERE worker IN :w")
                                           .bindparams(sa.bindparam("w", expanding=True)), {"w": workers})}
            rows = c.execute(sa.text("SELECT id, summary FROM run")).all()
    finally:
        eng.dispose()
    summaries = [json.loads(s) if isinstance(s, str) else (s or {}) for rid, s in rows if rid in ids]  # SQLite: text
    return [{"load_s": s.get("load_s"), "stages_s": s.get("total_s"), "computed": s.get("computed")}
            for s in summaries]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: a tiny random-weight model built here")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--runs", type=int, default=None, help="flow runs submitted per case (`--shards`); "
                    "default: one per worker")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cai-cluster-"))
    db_url = os.environ.get("CAI_DATABASE_URL") or f"sqlite:///{home / 'cai.db'}"
    model = args.model
    if model is None:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny import make_tiny_model

        from engines.bundled import gguf_tokenizer_dir

        model = str(make_tiny_model(home / "tiny", gguf_tokenizer_dir()))
    cluster = Cluster(home, db_url, {"CAI_CPU_DTYPE": "float32"})
    out: dict[str, Any] = {"bench": "cluster", "model": model if args.model else "tiny-random",
                           "prompts": args.prompts, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
                           "runs_per_case": args.runs or "one per worker", "cores": os.cpu_count(),
                           "store": db_url.split(":", 1)[0]}
    try:
        cluster.start_server()
        r = cluster.cai("deploy", "generate", "--pool", "bench", "--name", "bench", "--constitution", "harmless",
                        "--prompts", "red-team", "--set", f"model={model}", "--set", f"limit={args.prompts}",
                        "--set", f"rounds={args.rounds}", "--set", f"runner.chunk_size={args.chunk_size}",
                        "--set", "runner.show_progress=false",
                        *[x for k in ("initial", "critique", "revision")
                          for x in ("--set", f"{k}.max_new_tokens={args.max_new_tokens}")])
        if r.returncode != 0:
            raise RuntimeError(r.stdout + r.stderr)
        for n_workers in (1, 2):
            names = [f"bench-w{i}-{n_workers}" for i in range(n_workers)]
            for name in names:
                cluster.start_worker(name, "bench")
            wait_for(lambda names=names: set(names) <= cluster.workers_online("bench"), 120, "workers online")
            t0 = time.perf_counter()
            ids = submit(cluster, "generate/bench", args.runs or n_workers, f"seed={100 + n_workers}")
            states = wait_completed(cluster, ids, 1800)
            wall = time.perf_counter() - t0
            per = {w: v for w, v in progress(db_url).items() if w in names}  # names are per case
            out[f"workers_{n_workers}"] = {"wall_s": round(wall, 1), "states": sorted(states.values()),
                                           "done_per_worker": {w: v["done"] for w, v in sorted(per.items())},
                                           "runs": run_times(db_url, names)}
            for name in names:
                cluster.kill_worker(name)
        out["speedup"] = round(out["workers_1"]["wall_s"] / out["workers_2"]["wall_s"], 2)
    finally:
        cluster.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
