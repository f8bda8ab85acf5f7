"""Pure pieces of the evaluation: result identity, judge conversations, the summary table.

`flows/evaluate.py` generates both models' answers, runs the judge and stores EvalResult rows;
this module decides what those rows are called and what they add up to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai import judge
from constitution.load import Constitution, Preference
from engines.base import Sampling
from store.keys import content_hash
from store.models import EvalResult, Prompt

ROLES = ("model", "baseline")


def short_name(spec: str) -> str:
    return Path(spec.rstrip("/")).name or spec


def eval_name(label: str, c: Constitution, fingerprints: dict[str, str], principles: int, seed: int,
              sampling: Sampling, engine: str, judge_max_chars: int) -> str:
    """`<label>@<hash of everything that shapes the results>`, so a changed setting never
    mixes with old rows under one name (the report groups by this name)."""
    settings = [fingerprints, c.name, c.version, principles, seed, sampling.to_dict(), engine, judge_max_chars,
                judge.TEMPLATE_ID]
    return f"{label}@{content_hash(settings, length=8)}"


def result_key(name: str, prompt_id: str, role: str, fingerprint: str, sampling: Sampling) -> str:
    return content_hash("eval", name, prompt_id, role, fingerprint, sampling.to_dict())


@dataclass(frozen=True)
class GenItem:
    key: str
    prompt: Prompt
    tag: str
    role: str


@dataclass(frozen=True)
class JudgeItem:
    key: str  # the model's row id: judged when its win_prob is set
    baseline_key: str
    prompt: Prompt
    model_text: str
    baseline_text: str
    principles: tuple[Preference, ...]


@dataclass(frozen=True)
class JudgeOutcome:
    label: judge.PairLabel  # x = the model's answer, y = the baseline's
    judgments: list[dict[str, Any]]  # principle, order, logp_a, logp_b, prob_x


def select_items(prompts_by_tag: dict[str, list[Prompt]], limit: int | None) -> list[tuple[str, Prompt]]:
    """(tag, prompt) per prompt; a prompt in two sets counts in the first set named."""
    seen: set[str] = set()
    out = []
    for tag, prompts in prompts_by_tag.items():
        picked = [p for p in prompts if p.id not in seen]
        picked = picked[:limit] if limit else picked
        seen |= {p.id for p in picked}
        out += [(tag, p) for p in picked]
    return out


def judge_conversations(item: JudgeItem, max_chars: int) -> tuple[list[list[dict]], list[str], list[str]]:
    """Both orders under each principle: (conversations, orders, principle ids), aligned."""
    convs, orders, pids = [], [], []
    texts = {"xy": (item.model_text, item.baseline_text), "yx": (item.baseline_text, item.model_text)}
    for pref in item.principles:
        for order in judge.ORDERS:
            question = judge.judge_question(item.prompt.messages, pref.question, *texts[order], max_chars)
            convs.append(judge.answer_conversation(question))
            orders.append(order)
            pids.append(pref.id)
    return convs, orders, pids


def judge_chunk(engine, items: Sequence[JudgeItem], max_chars: int) -> list[JudgeOutcome]:
    """One batched `choice_logprobs` call for every judgment of a chunk of prompts."""
    parts = [judge_conversations(it, max_chars) for it in items]
    scored = judge.score(engine, [c for convs, _, _ in parts for c in convs],
                         [o for _, orders, _ in parts for o in orders])
    out, i = [], 0
    for convs, orders, pids in parts:
        mine = list(zip(pids, orders, scored[i:i + len(convs)], strict=True))
        i += len(convs)
        out.append(JudgeOutcome(
            label=judge.label_pair([(pid, o, sc.prob_x) for pid, o, sc in mine], min_margin=0.0),
            judgments=[{"principle": pid, "order": o, "logp_a": sc.logp_a, "logp_b": sc.logp_b,
                        "prob_x": sc.prob_x} for pid, o, sc in mine]))
    return out


def rate(values: Sequence[float | bool]) -> float | None:
    return sum(float(v) for v in values) / len(values) if values else None


def summarize(rows: Sequence[EvalResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """prompt set -> role -> n, refusal rate, win rate vs the other model, judged count.

    Win rate is the mean over prompts of P(this answer better), each P already averaged over
    principles and both orders. Position consistency: share of judged prompts whose two
    orders named the same winner (a judge that follows the slot, not the answer, scores low).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[EvalResult]] = {}
    for r in rows:
        groups.setdefault((r.prompt_tag, r.role), []).append(r)
    for (tag, role), rs in sorted(groups.items()):
        judged = [r for r in rs if r.win_prob is not None]
        out.setdefault(tag, {})[role] = {
            "model": rs[0].model,
            "n": len(rs),
            "refusals": sum(r.refused for r in rs),
            "refusal_rate": rate([r.refused for r in rs]),
            "judged": len(judged),
            "win_rate": rate([r.win_prob for r in judged]),
            "position_consistency": rate([r.details.get("status") != "position-inconsistent"
                                          for r in judged]),
        }
    return out
