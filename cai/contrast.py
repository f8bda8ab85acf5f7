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
# Refusals that say what is being refused, per red-team category (written for this project), for
# ContrastConfig.category_openings. The hope: a generic refusal teaches a small model to refuse a
# request's shape ("Write a ...", "Help me ..."), one that names the harm ties it to the topic.
# Measured at 135M (2026-12-05, README) it did not: the model learned "I can't help with <topic>"
# and filled in benign topics ("... recipes that involve cooking"), so they are off by default.
CATEGORY_OPENINGS: dict[str, tuple[str, ...]] = {
    "weapons": ("I can't help with making or modifying weapons, because they could be used to hurt people.",
                "I won't give instructions for building weapons or explosives: they can kill people."),
    "cybercrime": ("I can't help with breaking into accounts or systems you don't own, because that is "
                   "illegal and hurts the people who use them.",
                   "I won't help with hacking or malware: getting into other people's systems is a crime."),
    "fraud-scams": ("I can't help with scams or fraud, because they take money from real people.",
                    "I won't help deceive people out of their money: that is fraud and it hurts them."),
    "dangerous-medical-advice": ("I can't give that medical advice, because following it could seriously "
                                 "hurt someone's health. Please ask a doctor or pharmacist.",
                                 "I can't give advice on that treatment: it could be dangerous. A doctor can "
                                 "help you with this safely."),
    "drugs": ("I can't help with making, hiding or selling illegal drugs, because they harm people and it "
              "is against the law.",
              "I won't give instructions for producing or smuggling drugs: it is illegal and dangerous."),
    "hate-harassment": ("I can't write content that attacks or harasses people, because it hurts them.",
                        "I won't help target or demean anyone: harassment and hateful content cause real "
                        "harm."),
    "self-harm": ("I can't help with hurting yourself, but I'm sorry you're going through this. Please "
                  "reach out to someone you trust or a local crisis line.",
                  "I won't give advice on self-harm. You deserve support: please talk to someone you trust "
                  "or a crisis line near you."),
    "privacy-doxxing": ("I can't help find or expose private information about someone, because it "
                        "could put them in danger.",
                        "I won't help track or spy on a person without their consent: it violates their "
                        "privacy and safety."),
    "violent-extremism": ("I can't help plan or promote violence or extremist attacks, because people "
                          "could be killed.",
                          "I won't help with recruiting for or carrying out violent attacks: they hurt "
                          "innocent people."),
    "manipulation": ("I can't help manipulate or control someone, because it harms them and their "
                     "freedom to choose.",
                     "I won't give tactics for deceiving or pressuring a person: manipulation hurts people."),
    "misinformation": ("I can't write false claims presented as fact, because misinformation misleads "
                       "people and can harm them.",
                       "I won't help spread claims that are untrue: misleading people can cause real harm."),
}
PIVOTS = ("but", "however", "here", "sure", "first", "step", "1.", "to ")  # a continuation turning back


def opening_for(prompt_id: str, openings: tuple[str, ...], seed: int) -> str:
    """One opening per prompt, drawn by a seeded hash of its id (stable across runs and workers)."""
    return openings[int(content_hash("opening", seed, prompt_id, length=16), 16) % len(openings)]


def openings_for(category: str | None, harmful: bool, openings: tuple[str, ...],
                 by_category: dict[str, tuple[str, ...]] | None) -> tuple[str, ...]:
    """The refusal openings a prompt draws from: its category's on a harmful prompt that has
    them, else the general ones (a benign prompt's rejected refusal is always a general one)."""
    named = (by_category or {}).get(category) if harmful else None
    return tuple(named) if named else openings


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
