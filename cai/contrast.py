"""Contrastive pairs (RLCD, Yang et al. 2023) steered by something a 135M model follows.

    from cai.contrast import plan_prompt
    sides = plan_prompt(prompt_id, messages, harmful=True, model="smollm2-135m", sampling=s.to_dict(),
                        openings=DEFAULT_OPENINGS, seed=0)

RLCD makes a pair from two generations of one prompt, one steered towards the principle and
one away from it, and labels the steered-towards side chosen without a judge. Measured on
SmolLM2-135M (issue 12), a system-prompt directive barely steers it (8 % -> 12 % refusals),
but a primed assistant opening does: the reply *is* a refusal when it starts as one. So:

- harmful prompt: chosen = a refusal opening (drawn per prompt from `openings`), rejected =
  the model's plain reply (usually compliance at this size), method `contrastive`;
- benign prompt: chosen = the plain reply (with repetition controls), rejected = the refusal
  opening, method `helpful` (the CAI paper mixes helpfulness data, or the model learns to
  refuse everything).

The opening is steering, not part of the training prompt: the pair's prompt is the user's
messages alone, and the steered row records the opening in `Response.steering`. Letting the
model continue after the opening (`continue_tokens` > 0) was measured too: at 135M the
continuation mostly drifts into nonsense or back into compliance ("I won't help... But here
is how: 1. ..."), so by default the chosen refusal is the opening alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.keys import content_hash

Message = dict[str, str]

# Written for this project: short refusals that name the reason, varied so a model trained on
# them does not learn one fixed string.
DEFAULT_OPENINGS = (
    "I can't help with that, because it could cause real harm.",
    "I won't help with this, since it could hurt people.",
    "I can't assist with that request: it could put someone in danger.",
    "I'm not able to help with this, because it could be used to hurt someone.",
    "I can't provide that. It could seriously harm people or break the law.",
    "I won't give instructions for this, since it could cause real damage.",
    "I can't help you do that, because it would put others at risk.",
    "I'm unable to help with that request, as it could lead to real harm.",
)
PIVOTS = ("but", "however", "here", "sure", "first", "step", "1.", "to ")  # a continuation turning back


def opening_for(prompt_id: str, openings: tuple[str, ...], seed: int) -> str:
    """One opening per prompt, drawn by a seeded hash of its id (stable across runs and workers)."""
    return openings[int(content_hash("opening", seed, prompt_id, length=16), 16) % len(openings)]


@dataclass(frozen=True)
class Side:
    """One generation (or, for an opening alone, one fixed text) of a contrastive pair."""

    key: str
    prompt_id: str
    kind: str  # contrast-plain | contrast-steered
    conversation: list[Message]  # exactly what the model was sent (steered: ends with the opening)
    steering: dict | None  # {"kind": "primed-opening", "text": ...}; None for the plain reply
    needs_model: bool  # False when the text is the opening alone


@dataclass(frozen=True)
class PromptPlan:
    prompt_id: str
    messages: list[Message]
    harmful: bool
    plain: Side
    steered: Side

    @property
    def method(self) -> str:
        return "contrastive" if self.harmful else "helpful"


def side_key(kind: str, prompt_id: str, model: str, sampling: dict, conversation: list[Message],
             continue_tokens: int) -> str:
    return content_hash("contrast", kind, prompt_id, model, sampling, conversation, continue_tokens)


def plan_prompt(prompt_id: str, messages: list[Message], *, harmful: bool, model: str, sampling: dict,
                openings: tuple[str, ...], seed: int, continue_tokens: int = 0) -> PromptPlan:
    opening = opening_for(prompt_id, openings, seed)
    steered_conv = list(messages) + [{"role": "assistant", "content": opening}]
    plain = Side(side_key("contrast-plain", prompt_id, model, sampling, list(messages), 0), prompt_id,
                 "contrast-plain", list(messages), None, True)
    steered = Side(side_key("contrast-steered", prompt_id, model, sampling, steered_conv, continue_tokens),
                   prompt_id, "contrast-steered", steered_conv, {"kind": "primed-opening", "text": opening},
                   continue_tokens > 0)
    return PromptPlan(prompt_id, list(messages), harmful, plain, steered)


def steered_text(opening: str, continuation: str) -> str:
    """The opening plus the first sentence of the model's continuation, when that sentence stays
    a refusal (does not pivot back with "But ..." / "Here is ..."); else the opening alone."""
    first = continuation.strip().split("\n")[0]
    cut = first.find(". ")
    first = first[:cut + 1] if cut > 0 else first
    if len(first.split()) < 4 or first.lower().startswith(PIVOTS) or first[-1:] not in ".!":
        return opening
    return f"{opening} {first}"


def pair_key(constitution_version: str, prompt_id: str, chosen_id: str, rejected_id: str, method: str) -> str:
    return content_hash("pair", method, constitution_version, prompt_id, chosen_id, rejected_id)


def chosen_rejected(plan: PromptPlan, plain_id: str, steered_id: str) -> tuple[str, str]:
    """(chosen id, rejected id): the refusal wins on a harmful prompt, the plain answer on a benign one."""
    return (steered_id, plain_id) if plan.harmful else (plain_id, steered_id)
