"""Scripted engines: known outputs and log-probs, no model, for flow logic tests."""

from __future__ import annotations

import hashlib

from engines.base import Completion, EngineStats, Output, Sampling


class ScriptedEngine:
    """Deterministic text derived from the conversation; choice log-probs from a function.

    `fail_when(conversation) -> bool` makes an item come back empty (an engine-side failure).
    """

    backend = "scripted"

    def __init__(self, model_id: str = "scripted", fail_when=None, logprobs=None):
        self.model_id = model_id
        self.stats = EngineStats()
        self.fail_when = fail_when or (lambda conv: False)
        self.logprobs = logprobs or (lambda conv, choice: -1.0)
        self.generated: list[list[dict]] = []  # every conversation sent to generate
        self.scored: list[list[dict]] = []

    def generate(self, conversations, sampling: Sampling):
        self.stats.calls += 1
        out = []
        for conv in conversations:
            self.generated.append(conv)
            h = hashlib.sha256(repr((conv, sampling.seed)).encode()).hexdigest()[:8]
            outs = []
            for j in range(sampling.n):
                text = "" if self.fail_when(conv) else f"[{conv[-1]['role']}:{len(conv)}:{h}:{j}] reply"
                outs.append(Output(text=text, completion_tokens=len(text.split()), finish_reason="stop"))
            self.stats.completion_tokens += sum(o.completion_tokens for o in outs)
            out.append(Completion(outputs=outs, prompt_tokens=sum(len(m["content"].split()) for m in conv)))
        return out

    def choice_logprobs(self, conversations, choices):
        self.stats.calls += 1
        self.scored.extend(conversations)
        return [{c: float(self.logprobs(conv, c)) for c in choices} for conv in conversations]

    def close(self) -> None:
        pass
