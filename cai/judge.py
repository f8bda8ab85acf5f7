"""Pure functions of RL-CAI labelling: judge prompts, principle draws, probability arithmetic.

No database, no Prefect: `flows/label.py` wires these to the store and the engine, and
tests call them directly with a scripted engine.

The recipe (Bai et al. 2022, "Constitutional AI", section 4): the feedback model sees the
conversation, one preference principle and two responses as options (A) and (B); the
log-probabilities of "(A)" and "(B)" after "The answer is:" give P(A). Every pair is judged
under several principles and in both orders, and its label is the mean P(x better).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from constitution.load import Constitution, Preference
from engines.base import Engine, Sampling
from store.keys import content_hash

Message = dict[str, str]

# Everything that shapes what the judge sees. It is hashed into every judgment id, so editing
# the wording here makes new judgments instead of silently mixing two prompt formats.
# The answer prefix ends without a space and the choices start with one: engines tokenize a
# choice on its own and append it, and BPE tokenizers write "is: (A)" as "is", ":", " (", "A",
# ")", so "The answer is:" + " (A)" is exactly the text the model would produce itself.
TEMPLATE = {
    "user": ("Consider the following conversation between a human and an assistant:\n\n"
             "{conversation}\n\n{question}\n\nOptions:\n(A) {a}\n\n(B) {b}\n\n"
             "Answer with (A) or (B)."),
    "cot_user_suffix": " Think it through step by step before answering.",
    "answer_prefix": "The answer is:",
    "cot_prefix": "Let's think step by step:",
    "cot_answer": "\nSo the answer is:",
    "choices": [" (A)", " (B)"],
    "roles": {"user": "Human", "assistant": "Assistant", "system": "System"},
}
TEMPLATE_ID = content_hash(TEMPLATE, length=12)
CHOICE_A, CHOICE_B = TEMPLATE["choices"]
ORDERS = ("xy", "yx")  # xy: x is shown as (A); yx: y is shown as (A)


# --- principles ----------------------------------------------------------------------------

def draw_principles(c: Constitution, seed: int, pair_key: str, k: int) -> list[tuple[Preference, int]]:
    """k preference principles for one pair: draw j is seeded by (seed, pair_key, j).

    Without replacement within the pair while the pool lasts (then the pool refills), drawn
    by id so editing a question's wording does not reshuffle which pairs use which principle.
    Returns (principle, repeat) where repeat counts earlier draws of the same principle in
    this pair (0 unless k exceeds the number of principles); it keeps repeated draws distinct.
    """
    ids = sorted(p.id for p in c.preferences)
    if not ids:
        raise ValueError(f"constitution {c.ref} has no preference principles to judge with")
    by_id = {p.id: p for p in c.preferences}
    pool: list[str] = []
    seen: dict[str, int] = {}
    out: list[tuple[Preference, int]] = []
    for j in range(k):
        if not pool:
            pool = list(ids)
        pid = pool.pop(int(content_hash("judge-draw", seed, pair_key, j, length=16), 16) % len(pool))
        out.append((by_id[pid], seen.get(pid, 0)))
        seen[pid] = seen.get(pid, 0) + 1
    return out


# --- conversations -------------------------------------------------------------------------

def render_conversation(messages: Sequence[Message], max_chars: int) -> str:
    roles = TEMPLATE["roles"]
    return "\n\n".join(f"{roles.get(m['role'], m['role'])}: {clip(m['content'], max_chars)}"
                       for m in messages)


def clip(text: str, max_chars: int) -> str:
    """Long responses would push the question out of a small model's context; cut the middle."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half].rstrip() + " [...] " + text[-half:].lstrip()


def judge_question(prompt: Sequence[Message], question: str, a: str, b: str, max_chars: int,
                   cot: bool = False) -> str:
    """The user turn the feedback model answers: conversation, principle, options (A) and (B)."""
    text = TEMPLATE["user"].format(conversation=render_conversation(prompt, max_chars),
                                   question=question.strip(), a=clip(a, max_chars), b=clip(b, max_chars))
    return text + (TEMPLATE["cot_user_suffix"] if cot else "")


def cot_conversation(question_text: str) -> list[Message]:
    """Asks for reasoning: the assistant turn is pre-filled with "Let's think step by step:"."""
    return [{"role": "user", "content": question_text},
            {"role": "assistant", "content": TEMPLATE["cot_prefix"]}]


def answer_conversation(question_text: str, reasoning: str | None = None) -> list[Message]:
    """The conversation scored on (A)/(B): a final assistant prefix the choices continue."""
    if reasoning is None:
        prefix = TEMPLATE["answer_prefix"]
    else:
        prefix = TEMPLATE["cot_prefix"] + " " + reasoning.strip() + TEMPLATE["cot_answer"]
    return [{"role": "user", "content": question_text}, {"role": "assistant", "content": prefix}]


def clean_reasoning(text: str) -> str:
    """Keep the reasoning, not a verdict the model may have started to write itself."""
    cut = text
    for marker in ("So the answer is", "The answer is"):
        i = cut.find(marker)
        if i >= 0:
            cut = cut[:i]
    return cut.strip()


# --- probability arithmetic ----------------------------------------------------------------

def prob_a(logp_a: float, logp_b: float) -> float:
    """P(A) = exp(la) / (exp(la) + exp(lb)), computed without overflow."""
    if math.isinf(logp_a) and math.isinf(logp_b) and logp_a < 0 and logp_b < 0:
        return 0.5  # the model gives neither option any mass: no preference
    d = logp_b - logp_a
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


def clamp(p: float, bounds: tuple[float, float] | None) -> float:
    """CoT answers are overconfident (near 0 or 1); the paper clamps them to e.g. 40-60%."""
    if bounds is None:
        return p
    lo, hi = bounds
    return min(max(p, lo), hi)


def prob_x(order: str, p_a: float) -> float:
    """P(x better) from P(A): in order xy, x is (A); in order yx, x is (B)."""
    if order == "xy":
        return p_a
    if order == "yx":
        return 1.0 - p_a
    raise ValueError(f"order must be 'xy' or 'yx', got {order!r}")


def winner(p: float) -> str | None:
    return "x" if p > 0.5 else "y" if p < 0.5 else None


def orders_agree(mean_xy: float, mean_yx: float) -> bool:
    """False when the two orders point to different winners (an exact 0.5 points nowhere)."""
    w_xy, w_yx = winner(mean_xy), winner(mean_yx)
    return w_xy is None or w_yx is None or w_xy == w_yx


@dataclass(frozen=True)
class PairLabel:
    prob_x: float  # mean P(x better) over every judgment of the pair
    mean_xy: float  # mean over the judgments that showed x as (A)
    mean_yx: float  # mean over the judgments that showed y as (A)
    status: str  # ok | tie | position-inconsistent
    chosen: str  # "x" or "y"
    label_prob: float  # P(chosen better) >= 0.5
    n: int
    per_principle: dict[str, float] = field(default_factory=dict)  # principle id -> mean P(x better)


def label_pair(judgments: Sequence[tuple[str, str, float]], min_margin: float) -> PairLabel:
    """Combine (principle id, order, P(x better)) judgments into the pair's soft label.

    Orders that point to different winners make the pair position-inconsistent (the judge
    followed the slot, not the content), checked before the margin: such a pair is not
    a confident tie but an unreliable one. Otherwise a label within `min_margin` of 0.5 is
    a tie. Both stay in the store; training and export take status "ok" only.
    """
    if not judgments:
        raise ValueError("a pair needs at least one judgment")
    xy = [p for _, o, p in judgments if o == "xy"]
    yx = [p for _, o, p in judgments if o == "yx"]
    if not xy or not yx:
        raise ValueError(f"a pair needs judgments in both orders (got {len(xy)} xy, {len(yx)} yx)")
    mean = sum(p for _, _, p in judgments) / len(judgments)
    mean_xy, mean_yx = sum(xy) / len(xy), sum(yx) / len(yx)
    if not orders_agree(mean_xy, mean_yx):
        status = "position-inconsistent"
    elif abs(mean - 0.5) < min_margin or mean == 0.5:
        status = "tie"
    else:
        status = "ok"
    chosen = "x" if mean >= 0.5 else "y"
    per: dict[str, list[float]] = {}
    for pid, _, p in judgments:
        per.setdefault(pid, []).append(p)
    return PairLabel(prob_x=mean, mean_xy=mean_xy, mean_yx=mean_yx, status=status, chosen=chosen,
                     label_prob=max(mean, 1.0 - mean), n=len(judgments),
                     per_principle={k: sum(v) / len(v) for k, v in per.items()})


# --- engine calls (pure given an engine) ---------------------------------------------------

@dataclass(frozen=True)
class Scored:
    logp_a: float
    logp_b: float
    prob_a: float  # before clamping
    prob_x: float  # after clamping
    mode: str = "logprobs"  # how the engine scored it (engines.base.ChoiceScores): a remote judge may hard-label


def score(engine: Engine, conversations: Sequence[list[Message]], orders: Sequence[str],
          bounds: tuple[float, float] | None = None) -> list[Scored]:
    """One batched `choice_logprobs` call; each conversation ends with the answer prefix."""
    rows = engine.choice_logprobs(list(conversations), [CHOICE_A, CHOICE_B])
    if len(rows) != len(conversations):
        raise RuntimeError(f"choice_logprobs returned {len(rows)} rows for {len(conversations)} "
                           "conversations")
    out = []
    for row, order in zip(rows, orders, strict=True):
        la, lb = float(row[CHOICE_A]), float(row[CHOICE_B])
        pa = prob_a(la, lb)
        out.append(Scored(la, lb, pa, clamp(prob_x(order, pa), bounds), getattr(row, "mode", "logprobs")))
    return out


def reason(engine: Engine, conversations: Sequence[list[Message]], sampling: Sampling) -> list[str]:
    """One batched `generate` call for chain-of-thought reasoning, cleaned of any verdict."""
    outs = engine.generate(list(conversations), sampling)
    return [clean_reasoning(c.text) for c in outs]


# --- contextual calibration (Zhao et al. 2021) ---------------------------------------------
# A small judge prefers one slot whatever the options say (SmolLM2-135M picks (A) in ~69 % of
# judgments). Its prior is estimated per principle from content-free inputs, where no option can
# be better, and divided out: q(A) ∝ p(A) / prior(A), q(B) ∝ p(B) / (1 − prior(A)).

CONTENT_FREE = ("N/A", "", "[...]")  # stand-ins for the conversation and both answers


def content_free_conversations(question: str, max_chars: int) -> list[list[Message]]:
    """Answer conversations whose conversation and options carry no content, for one principle."""
    prompt = [{"role": "user", "content": "N/A"}]
    return [answer_conversation(judge_question(prompt, question, cf, cf, max_chars)) for cf in CONTENT_FREE]


def prior_a(engine: Engine, question: str, max_chars: int) -> float:
    """The judge's mean P(A) on content-free inputs for this principle (0.5 = no slot bias)."""
    rows = engine.choice_logprobs(content_free_conversations(question, max_chars), [CHOICE_A, CHOICE_B])
    return sum(prob_a(float(r[CHOICE_A]), float(r[CHOICE_B])) for r in rows) / len(rows)


def calibrate(p_a: float, prior: float) -> float:
    """P(A) with the judge's slot prior removed; prior 0.5 leaves it unchanged."""
    prior = min(max(prior, 1e-6), 1 - 1e-6)
    a, b = p_a / prior, (1.0 - p_a) / (1.0 - prior)
    return a / (a + b) if a + b > 0 else 0.5


def score_calibrated(engine: Engine, conversations: Sequence[list[Message]], orders: Sequence[str],
                     principles: Sequence[Preference], bounds: tuple[float, float] | None, max_chars: int,
                     priors: dict[str, float] | None) -> list[tuple[Scored, float | None]]:
    """`score`, and with `priors` (principle id -> the judge's content-free P(A), filled here on first
    use) each verdict's P(x) with that slot prior removed; None where not calibrating."""
    scored = score(engine, conversations, orders, bounds)
    if priors is None:
        return [(sc, None) for sc in scored]
    out = []
    for pref, order, sc in zip(principles, orders, scored, strict=True):
        if pref.id not in priors:
            priors[pref.id] = prior_a(engine, pref.question, max_chars)
        out.append((sc, clamp(prob_x(order, calibrate(sc.prob_a, priors[pref.id])), bounds)))
    return out
