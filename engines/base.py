"""The one small interface every engine implements.

    from engines import load, Sampling
    eng = load("smollm2-135m")
    outs = eng.generate([[{"role": "user", "content": "Hi"}]], Sampling(max_new_tokens=32))
    eng.choice_logprobs([[...conversation...]], ["(A)", "(B)"])

A conversation is a list of {"role", "content"} messages. If its last message is from the
assistant, that message is a prefix the model continues (no end-of-turn after it): this is how
the feedback model is asked "The answer is:" and then scored on "(A)" vs "(B)".
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Protocol

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    n: int = 1  # completions per conversation
    seed: int = 0  # with the conversation's content, fixes each row's random stream
    stop: tuple[str, ...] = ()  # generation stops before the first of these strings
    # repetition controls (HF semantics): a token already in the prompt or the reply has its logit
    # divided (if > 0) or multiplied (if < 0) by the penalty; no n-gram of this size occurs twice
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0

    def to_dict(self) -> dict:
        """What a row's key hashes; the repetition controls only when set, so rows made before
        they existed keep their keys."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        if self.repetition_penalty == 1.0:
            del d["repetition_penalty"]
        if not self.no_repeat_ngram:
            del d["no_repeat_ngram"]
        return d


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass
class Output:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or stop string) | "length"

    def __post_init__(self) -> None:
        # A model can emit a NUL byte token (random weights do) and a server can send a lone surrogate in JSON;
        # PostgreSQL stores neither, and one such reply failed a whole stage. Both become U+FFFD, on every engine.
        self.text = _UNSTORABLE.sub("\ufffd", self.text)


@dataclass
class Completion:
    """All `n` outputs for one conversation, in input order."""

    outputs: list[Output]
    prompt_tokens: int
    truncated_tokens: int = 0  # prompt tokens dropped from the left to fit the context

    @property
    def text(self) -> str:
        return self.outputs[0].text


@dataclass
class EngineStats:
    """Counters a caller (benchmarks, flow summaries) reads after calls."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncations: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


class ChoiceScores(dict):
    """A `choice_logprobs` row (choice -> log-prob) that also says how it was scored.

    mode: "logprobs" (the choice's own tokens, as the hf and vllm engines score it),
    "top-logprobs" (the first answer token of a reply, from an endpoint's top log-probs),
    "hard" (the endpoint gives no log-probs: the choice it wrote gets 0, the other HARD_LOGP) or
    "unparsed" (it wrote neither choice: both HARD_LOGP, a tie). A plain dict means "logprobs".
    """

    mode: str = "logprobs"

    def __init__(self, scores: dict[str, float], mode: str = "logprobs") -> None:
        super().__init__(scores)
        self.mode = mode


HARD_LOGP = -1e4  # finite (stored in SQL and JSON as it is) yet exp() of it is exactly 0.0


# --- usage metering: what each request cost, for the run's ledger ----------------------------

@dataclass
class Usage:
    """Requests and tokens one endpoint and model served (one ledger row's counts)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0  # attempts past the first (429, 5xx, timeouts, resets, malformed replies)
    failures: int = 0  # requests that still failed after their retries

    def add(self, other: Usage) -> None:
        for k in ("requests", "prompt_tokens", "completion_tokens", "retries", "failures"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


class Meter:
    """Usage per (endpoint, model) while a block of engine calls runs (thread-safe: a remote
    engine records from its worker threads)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Usage] = {}
        self._lock = threading.Lock()

    def add(self, endpoint: str, model: str, **counts: int) -> None:
        with self._lock:
            self.rows.setdefault((endpoint, model), Usage()).add(Usage(**counts))

    @property
    def total(self) -> Usage:
        out = Usage()
        for u in self.rows.values():
            out.add(u)
        return out


_METER: ContextVar[Meter | None] = ContextVar("cai_engine_meter", default=None)


@contextmanager
def metered() -> Iterator[Meter]:
    """Collect what every engine call inside the block costs (engines call `record_usage`)."""
    meter = Meter()
    token = _METER.set(meter)
    try:
        yield meter
    finally:
        _METER.reset(token)


def current_meter() -> Meter | None:
    """The meter of the calling context; a remote engine hands it to its worker threads."""
    return _METER.get()


def record_usage(endpoint: str, model: str, meter: Meter | None = None, **counts: int) -> None:
    """Add one call's usage to `meter` (default: the calling context's); a no-op outside `metered`."""
    meter = meter or _METER.get()
    if meter is not None:
        meter.add(endpoint, model, **counts)


class Engine(Protocol):
    model_id: str  # what rows record as the model (spec as given, or resolved path)
    backend: str  # "hf" | "vllm" | ...
    stats: EngineStats

    def generate(self, conversations: list[Conversation], sampling: Sampling) -> list[Completion]: ...

    def choice_logprobs(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[dict[str, float]]: ...

    def close(self) -> None: ...
