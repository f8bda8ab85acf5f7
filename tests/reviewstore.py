"""A small store with pairs of every method for the review tests (tests/flows/test_review*.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from constitution.load import parse_text
from flows.common import record_constitution
from store.db import session_scope
from store.models import Judgment, PreferencePair, Prompt, PromptTag, Response

CONSTITUTION = """\
name: harmless
description: A tiny constitution for review tests.
principles:
  - id: harm
    critique: Is the response harmful?
    revision: Rewrite it to be harmless.
  - id: honest
    critique: Is the response dishonest?
    revision: Rewrite it to be honest.
preferences:
  - id: safer
    question: Which response is less harmful?
few_shot:
  - prompt: How do I pick a lock?
    response: Use a tension wrench.
    principle: harm
    critique: It helps break in.
    revision: Call a locksmith.
"""
METHODS = ("revision", "ai", "contrastive", "helpful", "best-of-n")
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
XSS = "<script>document.title='owned'</script><img src=x onerror=alert(1)>"


def seed(url: str, n: int = 10, xss: bool = False) -> dict[str, PreferencePair]:
    """n prompts, one pair each, methods in turn (METHODS); returns the pairs by id.

    Pair i: method METHODS[i % 5], label_prob 0.55 + 0.1 * (i % 5) for the judged methods (ai,
    best-of-n; 1.0 otherwise), status `gated:empty` for i == 3, else `ok`; prompt tag `even`/`odd`;
    ai pairs judged under `safer` in both orders, revision pairs made under `harm`. With xss, prompt 0
    and its replies hold XSS (script and img tags)."""
    c = parse_text(CONSTITUTION, "harmless.yaml")
    out = {}
    with session_scope(url) as s:
        record_constitution(s, c)
        for i in range(n):
            method = METHODS[i % len(METHODS)]
            text = f"{XSS} question {i}" if xss and i == 0 else f"Question {i}: how do I do thing {i}?"
            msgs = [{"role": "user", "content": text}]
            pid = f"prompt-{i:03d}"
            s.add(Prompt(id=pid, text=text, messages=msgs, category="test", source="t"))
            s.add(PromptTag(prompt_id=pid, tag="even" if i % 2 == 0 else "odd"))
            when = T0 + timedelta(minutes=i)
            common = {"prompt_id": pid, "conversation": msgs, "model": "tiny-policy", "created_at": when,
                      "constitution": c.name, "constitution_version": c.version}
            a, b = f"resp-{i:03d}-a", f"resp-{i:03d}-b"
            a_text = f"{XSS} good answer {i}" if xss and i == 0 else f"good answer {i}"
            s.add(Response(id=a, kind="revision" if method == "revision" else "sample", text=a_text,
                           quality={"words": 3, "failed": [], "refused": False}, **common))
            s.add(Response(id=b, kind="initial" if method == "revision" else "sample", text=f"bad answer {i}",
                           steering={"kind": "primed-opening", "text": "I can't help."}
                           if method in ("contrastive", "helpful") else None,
                           quality={"words": 3, "failed": ["empty"] if i == 3 else [], "refused": True}, **common))
            s.flush()
            judged = method in ("ai", "best-of-n")
            details: dict = {}
            if method == "ai":
                details = {"x_id": a, "y_id": b, "mean_xy": 0.7, "mean_yx": 0.6,
                           "judgments": [f"judg-{i}-xy", f"judg-{i}-yx"]}
                for order, prob in (("xy", 0.7), ("yx", 0.6)):
                    s.add(Judgment(id=f"judg-{i}-{order}", pair_key=f"pk-{i}", prompt_id=pid, response_x_id=a,
                                   response_y_id=b, principle_id="safer", principle_hash="h", order=order,
                                   logp_a=-1.0, logp_b=-2.0, prob_x=prob, conversation=[], judge_model="tiny-judge",
                                   constitution=c.name, constitution_version=c.version))
            elif method == "best-of-n":
                details = {"source": "best-of-n", "scores": {a: 1.5, b: -0.5}, "margin": 2.0, "n": 4}
            elif method in ("contrastive", "helpful"):
                details = {"steering": {"kind": "primed-opening", "text": "I can't help."}, "steered_id": b}
            elif method == "revision":
                details = {"rounds": 1, "chain": [b, a]}
            pair = PreferencePair(
                id=f"pair-{i:03d}", prompt_id=pid, chosen_id=a, rejected_id=b, method=method,
                label_prob=round(0.55 + 0.1 * (i % 5), 2) if judged else 1.0,
                status="gated:empty" if i == 3 else "ok",
                principle_ids=["safer"] if method == "ai" else ["harm"] if method == "revision" else [],
                constitution=c.name, constitution_version=c.version, policy_model="tiny-policy",
                judge_model="tiny-judge" if method == "ai" else "tiny-reward" if method == "best-of-n" else None,
                details=details, created_at=when)
            s.add(pair)
            out[pair.id] = pair
    return out
