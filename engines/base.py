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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Sampling:
        d = dict(d)
        d["stop"] = tuple(d.get("stop", ()))
        return cls(**d)


@dataclass
class Output:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or stop string) | "length"


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


class Engine(Protocol):
    model_id: str  # what rows record as the model (spec as given, or resolved path)
    backend: str  # "hf" | "vllm" | ...
    stats: EngineStats

    def generate(self, conversations: list[Conversation], sampling: Sampling) -> list[Completion]: ...

    def choice_logprobs(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[dict[str, float]]: ...

    def close(self) -> None: ...
