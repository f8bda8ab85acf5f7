"""The HTTP side of the remote engine: one OpenAI-compatible endpoint, requests with retries, many in flight.

    from engines.http import Transport
    t = Transport("http://127.0.0.1:8000/v1", "smollm2-135m", headers={}, stats=EngineStats(), concurrency=8)
    replies = t.send_all([("/chat/completions", body), ...])   # each reply, or its exception, in order

A 429, a 5xx, a timeout, a dropped connection or a reply that is not a JSON object is retried with
exponential backoff and jitter, a `Retry-After` header honoured; a request that still fails is
`RemoteUnavailable` (retry_later: the endpoint, not the item, is at fault) and a 4xx other than
408/409/425/429 is `RequestRejected` (the request itself is wrong, not retried). After
`fail_fast_after` requests in a row failed, nothing is sent for `cooldown_s`. Every request's
usage (tokens from `usage`, retries, failures) goes to the caller's meter (engines.base.metered).
A request answered earlier in this process is answered from memory, and one that failed is
answered with its error once, unsent: the stage runner's item-by-item retry after a partly
failed batch sends nothing twice.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from engines.base import EngineStats, Meter, current_meter, record_usage

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx
REMEMBERED = 8192  # replies kept for the item-by-item retry of a partly failed batch


class RemoteError(RuntimeError):
    """A request the endpoint did not answer as asked."""

    retry_later = False  # True: the endpoint, not the item, is at fault; a rerun should try again
    fatal = False  # True: a setting is wrong; the stage stops instead of failing every item


class RemoteUnavailable(RemoteError):
    """Still failing after every retry (429, 5xx, timeouts, dropped connections, malformed replies)."""

    retry_later = True


class RequestRejected(RemoteError):
    """A 4xx: the request itself is wrong (too long a prompt, an unknown parameter); not retried."""


class RemoteSetupError(RemoteError):
    """The endpoint cannot do what a setting asks (e.g. continue an assistant prefix)."""

    fatal = True


class BatchIncomplete(RemoteError):
    """Some requests of a batch failed; the ones that succeeded are kept for the item-by-item retry."""

    def __init__(self, failed: int, total: int, first: Exception) -> None:
        super().__init__(f"{failed} of {total} requests failed ({first.__class__.__name__}: {first})")
        self.retry_later = getattr(first, "retry_later", False)


def endpoint_label(base_url: str) -> str:
    """The URL as the ledger and logs name it: no user, password, query or fragment."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def retry_after_s(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half of base * 2**attempt (capped) fixed, half random."""
    step = min(cap, base * 2 ** attempt)
    return step / 2 + rng.uniform(0, step / 2)


def _key(path: str, body: dict) -> str:
    return hashlib.sha256((path + json.dumps(body, sort_keys=True)).encode()).hexdigest()


class Transport:
    """Requests to one endpoint: `concurrency` in flight, retries, fail-fast, usage metering."""

    def __init__(self, base_url: str, served: str, headers: dict[str, str], stats: EngineStats, *,
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, fail_fast_after: int = 32, cooldown_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint_label(self.base_url)
        self.served = served
        self.stats = stats
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
                                    limits=httpx.Limits(max_connections=concurrency,
                                                        max_keepalive_connections=concurrency))
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff_s, max_backoff_s
        self.fail_fast_after, self.cooldown_s = fail_fast_after, cooldown_s
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cai-remote")
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._done: OrderedDict[str, dict] = OrderedDict()  # request key -> reply
        self._failed: dict[str, Exception] = {}  # request key -> its final error, answered once without sending
        self._streak = 0  # requests in a row that failed after their retries
        self._quiet_until = 0.0
        for k in ("requests", "retries", "failures"):
            stats.extra.setdefault(k, 0)

    def post(self, path: str, body: dict, meter: Meter | None) -> dict:
        """POST `body` to base_url + path (or to `path` if it is a URL): the parsed reply, or
        RemoteUnavailable (retries spent) / RequestRejected (a 4xx, not retried)."""
        url = self.base_url + path if path.startswith("/") else path
        with self._lock:
            quiet = self._streak >= self.fail_fast_after and time.monotonic() < self._quiet_until
            streak = self._streak
        if quiet:  # the endpoint is down: fail at once instead of spending every retry on it
            record_usage(self.endpoint, self.served, meter, failures=1)
            raise RemoteUnavailable(f"not sent: the last {streak} requests to {self.endpoint} all failed; "
                                    "a rerun tries again")
        retries = 0
        err = ""
        for attempt in range(self.max_retries + 1):
            wait: float | None = None
            try:
                r = self._client.post(url, json=body)
            except httpx.TimeoutException as exc:
                err = f"timed out ({exc.__class__.__name__})"
            except httpx.TransportError as exc:  # refused, reset, dropped mid-reply, protocol errors
                err = f"connection failed ({exc.__class__.__name__}: {exc})"
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                        if not isinstance(data, dict):
                            raise ValueError("not a JSON object")
                    except ValueError as exc:
                        err = f"malformed reply ({exc}): {r.text[:120]!r}"
                    else:
                        self._count(meter, data, retries, failed=False)
                        return data
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    err = f"HTTP {r.status_code}: {_message(r)}"
                    wait = retry_after_s(r.headers.get("retry-after"))
                else:
                    self._count(meter, {}, retries, failed=True, streak=False)
                    raise RequestRejected(f"HTTP {r.status_code} from {self.endpoint}{path}: {_message(r)}")
            if attempt == self.max_retries:
                break
            delay = backoff_s(attempt, self.backoff, self.max_backoff, self._rng)
            if wait is not None:  # the server's own figure wins, plus a little jitter so clients spread out
                delay = wait + self._rng.uniform(0, min(1.0, self.backoff))
            log.debug("%s%s: %s; retry %d in %.1fs", self.endpoint, path, err, attempt + 1, delay)
            time.sleep(delay)
            retries += 1
        self._count(meter, {}, retries, failed=True)
        raise RemoteUnavailable(f"{self.endpoint}{path}: {err} (after {retries + 1} attempts)")

    def _count(self, meter: Meter | None, data: dict, retries: int, failed: bool, streak: bool = True) -> None:
        usage = data.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        with self._lock:
            self.stats.extra["requests"] += 1
            self.stats.extra["retries"] += retries
            self.stats.extra["failures"] += int(failed)
            self.stats.prompt_tokens += prompt
            self.stats.completion_tokens += completion
            if failed and streak:
                self._streak += 1
                if self._streak >= self.fail_fast_after:
                    self._quiet_until = time.monotonic() + self.cooldown_s
            elif not failed:
                self._streak = 0
        record_usage(self.endpoint, self.served, meter, requests=1, prompt_tokens=prompt, completion_tokens=completion,
                     retries=retries, failures=int(failed))

    def send_all(self, requests: list[tuple[str, dict]]) -> list[dict | Exception]:
        """Every (path, body), `concurrency` at a time; each reply or its exception, in order.

        A request answered earlier in this process (an item-by-item retry after BatchIncomplete)
        is answered from memory; one that failed is answered with its error once, unsent."""
        meter = current_meter()  # worker threads do not inherit the caller's context
        keys = [_key(p, b) for p, b in requests]
        out: list[dict | Exception | None] = [None] * len(requests)
        todo = []
        with self._lock:
            for i, k in enumerate(keys):
                if k in self._done:
                    out[i] = self._done[k]
                elif k in self._failed:
                    out[i] = self._failed.pop(k)
                else:
                    todo.append(i)

        def one(i: int) -> dict | Exception:
            try:
                return self.post(*requests[i], meter)
            except RemoteError as exc:
                return exc

        results = list(self._pool.map(one, todo)) if len(todo) > 1 else [one(i) for i in todo]
        with self._lock:
            for i, res in zip(todo, results, strict=True):
                out[i] = res
                if isinstance(res, Exception):
                    self._failed[keys[i]] = res
                else:
                    self._done[keys[i]] = res
                    self._done.move_to_end(keys[i])
            while len(self._done) > REMEMBERED:
                self._done.popitem(last=False)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def finish(outs: list[Any | Exception]) -> list[Any]:
    """The results, or BatchIncomplete when some failed (one request: its own error)."""
    bad = [o for o in outs if isinstance(o, Exception)]
    if not bad:
        return outs
    if any(getattr(b, "fatal", False) for b in bad):
        raise next(b for b in bad if getattr(b, "fatal", False))
    if len(outs) == 1:
        raise bad[0]
    raise BatchIncomplete(len(bad), len(outs), bad[0])


def _message(r: httpx.Response) -> str:
    """The error text of a reply, short and on one line."""
    try:
        data = r.json()
        msg = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        text = str(msg)
    except ValueError:
        text = r.text
    return " ".join(text.split())[:300]
