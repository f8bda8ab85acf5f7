"""Local HTTP servers for the remote-engine tests: a fake OpenAI-compatible upstream and a fault proxy.

    with FakeUpstream() as up, FaultProxy(up.url, faults={"429": 0.2, "drop": 0.1}) as proxy:
        eng = engines.load("m", engine="openai", base_url=proxy.url + "/v1", server="vllm", timeout_s=1)

FakeUpstream answers /v1/chat/completions, /v1/completions and /tokenize deterministically (the
text depends on the request, so replies are reproducible), with `usage`, `n`, top log-probs and
vLLM's prompt log-probs. kind="vllm" takes vLLM's extra parameters; kind="openai" refuses them
with a 400 (as a strict hosted API does) and has no prompt log-probs; kind="generic" ignores
them and gives no log-probs at all.

FaultProxy forwards to an upstream and injects faults on the first attempt of chosen requests:
429 with Retry-After, 500, a reply slower than the client's timeout, a dropped connection and a
200 with malformed JSON: by share of requests (`faults`, chosen by a hash of the body, so a test
is reproducible) or in turn (`cycle`: the k-th distinct request gets cycle[k % len(cycle)]).
It counts attempts and successful forwards per request body: `duplicates()` lists
the bodies that were answered successfully more than once (a request sent twice).
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

VLLM_ONLY = {"continue_final_message", "add_generation_prompt", "repetition_penalty", "prompt_logprobs",
             "return_token_ids", "stop_token_ids"}


def _h(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12], 16)


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; a context manager."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        outer = self

        class Handler(self.handler):  # type: ignore[name-defined, misc]
            server_obj = outer

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _json(handler: BaseHTTPRequestHandler, status: int, data, headers: dict | None = None) -> None:
    body = json.dumps(data).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


class _UpstreamHandler(BaseHTTPRequestHandler):
    server_obj: FakeUpstream
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            _json(self, 200, {"object": "list", "data": [{"id": "any", "object": "model"}]})
        else:
            _json(self, 404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        up = self.server_obj
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with up.lock:
            up.requests.append((self.path, body, dict(self.headers)))
        if up.delay_s:
            time.sleep(up.delay_s)
        extra = VLLM_ONLY & set(body)
        if up.kind == "openai" and extra:
            msg = f"Unrecognized request argument supplied: {sorted(extra)[0]}"
            return _json(self, 400, {"error": {"message": msg}})
        if self.path == "/tokenize":
            if up.kind != "vllm":
                return _json(self, 404, {"error": {"message": "not found"}})
            text = body.get("prompt") or json.dumps(body.get("messages"))
            return _json(self, 200, {"tokens": up.tokens(text), "count": 0, "max_model_len": 4096})
        if self.path == "/v1/completions":
            return _json(self, 200, up.completion(body))
        if self.path == "/v1/chat/completions":
            return _json(self, 200, up.chat(body))
        return _json(self, 404, {"error": {"message": f"no route {self.path}"}})


class FakeUpstream(_Server):
    """A deterministic OpenAI-compatible server (see the module docstring)."""

    handler = _UpstreamHandler

    def __init__(self, kind: str = "vllm", delay_s: float = 0.0, words: int = 6) -> None:
        self.kind, self.delay_s, self.words = kind, delay_s, words
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict, dict]] = []
        super().__init__()

    def tokens(self, text: str) -> list[int]:
        return [100 + (ord(c) % 400) for c in text]

    def _text(self, key, max_tokens: int) -> tuple[str, str]:
        n = min(self.words, max_tokens)
        words = [f"w{_h(key, i) % 1000}" for i in range(n)]
        return " ".join(words), "length" if n == max_tokens else "stop"

    def chat(self, body: dict) -> dict:
        msgs = body.get("messages") or []
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or 16)
        choices = []
        for j in range(n):
            text, reason = self._text([msgs, body.get("seed"), body.get("temperature"), j], max_tokens)
            if msgs and msgs[-1]["role"] == "assistant" and body.get("continue_final_message") and self.kind == "vllm":
                text = " " + text  # a continuation of the prefix
            choice = {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            if body.get("logprobs") and self.kind != "generic":
                choice["logprobs"] = {"content": self._answer_logprobs(msgs, int(body.get("top_logprobs") or 1))}
                choice["message"]["content"] = "(A)" if choice["logprobs"]["content"][1]["token"] == "A" else "(B)"
            elif self.kind == "generic" and msgs and "Answer with (A) or (B)" in msgs[-1]["content"]:
                choice["message"]["content"] = "(B) is better" if _h(msgs) % 2 else "I think (A)."
            choices.append(choice)
        prompt_tokens = sum(len(m["content"]) // 4 + 4 for m in msgs)
        out = {"id": "fake", "object": "chat.completion", "model": body.get("model"), "choices": choices,
               "usage": {"prompt_tokens": prompt_tokens,
                         "completion_tokens": sum(len(c["message"]["content"].split()) for c in choices)}}
        if self.kind == "vllm" and body.get("prompt_logprobs") is not None:
            out["prompt_logprobs"] = [None] + [{"1": {"logprob": -1.0}}] * 3
        return out

    def _answer_logprobs(self, msgs, k: int) -> list[dict]:
        """A reply "(A)" or "(B)": the first token "(" is shared, the second parts the choices."""
        p_a = 0.05 + 0.9 * ((_h(msgs) % 1000) / 1000)
        la, lb = math.log(p_a * 0.9), math.log((1 - p_a) * 0.9)
        first = {"token": "(", "logprob": -0.01, "top_logprobs": [{"token": "(", "logprob": -0.01},
                                                                  {"token": "The", "logprob": -5.0}][:k]}
        cands = sorted([{"token": "A", "logprob": la}, {"token": "B", "logprob": lb},
                        {"token": "Both", "logprob": math.log(0.1)}], key=lambda c: -c["logprob"])[:k]
        best = cands[0]
        second = {"token": best["token"], "logprob": best["logprob"], "top_logprobs": cands}
        return [first, second, {"token": ")", "logprob": -0.001, "top_logprobs": [{"token": ")", "logprob": -0.001}]}]

    def completion(self, body: dict) -> dict:
        prompt = body.get("prompt")
        ids = prompt if isinstance(prompt, list) else self.tokens(str(prompt))
        max_tokens = int(body.get("max_tokens") or 16)
        text, reason = self._text([ids, body.get("seed")], max_tokens)
        choice = {"index": 0, "text": text, "finish_reason": reason}
        if self.kind == "vllm" and body.get("prompt_logprobs") is not None:
            # a deterministic stand-in for a model: each token's log-prob from the tokens before it
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": -0.05 - (_h(ids[:i], t) % 400) / 100, "rank": 1}} for i, t in enumerate(ids)
                if i > 0]
        return {"id": "fake", "object": "text_completion", "model": body.get("model"), "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(text.split())}}


FAULTS = ("429", "500", "slow", "drop", "malformed")


class _ProxyHandler(BaseHTTPRequestHandler):
    server_obj: FaultProxy
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        r = httpx.get(self.server_obj.upstream + self.path, timeout=30)
        _json(self, r.status_code, r.json())

    def do_POST(self) -> None:  # noqa: N802
        px = self.server_obj
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        key = hashlib.sha256(self.path.encode() + raw).hexdigest()
        fault = px.fault_for(key, raw)
        with px.lock:
            px.attempts[key] += 1
            px.faults_sent[fault or "none"] += 1
            if fault:
                px.fault_keys.add(key)
        if fault == "429":
            return _json(self, 429, {"error": {"message": "rate limited"}}, {"Retry-After": str(px.retry_after)})
        if fault == "500":
            return _json(self, 500, {"error": {"message": "internal error"}})
        if fault == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        if fault == "slow":
            time.sleep(px.slow_s)  # past the client's timeout: it has given up and retries
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        r = httpx.post(px.upstream + self.path, content=raw, headers=headers, timeout=600)
        if fault == "malformed":
            data = b'{"choices": [ {"index": 0, "message": '  # cut short: not JSON
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        if r.status_code == 200 and fault != "slow":
            with px.lock:
                px.successes[key] += 1
                px.bodies[key] = (self.path, raw)
        try:
            _json(self, r.status_code, r.json())
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (slow): not delivered
            pass


class FaultProxy(_Server):
    """Forwards to `upstream`, injecting faults (see the module docstring).

    faults: fault name -> share of distinct requests that get it on their first `times` attempts
    (the shares are taken in FAULTS order from one hash of the body). always_fail: a predicate on
    the raw body; a matching request gets a 500 on every attempt (a failure row)."""

    handler = _ProxyHandler

    def __init__(self, upstream: str, faults: dict[str, float] | None = None, times: int = 1,
                 retry_after: int = 1, slow_s: float = 2.0, always_fail=None,
                 cycle: list[str | None] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults or {}
        self.cycle = cycle
        self.order: dict[str, int] = {}  # distinct request -> its arrival rank
        unknown = set(self.faults) - set(FAULTS)
        assert not unknown, unknown
        self.times, self.retry_after, self.slow_s = times, retry_after, slow_s
        self.always_fail = always_fail
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.successes: Counter[str] = Counter()
        self.faults_sent: Counter[str] = Counter()
        self.fault_keys: set[str] = set()
        self.bodies: dict[str, tuple[str, bytes]] = {}
        self.seen: Counter[str] = Counter()
        super().__init__()

    def fault_for(self, key: str, raw: bytes) -> str | None:
        if self.always_fail is not None and self.always_fail(raw):
            # before ranking: a request that always fails takes no place in `cycle`, whose faults then
            # reach the other requests whatever order concurrent requests arrive in
            return "500"
        with self.lock:
            attempt = self.seen[key]
            self.seen[key] += 1
            rank = self.order.setdefault(key, len(self.order))
        if self.cycle:
            return self.cycle[rank % len(self.cycle)] if attempt < self.times else None
        u = (int(key[:8], 16) % 10_000) / 10_000
        edge = 0.0
        chosen = None
        for name in FAULTS:
            edge += self.faults.get(name, 0.0)
            if u < edge:
                chosen = name
                break
        if chosen and attempt < self.times:
            return chosen
        return None

    def duplicates(self) -> dict[str, int]:
        """Request bodies answered with a 200 more than once: requests sent twice."""
        return {k: n for k, n in self.successes.items() if n > 1}
