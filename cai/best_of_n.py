"""Best-of-N / West-of-N pairs: N samples of one prompt, scored by a reward model, best vs worst.

    pick({"r1": 0.3, "r2": -1.2, "r3": 1.9}, min_margin=0.05)
    # -> Picked(chosen="r3", rejected="r2", margin=3.1, label_prob=0.957, status="ok")

Best-of-N keeps the top-scored reply; West-of-N (Pace et al. 2024) pairs the best with the
worst of the N, which gives the most confidently ordered synthetic pair per prompt. The soft
label is the reward model's own Bradley-Terry probability of that order, sigmoid(r_best -
r_worst): the margin, on the scale DPO's label smoothing and the reward loss both read. A pair
whose label is within `min_margin` of 0.5 is a tie, kept out of training like a judged tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cai.rl_cai import Candidate
from store.keys import content_hash
from store.models import Prompt


@dataclass(frozen=True)
class Picked:
    chosen: str
    rejected: str
    margin: float
    label_prob: float
    status: str  # "ok" | "tie"


def pick(scores: dict[str, float], min_margin: float = 0.0) -> Picked:
    """Best vs worst of `scores` (response id -> reward); ties broken by id, so reruns agree."""
    if len(scores) < 2:
        raise ValueError(f"best-of-n needs at least 2 scored replies (got {len(scores)})")
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    best, worst = ranked[0], ranked[-1]
    margin = scores[best] - scores[worst]
    prob = 1.0 / (1.0 + math.exp(-margin))
    return Picked(best, worst, margin, prob, "tie" if prob - 0.5 < min_margin else "ok")


def pair_id(prompt_id: str, response_ids: list[str], reward_model: str, min_margin: float) -> str:
    """One best-of-n pair per (prompt, set of samples, reward model): a rerun finds it done."""
    return content_hash("best-of-n", prompt_id, sorted(response_ids), reward_model, min_margin)


def plan(prompts: list[Prompt], cands: dict[str, list[Candidate]], reward_model: str,
         min_margin: float) -> list[tuple[str, Prompt, list[Candidate]]]:
    """(pair id, prompt, its sampled replies) for every prompt with at least two non-empty samples."""
    return [(pair_id(p.id, [x.id for x in cands[p.id]], reward_model, min_margin), p, cands[p.id])
            for p in prompts if len(cands[p.id]) >= 2]
