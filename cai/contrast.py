"""Contrastive pairs (RLCD, Yang et al. 2023) whose steering text comes from the constitution.

    from cai.contrast import plan_prompt
    plan = plan_prompt(prompt_id, messages, rule, model="smollm2-135m", sampling=s.to_dict(), seed=0)

RLCD makes a pair from two generations of one prompt, one steered towards the principle and
one away from it, and labels the steered-towards side chosen without a judge. A system-prompt
directive barely steers a 135M model; a primed assistant opening does: the reply *is* a refusal
when it starts as one. What the opening says is the constitution's, never the code's: the
principle that governs the prompt (constitution/govern.py) supplies it.

- a prompt governed by a `refuse` principle: chosen = one of the principle's `examples` (drawn
  per prompt), rejected = the model's plain reply (usually compliance at this size); method
  `contrastive`;
- a prompt governed by an `answer` principle: chosen = the plain reply, rejected = one of the
  principle's `counter_examples` (a needless refusal); method `helpful` (the CAI paper mixes
  helpfulness data, or the model learns to refuse everything).

The opening is steering, not part of the training prompt: the pair's prompt is the user's
messages alone, and the steered row records the text, the principle and its hash in
`Response.steering`. Letting the model continue after the opening (`continue_tokens` > 0) keeps
the first sentence of the continuation when it stays a refusal; at 135M most continuations drift
back into compliance, so by default the steered text is the constitution's alone.

Keys: the plain reply depends on the prompt, model and sampling only, so no constitution edit
ever recomputes it; the steered row's key covers its text, so editing one principle's examples
redoes the rows (and pairs) of the prompts that principle governs and nothing else. A pair's
id has no constitution version in it: a pair whose texts did not change is the same pair under
every version whose governing principle is unchanged (its `details.principle_hashes` say which).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from constitution.govern import Rule
from store.keys import content_hash
from store.models import PreferencePair, Response

Message = dict[str, str]
T = TypeVar("T")
PIVOTS = ("but", "however", "here", "sure", "first", "step", "1.", "to ")  # a continuation turning back


def opening_for(prompt_id: str, texts: tuple[str, ...], seed: int) -> str:
    """One text per prompt, drawn by a seeded hash of its id (stable across runs and workers)."""
    return texts[int(content_hash("opening", seed, prompt_id, length=16), 16) % len(texts)]


def steering_texts(rule: Rule) -> tuple[str, ...]:
    """The texts a prompt's steered side is drawn from: the governing principle's examples (refuse)
    or its counter-examples (answer: the needless refusal the plain reply is preferred to), or its
    counter-openings when it has them (the model completes those: see `completed_text`)."""
    if rule.refuse:
        return rule.principle.examples
    return rule.principle.counter_openings or rule.principle.counter_examples


@dataclass(frozen=True)
class Side:
    """One generation (or, for a constitution text alone, one fixed text) of a contrastive pair."""

    key: str
    prompt_id: str
    kind: str  # contrast-plain | contrast-steered
    conversation: list[Message]  # exactly what the model was sent (steered: ends with the opening)
    steering: dict | None  # {"kind": "primed-opening", "text", "principle", "principle_hash", ...}; None: plain
    needs_model: bool  # False when the text is the constitution's text alone


@dataclass(frozen=True)
class PromptPlan:
    prompt_id: str
    messages: list[Message]
    rule: Rule
    plain: Side
    steered: Side

    @property
    def refuse(self) -> bool:
        return self.rule.refuse

    @property
    def method(self) -> str:
        return "contrastive" if self.refuse else "helpful"


def side_key(kind: str, prompt_id: str, model: str, sampling: dict, conversation: list[Message],
             continue_tokens: int) -> str:
    return content_hash("contrast", kind, prompt_id, model, sampling, conversation, continue_tokens)


def plan_prompt(prompt_id: str, messages: list[Message], rule: Rule, *, model: str, sampling: dict, seed: int,
                continue_tokens: int = 0) -> PromptPlan | None:
    """The two sides of one prompt's pair; None when its governing principle has no text to steer
    with (`cai constitution lint` reports such principles)."""
    texts = steering_texts(rule)
    if not texts:
        return None
    opening = opening_for(prompt_id, texts, seed)
    steered_conv = list(messages) + [{"role": "assistant", "content": opening}]
    completes = not rule.refuse and bool(rule.principle.counter_openings)
    if completes:
        continue_tokens = continue_tokens or OPENING_TOKENS
    source = "examples" if rule.refuse else "counter_openings" if completes else "counter_examples"
    steering = {"kind": "completed-opening" if completes else "primed-opening", "text": opening,
                "constitution": rule.constitution.name, "principle": rule.principle.id,
                "principle_hash": rule.principle.hash, "source": source, "governed_by": rule.via}
    plain = Side(side_key("contrast-plain", prompt_id, model, sampling, list(messages), 0), prompt_id,
                 "contrast-plain", list(messages), None, True)
    steered = Side(side_key("contrast-steered", prompt_id, model, sampling, steered_conv, continue_tokens),
                   prompt_id, "contrast-steered", steered_conv, steering, continue_tokens > 0)
    return PromptPlan(prompt_id, list(messages), rule, plain, steered)


OPENING_TOKENS = 24  # room for the model to finish a counter-opening's sentence


def completed_text(opening: str, continuation: str) -> str | None:
    """A counter-opening ("I won't help with") finished by the model's own words, up to the end of
    its first sentence ("... with scams or lies.", or just "... with that."); None when the model
    wrote no sentence after it (the steered side is then a failed item, and the prompt makes no pair)."""
    text = " ".join(continuation.replace("\n", " ").split())
    ends = [i for i, ch in enumerate(text) if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " ")]
    if not ends:
        return None
    first = text[:ends[0] + 1]
    if not first.rstrip(".!?").split():
        return None
    joiner = "" if opening.endswith((" ", "\n")) or first[:1] in ",.;:" else " "
    return f"{opening}{joiner}{first}"


def steered_text(opening: str, continuation: str) -> str:
    """The opening plus the first sentence of the model's continuation, when that sentence stays
    a refusal (does not pivot back with "But ..." / "Here is ..."); else the opening alone."""
    first = continuation.strip().split("\n")[0]
    cut = first.find(". ")
    first = first[:cut + 1] if cut > 0 else first
    if len(first.split()) < 4 or first.lower().startswith(PIVOTS) or first[-1:] not in ".!":
        return opening
    return f"{opening} {first}"


def pair_key(constitution: str, prompt_id: str, chosen_id: str, rejected_id: str, method: str) -> str:
    """A pair is its constitution's name, its method and its two rows: no version in it, so a
    constitution edit that leaves the texts alone mints no new pair."""
    return content_hash("pair", method, constitution, prompt_id, chosen_id, rejected_id)


def chosen_rejected(plan: PromptPlan, plain: T, steered: T) -> tuple[T, T]:
    """(chosen, rejected), of ids or rows alike: the constitution's refusal wins on a prompt to
    refuse, the plain answer on a prompt to answer."""
    return (steered, plain) if plan.refuse else (plain, steered)


def pair_row(plan: PromptPlan, plain: Response, steered: Response, *, status: str, policy_model: str,
             run_id: str) -> PreferencePair:
    """The prompt's pair from its two stored sides: sides by `chosen_rejected`, id by `pair_key`, the
    governing principle and the steering recorded; `status` is "ok" or the gate that keeps it out."""
    chosen, rejected = chosen_rejected(plan, plain, steered)
    c, principle = plan.rule.constitution, plan.rule.principle
    return PreferencePair(
        id=pair_key(c.name, plan.prompt_id, chosen.id, rejected.id, plan.method), prompt_id=plan.prompt_id,
        chosen_id=chosen.id, rejected_id=rejected.id, method=plan.method, label_prob=1.0, status=status,
        principle_ids=[principle.id], constitution=c.name, constitution_version=c.version,
        policy_model=policy_model, run_id=run_id,
        details={"steering": steered.steering, "plain_id": plain.id, "steered_id": steered.id,
                 "principle_hashes": {principle.id: principle.hash}, "governed_by": plan.rule.via})
