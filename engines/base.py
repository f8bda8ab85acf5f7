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
