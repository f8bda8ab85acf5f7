"""Which prompts are held out: one rule for an export's test splits and training's held-out pairs.

    held_out_prompts(prompt_ids, 0.1)                 # cai export's test_prefs / test_sft prompts
    held_out_prompts(prompt_ids, 0.1, min_prompts=2, at_least_one=True)  # cai train's held-out pairs

A prompt is held out when the salted sha256 of its id falls under the fraction: stable as data is
added, the same for every pair of a prompt, and the same in `cai export` and `cai train`, so a user
who trains on an export and one who trains from the store evaluate on the same prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLIT_SALT = "cai-factory/split/v1"  # changing it reshuffles every prompt: never do it silently
RULE = f"test if sha256('{SPLIT_SALT}:' + prompt_id)[:8 bytes] / 2**64 < test_fraction"  # `bucket`, in words
MIN_PROMPTS_FOR_TEST = 10  # an export with fewer prompts: an empty test split is honest, one prompt is no test set


def bucket(prompt_id: str) -> float:
    """The prompt's place in [0, 1): a salted hash of its id."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(prompt_id: str, fraction: float) -> bool:
    """The hash rule alone (held_out_prompts adds the small-set fallbacks)."""
    return bucket(prompt_id) < fraction


def held_out_prompts(prompt_ids: Iterable[str], fraction: float, *, min_prompts: int = MIN_PROMPTS_FOR_TEST,
                     at_least_one: bool = False) -> set[str]:
    """The prompts whose pairs are held out: those whose bucket is under `fraction`.

    Few prompts can all hash to the training side. Then, with at least `min_prompts` prompts, the
    round(n * fraction) prompts with the lowest buckets are held out instead, one at least with
    `at_least_one` (training's early stop needs a held-out set; an export asked for a fraction worth
    no prompt writes none). Deterministic, and the export's card says so; later runs with more
    prompts may give them back once the hash rule holds any prompt out. Never every prompt: the one
    with the highest bucket stays for training.
    """
    ids = sorted(set(prompt_ids))
    if fraction <= 0 or len(ids) < 2:
        return set()
    held = {p for p in ids if is_held_out(p, fraction)}
    if not held and len(ids) >= min_prompts:
        want = max(1, round(len(ids) * fraction)) if at_least_one else round(len(ids) * fraction)
        held = set(sorted(ids, key=lambda p: (bucket(p), p))[:want])
    if len(held) == len(ids):
        held.discard(max(held, key=lambda p: (bucket(p), p)))
    return held
