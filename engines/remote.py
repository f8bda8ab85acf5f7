"""The remote engine: any OpenAI-compatible HTTP endpoint (vLLM server, TGI, llama.cpp, Ollama, hosted APIs).

    cai label --set engine.backend=openai --set engine.settings.base_url=http://gpu-host:8000/v1
    cai label --set judge_engine.backend=openai --set judge_engine.settings.base_url=https://api.example.com/v1 \\
              --set judge_engine.settings.api_key_env=EXAMPLE_API_KEY --judge some-hosted-model

    from engines import load, Sampling
    eng = load("smollm2-135m", engine="openai", base_url="http://127.0.0.1:8000/v1")

The spec is the model name the endpoint serves (`served_model` overrides what is sent). The key
is read from the environment variable `api_key_env` names and lives only in this process's
request headers: never in settings, rows, logs, run configs or exports.

Requests go out `concurrency` at a time through engines/http.py: a 429, a 5xx, a timeout, a
dropped connection or a reply that is not the JSON expected is retried with exponential backoff
and jitter (a `Retry-After` header is honoured); a request that still fails after `max_retries`
raises `RemoteUnavailable` (retry_later: a rerun tries again) and a 4xx other than 408/409/425/429
raises `RequestRejected` (the request itself is wrong). A batch in which some requests failed
raises `BatchIncomplete`; the stage runner then asks again item by item, and every request that
succeeded is answered from memory, so no request is sent twice.

What the endpoint supports is probed once, on first need, and logged (`server: auto`); naming
the server kind (`vllm`, `openai`, `generic`) skips the probe:
- prompt log-probs (vLLM): choices are scored exactly as the hf engine scores them, the prompt
  rendered with the model's chat template and tokenized (with the local `tokenizer`, or the
  server's /tokenize), each choice appended as its own tokens, `prompt_logprobs` summed;
- top log-probs only (hosted chat APIs): the first answer token of a greedy reply is scored;
- neither: a greedy reply is parsed for a choice, and the row is hard-labelled.
An assistant prefix (the judge's "The answer is:", a primed refusal) is continued with vLLM's
`continue_final_message`, or over the completions API with a locally rendered chat template
(`prefix: completions`); elsewhere it is a one-line error naming the setting.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from engines.base import (
    HARD_LOGP,
    ChoiceScores,
    Completion,
    Conversation,
    EngineStats,
    Meter,
    Output,
    Sampling,
    current_meter,
)
from engines.bundled import ALIASES, DEFAULT_SPEC
from engines.chat import check_sampling, row_seed
from engines.http import (  # noqa: F401 - the errors are part of this engine's interface
    BatchIncomplete,
    RemoteError,
    RemoteSetupError,
    RemoteUnavailable,
    RequestRejected,
    Transport,
    finish,
)

log = logging.getLogger(__name__)

SERVERS = ("auto", "vllm", "openai", "generic")
SCORINGS = ("auto", "prompt-logprobs", "top-logprobs", "constrained")
PREFIXES = ("auto", "continue", "completions", "none")


@dataclass
class Caps:
    """What an endpoint supports."""

    server: str  # vllm | openai | generic: what the probe found, or the kind named in settings
    extras: bool  # takes vLLM's sampling extras (repetition_penalty, stop_token_ids)
    continue_final: bool  # honours continue_final_message (an assistant prefix is continued)
    prompt_logprobs: bool  # returns prompt log-probs (completions API, token-id prompts)
    top_logprobs: bool  # returns top log-probs of generated tokens (chat API)
    tokenize: bool  # has vLLM's /tokenize


KNOWN = {
    "vllm": Caps("vllm", True, True, True, True, True),
    "openai": Caps("openai", False, False, False, True, False),
    "generic": Caps("generic", False, False, False, False, False),
}


class RemoteEngine:
    backend = "openai"

    def __init__(
        self,
        spec: str = DEFAULT_SPEC,
        *,
        base_url: str | None = None,  # e.g. http://gpu-host:8000/v1 (required)
        api_key_env: str | None = None,  # name of the environment variable holding the key
        served_model: str | None = None,  # the name the endpoint serves, if not the spec
        server: str = "auto",  # auto (probe) | vllm | openai | generic
        tokenizer: str | None = "auto",  # local tokenizer (HF dir, alias, .gguf); auto: the spec if local; none
        concurrency: int = 8,  # requests in flight
        timeout_s: float = 120.0,  # per attempt
        max_retries: int = 5,  # attempts after the first, on 429/5xx/timeouts/resets/malformed replies
        backoff_s: float = 1.0,  # first retry waits about this long; each next one twice as long
        max_backoff_s: float = 60.0,  # cap of one wait (a longer Retry-After is still honoured)
        fail_fast_after: int = 32,  # after this many requests in a row failed, send no more for cooldown_s
        cooldown_s: float = 30.0,
        scoring: str = "auto",  # auto | prompt-logprobs | top-logprobs | constrained
        prefix: str = "auto",  # auto | continue | completions | none: how an assistant prefix is continued
        top_logprobs: int = 20,  # candidates per position on the top-logprobs path (OpenAI allows 20)
    ) -> None:
        if not base_url:
            raise ValueError("engine openai needs engine.settings.base_url, e.g. http://127.0.0.1:8000/v1")
        for name, value, allowed in (("server", server, SERVERS), ("scoring", scoring, SCORINGS),
                                     ("prefix", prefix, PREFIXES)):
            if value not in allowed:
                raise ValueError(f"engine.settings.{name} must be one of {', '.join(allowed)}; got {value!r}")
        if concurrency < 1 or max_retries < 0:
            raise ValueError("engine.settings.concurrency must be >= 1 and max_retries >= 0")
        self.model_id = DEFAULT_SPEC if spec.lower() in ALIASES else spec
        self.served = served_model or self.model_id
        self.base_url = base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"engine.settings.api_key_env names {api_key_env}, which is not set in the "
                                 "environment")
            headers["Authorization"] = f"Bearer {key}"  # kept only in the client's headers: never logged or stored
        self.stats = EngineStats()
        self.http = Transport(self.base_url, self.served, headers, self.stats, concurrency=concurrency,
                              timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
                              max_backoff_s=max_backoff_s, fail_fast_after=fail_fast_after, cooldown_s=cooldown_s)
        self.endpoint = self.http.endpoint
        self.scoring_setting, self.prefix_setting, self.top_k = scoring, prefix, top_logprobs
        self._server = server
        self._tokenizer_spec = tokenizer
        self._tok: Any = None
        self._tok_loaded = False
        self._caps: Caps | None = KNOWN.get(server)
        self._probe_lock = threading.Lock()
        self._choice_ids: dict[str, list[int]] = {}
        self.scoring_path: str | None = None
        self.stats.extra.update(device="remote", endpoint=self.endpoint)
        log.info("openai engine: %s at %s (server %s, %d in flight)", self.served, self.endpoint, server, concurrency)

    # ---- what the endpoint supports ---------------------------------------------------------

    def caps(self) -> Caps:
        """The endpoint's capabilities: the kind named in settings, or probed once and logged."""
        with self._probe_lock:
            if self._caps is None:
                self._caps = self._probe()
                log.info("openai engine %s: probed as %s", self.endpoint, self._caps)
                self.stats.extra["server"] = self._caps.server
            return self._caps

    def _probe(self) -> Caps:
        """Two tiny requests: one with vLLM's extras (a strict server refuses it with a 400; vLLM
        answers with prompt log-probs), one with top log-probs."""
        meter = current_meter()
        msgs = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello"}]
        vllm_body = {"model": self.served, "messages": msgs, "max_tokens": 1, "temperature": 0.0,
                     "continue_final_message": True, "add_generation_prompt": False, "repetition_penalty": 1.0,
                     "prompt_logprobs": 0, "return_token_ids": True}
        try:
            data = self.http.post("/chat/completions", vllm_body, meter)
            if data.get("prompt_logprobs") is not None or data.get("prompt_token_ids") is not None:
                return replace(KNOWN["vllm"], tokenize=self._has_tokenize(meter))
        except RequestRejected:
            pass
        plain = {"model": self.served, "messages": msgs[:1], "max_tokens": 1, "temperature": 0.0,
                 "logprobs": True, "top_logprobs": 2}
        top = False
        try:
            data = self.http.post("/chat/completions", plain, meter)
            content = ((data.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or []
            top = bool(content and content[0].get("top_logprobs"))
        except RequestRejected:
            pass
        return Caps("openai" if top else "generic", False, False, False, top, False)

    def _has_tokenize(self, meter: Meter | None) -> bool:
        try:
            self.http.post(self._root() + "/tokenize",
                           {"model": self.served, "prompt": "hi", "add_special_tokens": False}, meter)
            return True
        except RemoteError:
            return False

    def _root(self) -> str:
        """The server root (vLLM's /tokenize lives beside /v1, not under it)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    # ---- prompts as tokens (for prompt log-probs and the completions prefix path) -----------

    def tokenizer(self):
        """The local tokenizer, or None (setting `tokenizer: none`, or a spec that is no local model)."""
        if not self._tok_loaded:
            self._tok_loaded = True
            spec = self.model_id if self._tokenizer_spec == "auto" else self._tokenizer_spec
            if spec and spec != "none":
                self._tok = _load_tokenizer(spec, required=self._tokenizer_spec != "auto")
        return self._tok

    def _prompt_ids(self, conv: Conversation, meter: Meter | None) -> list[int]:
        tok = self.tokenizer()
        if tok is not None:
            from engines.chat import encode, render

            return encode(tok, render(tok, conv))
        last = conv[-1]["role"] == "assistant"
        data = self.http.post(self._root() + "/tokenize", {"model": self.served, "messages": conv,
                                                       "add_generation_prompt": not last,
                                                       "continue_final_message": last}, meter)
        return list(data["tokens"])

    def _ids_of(self, text: str, meter: Meter | None) -> list[int]:
        if text not in self._choice_ids:
            tok = self.tokenizer()
            if tok is not None:
                from engines.chat import encode

                ids = encode(tok, text)
            else:
                ids = list(self.http.post(self._root() + "/tokenize", {"model": self.served, "prompt": text,
                                                                   "add_special_tokens": False}, meter)["tokens"])
            self._choice_ids[text] = ids
        return self._choice_ids[text]

    # ---- generate ---------------------------------------------------------------------------

    def _prefix_mode(self) -> str:
        """How a conversation that ends with the assistant's words is continued."""
        if self.prefix_setting == "none":
            mode = "none"
        elif self.prefix_setting != "auto":
            mode = self.prefix_setting
        else:
            mode = "continue" if self.caps().continue_final else "none"
        if mode == "completions" and self.tokenizer() is None and not self.caps().tokenize:
            raise RemoteSetupError(f"engine.settings.prefix=completions renders the chat template here: set "
                                   f"engine.settings.tokenizer to the served model's tokenizer (an HF directory or "
                                   f"hub id); {self.endpoint} has no /tokenize")
        if mode == "none":
            raise RemoteSetupError(
                f"{self.endpoint} cannot continue an assistant prefix (the judge's answer prefix, a primed reply): "
                f"it is not a vLLM server (continue_final_message); set engine.settings.prefix=completions (with "
                f"engine.settings.tokenizer) if it has a completions API, or use a vLLM server")
        return mode

    def _sampling_body(self, sampling: Sampling, n: int, seed: int | None) -> dict:
        body: dict[str, Any] = {"max_tokens": sampling.max_new_tokens, "temperature": max(sampling.temperature, 0.0),
                                "top_p": sampling.top_p}
        if n > 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        caps = self.caps()
        if caps.extras:
            body["repetition_penalty"] = sampling.repetition_penalty
            tok = self.tokenizer()
            if tok is not None:  # stop on the same end-of-turn ids as the in-process engines
                from engines.chat import end_of_turn_ids

                body["stop_token_ids"] = sorted(end_of_turn_ids(tok))
        elif sampling.repetition_penalty != 1.0 and not self.stats.extra.get("warned_repetition"):
            self.stats.extra["warned_repetition"] = True
            logging.getLogger("cai.engines").warning(
                "%s takes no repetition_penalty (not a vLLM server); generating without it", self.endpoint)
        return body

    def _gen_request(self, conv: Conversation, sampling: Sampling, n: int, seed: int | None,
                     meter: Meter | None) -> tuple[str, dict]:
        body = self._sampling_body(sampling, n, seed)
        if conv[-1]["role"] == "assistant":
            if self._prefix_mode() == "completions":
                return "/completions", {"model": self.served, "prompt": self._prompt_ids(conv, meter), **body}
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        return "/chat/completions", {"model": self.served, "messages": conv, **body}

    def generate(self, conversations: list[Conversation], sampling: Sampling) -> list[Completion]:
        check_sampling(sampling)
        if not conversations:
            return []
        if sampling.no_repeat_ngram and not self.stats.extra.get("warned_ngram"):
            self.stats.extra["warned_ngram"] = True
            logging.getLogger("cai.engines").warning(
                "the openai engine has no no_repeat_ngram; generating without the n-gram ban")
        t0 = time.perf_counter()
        meter = current_meter()
        greedy = sampling.temperature <= 0
        draws = 1 if greedy else sampling.n  # greedy: one reply copied n times, as the other engines do
        requests = [self._gen_request(c, sampling, draws, None if greedy else row_seed(sampling.seed, c, 0), meter)
                    for c in conversations]
        if sampling.max_new_tokens == 0:
            replies: list[Any] = [{"choices": [], "usage": {}} for _ in conversations]
        else:
            replies = self.http.send_all(requests)
        outs: list[Completion | Exception] = []
        for conv, (path, _), reply in zip(conversations, requests, replies, strict=True):
            if isinstance(reply, Exception):
                outs.append(reply)
                continue
            try:
                outs.append(self._completion(conv, path, reply, sampling, draws, meter))
            except RemoteError as exc:
                outs.append(exc)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                outs.append(RemoteUnavailable(f"reply without the expected fields ({exc.__class__.__name__}: {exc})"))
        completions = finish(outs)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return completions

    def _completion(self, conv: Conversation, path: str, reply: dict, sampling: Sampling, draws: int,
                    meter: Meter | None) -> Completion:
        if sampling.max_new_tokens == 0:
            return Completion([Output("", 0, "length") for _ in range(sampling.n)], prompt_tokens=0)
        choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
        if not choices:
            raise RemoteUnavailable("reply with no choices")
        texts = [(c["message"].get("content") or "") if path == "/chat/completions" else c["text"] for c in choices]
        reasons = ["length" if c.get("finish_reason") == "length" else "stop" for c in choices]
        usage = reply.get("usage") or {}
        counts = self._token_counts(texts, int(usage.get("completion_tokens") or 0))
        got = [Output(t, k, r) for t, k, r in zip(texts, counts, reasons, strict=True)]
        if len(got) < draws:  # the server ignored n: ask for the rest one at a time, each with its own seed
            got += self._more_draws(conv, sampling, draws - len(got), meter)
        outs = [replace(got[j % len(got)]) for j in range(sampling.n)]
        return Completion(outputs=outs, prompt_tokens=int(usage.get("prompt_tokens") or 0))

    def _more_draws(self, conv: Conversation, sampling: Sampling, k: int, meter: Meter | None) -> list[Output]:
        reqs = [self._gen_request(conv, sampling, 1, row_seed(sampling.seed, conv, j + 1), meter) for j in range(k)]
        out = []
        for (path, _), reply in zip(reqs, self.http.send_all(reqs), strict=True):
            if isinstance(reply, Exception):
                raise reply
            c = reply["choices"][0]
            text = (c["message"].get("content") or "") if path == "/chat/completions" else c["text"]
            out.append(Output(text, int((reply.get("usage") or {}).get("completion_tokens") or 0),
                              "length" if c.get("finish_reason") == "length" else "stop"))
        return out

    def _token_counts(self, texts: list[str], total: int) -> list[int]:
        """Tokens per output: `usage` counts all n together; split it by the local tokenizer, else by length."""
        if len(texts) == 1:
            return [total]
        tok = self.tokenizer()
        if tok is not None:
            from engines.chat import encode

            return [len(encode(tok, t)) for t in texts]
        chars = sum(len(t) for t in texts) or 1
        return [round(total * len(t) / chars) for t in texts]

    # ---- choice log-probs -------------------------------------------------------------------

    def choice_path(self) -> str:
        """prompt-logprobs | top-logprobs | constrained: chosen once (probing if need be) and logged."""
        if self.scoring_path is None:
            caps = self.caps()
            path = self.scoring_setting
            if path == "auto":
                if caps.prompt_logprobs and (caps.tokenize or self.tokenizer() is not None):
                    path = "prompt-logprobs"
                elif caps.top_logprobs:
                    path = "top-logprobs"
                else:
                    path = "constrained"
            if path == "prompt-logprobs" and not caps.prompt_logprobs:
                raise RemoteSetupError(f"engine.settings.scoring=prompt-logprobs: {self.endpoint} gives no prompt "
                                       "log-probs (a vLLM server does); use scoring=auto")
            self.scoring_path = path
            self.stats.extra["scoring"] = path
            logging.getLogger("cai.engines").info("openai engine %s scores choices by %s", self.endpoint, path)
        return self.scoring_path

    def choice_logprobs(self, conversations: list[Conversation], choices: list[str]) -> list[dict[str, float]]:
        if not conversations:
            return []
        if not choices:
            return [{} for _ in conversations]
        t0 = time.perf_counter()
        path = self.choice_path()
        if path == "prompt-logprobs":
            rows = self._score_prompt_logprobs(conversations, choices)
        else:
            rows = self._score_reply(conversations, choices, path)
        out = finish(rows)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return out

    def _score_prompt_logprobs(self, conversations: list[Conversation], choices: list[str]) -> list[Any]:
        """Exactly the hf engine's scores: log p(choice tokens | prompt tokens), summed."""
        meter = current_meter()
        choice_ids = [self._ids_of(ch, meter) for ch in choices]
        if empty := [ch for ch, ids in zip(choices, choice_ids, strict=True) if not ids]:
            raise ValueError(f"choices must tokenize to at least one token; got {empty!r}")
        prompts: list[list[int] | Exception] = []
        for conv in conversations:
            try:
                prompts.append(self._prompt_ids(conv, meter))
            except RemoteError as exc:
                prompts.append(exc)
        requests, owners = [], []
        for i, p in enumerate(prompts):
            if isinstance(p, Exception):
                continue
            for j, ids in enumerate(choice_ids):
                requests.append(("/completions", {"model": self.served, "prompt": p + ids, "max_tokens": 1,
                                                  "temperature": 0.0, "prompt_logprobs": 1}))
                owners.append((i, j))
        replies = self.http.send_all(requests)
        rows: list[Any] = [p if isinstance(p, Exception) else {} for p in prompts]
        for (i, j), reply in zip(owners, replies, strict=True):
            if isinstance(rows[i], Exception):
                continue
            if isinstance(reply, Exception):
                rows[i] = reply
                continue
            try:
                plp = reply["choices"][0]["prompt_logprobs"]
                start = len(prompts[i])  # type: ignore[arg-type]
                rows[i][choices[j]] = float(sum(plp[start + t][str(tok)]["logprob"]
                                                for t, tok in enumerate(choice_ids[j])))
            except (KeyError, TypeError, IndexError, ValueError) as exc:
                rows[i] = RemoteUnavailable(f"reply without prompt log-probs ({exc.__class__.__name__}: {exc})")
        return [r if isinstance(r, Exception) else ChoiceScores({ch: r[ch] for ch in choices}, "logprobs")
                for r in rows]

    def _score_reply(self, conversations: list[Conversation], choices: list[str], path: str) -> list[Any]:
        """Top log-probs of a greedy reply's first answer tokens, or (constrained) the choice it writes."""
        top = path == "top-logprobs"
        requests = []
        for conv in conversations:
            if conv[-1]["role"] == "assistant" and not self.caps().continue_final:
                conv = conv[:-1]  # the prefix cannot be continued here: score the start of a fresh reply
            body: dict[str, Any] = {"model": self.served, "messages": conv, "temperature": 0.0,
                                    "max_tokens": 3 if top else 8}
            if conv[-1]["role"] == "assistant":
                body |= {"continue_final_message": True, "add_generation_prompt": False}
            if top:
                body |= {"logprobs": True, "top_logprobs": self.top_k}
            requests.append(("/chat/completions", body))
        rows: list[Any] = []
        for reply in self.http.send_all(requests):
            if isinstance(reply, Exception):
                rows.append(reply)
                continue
            try:
                choice = reply["choices"][0]
                text = choice["message"].get("content") or ""
                scores = None
                if top:
                    scores = first_answer_scores((choice.get("logprobs") or {}).get("content") or [], choices)
                rows.append(ChoiceScores(scores, "top-logprobs") if scores else hard_scores(text, choices))
            except (KeyError, TypeError, IndexError) as exc:
                rows.append(RemoteUnavailable(f"reply without the expected fields ({exc.__class__.__name__}: {exc})"))
        return rows

    def close(self) -> None:
        self.http.close()


# --- pure helpers (tested directly) -------------------------------------------------------------

def _forms(choice: str) -> tuple[str, ...]:
    """How a reply may write a choice: " (A)" as "(A)" or as the bare "A"."""
    s = choice.strip()
    core = s.strip("()[]. ")
    return (s, core) if core and core != s else (s,)


def _matches(text: str, choice: str) -> bool:
    """`text` (the reply so far) is a start of the choice, or the choice followed by punctuation."""
    t = text.lstrip()
    if not t:
        return False
    for form in _forms(choice):
        if form.startswith(t) or (t.startswith(form) and not t[len(form):len(form) + 1].isalnum()):
            return True
    return False


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def first_answer_scores(content: list[dict], choices: list[str]) -> dict[str, float] | None:
    """Choice log-probs from the top log-probs of a reply's first tokens (OpenAI's logprobs.content).

    Walks the generated tokens while the reply so far is a start of every choice (e.g. "(");
    at the first position where a candidate token fits one choice only, each choice gets the
    log-sum-exp of its candidates there, plus the log-probs of the shared tokens before it. A
    choice absent from the candidates gets the lowest candidate's log-prob (its upper bound).
    None when the reply leaves the choices before they part (it wrote something else)."""
    so_far, shared = "", 0.0
    for pos in content:
        cands = [(c.get("token") or "", float(c.get("logprob", -math.inf))) for c in pos.get("top_logprobs") or []]
        if not cands:
            return None
        per: dict[str, list[float]] = {ch: [] for ch in choices}
        for tok, lp in cands:
            fits = [ch for ch in choices if _matches(so_far + tok, ch)]
            if len(fits) == 1:
                per[fits[0]].append(lp)
        if any(per.values()):
            floor = min(lp for _, lp in cands)
            return {ch: shared + (_logsumexp(v) if v else floor) for ch, v in per.items()}
        so_far += pos.get("token") or ""
        shared += float(pos.get("logprob", 0.0))
        if not all(_matches(so_far, ch) for ch in choices) and so_far.strip():
            return None
    return None


def hard_scores(text: str, choices: list[str]) -> ChoiceScores:
    """The choice a reply writes first gets log-prob 0 and every other HARD_LOGP ("hard"); a reply
    that writes none gets HARD_LOGP for all, a tie ("unparsed")."""
    best, where = None, len(text) + 1
    for ch in choices:
        for form in _forms(ch):
            i = _find_token(text, form)
            if 0 <= i < where:
                best, where = ch, i
    if best is None:
        return ChoiceScores({ch: HARD_LOGP for ch in choices}, "unparsed")
    return ChoiceScores({ch: 0.0 if ch == best else HARD_LOGP for ch in choices}, "hard")


def _find_token(text: str, form: str) -> int:
    """Where `form` stands on its own in `text` ("A" in "A." or "(A)", not in "Apple"); -1 if nowhere."""
    start = 0
    while (i := text.find(form, start)) >= 0:
        before = text[i - 1] if i else " "
        after = text[i + len(form)] if i + len(form) < len(text) else " "
        if not (form[0].isalnum() and before.isalnum()) and not (form[-1].isalnum() and after.isalnum()):
            return i
        start = i + 1
    return -1


def _load_tokenizer(spec: str, required: bool):
    """A local tokenizer for `spec`, or None when it is not a local model and `required` is off."""
    from pathlib import Path

    from engines.bundled import resolve

    try:
        path = resolve(spec)
        if not Path(str(path)).exists() and not required:
            return None  # a name only the endpoint knows: no local tokenizer (the server's /tokenize may do)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - any loading failure: say which setting to fix
        if required:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise RemoteSetupError(f"engine.settings.tokenizer {spec!r} cannot be loaded "
                                   f"({exc.__class__.__name__}: {first})") from exc
        return None
