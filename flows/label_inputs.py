"""What `cai label` works on: its constitution and prompts, each prompt's candidate replies, the
pairs to judge and the best-of-n plans, and what the store already holds for them.

The label recipe (flows/label.py) and `cai label`'s preflight read these; the pure planning is in
cai/rl_cai.py and cai/best_of_n.py, the queries in store/label_queries.py.
"""

from __future__ import annotations

from typing import Any

from cai import best_of_n, rl_cai
from cai.rl_cai import Candidate, Pair
from constitution.load import Constitution
from flows.common import UserError, load_prompts, resolve_constitution, taught
from flows.configs import LabelConfig
from store import label_queries as q
from store.db import session_scope
from store.models import Prompt, Response
from store.queries import rows_by_id, tags_of


def load_inputs(cfg: LabelConfig) -> tuple[Constitution, list[Prompt]]:
    """Resolve the constitution and prompts; raise UserError on anything unknown. Which stance a
    pair's chosen reply must take comes from this constitution's principles (`stances`)."""
    with session_scope(cfg.database_url) as s:
        c = resolve_constitution(s, cfg.constitution)
    if not c.preferences:
        raise UserError(f"constitution {c.ref} has no preferences: the judge needs at least one question")
    return c, load_prompts(cfg.database_url, cfg.prompts, cfg.limit)


def stances(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> tuple[dict[str, bool | None], Any]:
    """prompt id -> True (refuse) / False (answer) / None (ungoverned) under this constitution's
    principles, and the refusals it teaches (for the gates' stance check)."""
    from constitution.govern import Governance

    gov = Governance([c])
    with session_scope(cfg.database_url) as s:
        tags = tags_of(s, [p.id for p in prompts])
    return {p.id: gov.refuse(p.category, tags[p.id]) for p in prompts}, taught(gov)


def preflight(cfg: LabelConfig) -> None:
    """Everything that can be wrong with the input, checked before Prefect starts (seconds)."""
    c, prompts = load_inputs(cfg)
    if not prompts:
        raise UserError(f"no prompts tagged {','.join(cfg.prompts)}")
    if cfg.source == "store":
        candidates(cfg, c, prompts)
    if cfg.source == "best-of-n":
        reward_model_dir(cfg)


def reward_model_dir(cfg: LabelConfig):
    """The reward model directory of best-of-n, checked: a UserError unless `cai reward train` wrote it."""
    from pathlib import Path

    from training.reward import is_reward_model_dir

    path = Path(cfg.reward_model).expanduser()
    if not is_reward_model_dir(path):
        raise UserError(f"--reward-model {path}: not a reward model directory; train one with "
                        f"`cai reward train --out {path}`")
    return path


def candidates(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> dict[str, list[Candidate]]:
    """prompt id -> the responses to compare: this config's samples, or stored rows of `kinds`."""
    ids = [p.id for p in prompts]
    sampled = cfg.source in ("samples", "best-of-n")
    items = rl_cai.sample_items(cfg, prompts) if sampled else []
    with session_scope(cfg.database_url) as s:
        if sampled:
            rows = list(rows_by_id(s, Response, [k for k, _, _ in items]).values())
        else:
            rows = q.responses_for(s, ids, cfg.policy,
                                   [k for k in cfg.kinds if k not in ("revision", "final-revision")])
            if "revision" in cfg.kinds or "final-revision" in cfg.kinds:
                # revisions belong to a constitution: only those made under this one's name
                revs = q.responses_for(s, ids, cfg.policy, ["revision"], constitution=c.name)
                rows += revs if "revision" in cfg.kinds else rl_cai.final_revisions(revs)
    if not sampled and not rows:
        raise UserError(f"no stored responses of kind {','.join(cfg.kinds)} from model {cfg.policy!r} for "
                        f"prompts tagged {','.join(cfg.prompts)}; run `cai generate` first, or use "
                        "--source samples")
    have = {r.id for r in rows}  # a dry run counts samples not made yet as made, as long as they may be
    stand_ins = [(key, p) for key, p, _ in items if key not in have] if cfg.runner.dry_run else []
    return rl_cai.candidates(prompts, rows, stand_ins, cfg.policy, cfg.max_new_tokens)


def plan_pairs(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> list[Pair]:
    return rl_cai.prompt_pairs(prompts, candidates(cfg, c, prompts))


def plan_best_of_n(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]
                   ) -> list[tuple[str, Prompt, list[Candidate]]]:
    """(pair id, prompt, its sampled replies) for every prompt with at least two non-empty samples."""
    from engines.bundled import model_fingerprint

    rm = model_fingerprint(reward_model_dir(cfg))
    return best_of_n.plan(prompts, candidates(cfg, c, prompts), rm, cfg.min_margin)


def counts(cfg: LabelConfig, c: Constitution, prompts: list[Prompt]) -> dict[str, int]:
    """What the store holds for this config: pairs by status and their judgments."""
    if cfg.source == "best-of-n":
        ids, judgments = [k for k, _, _ in plan_best_of_n(cfg, c, prompts)], None
    else:
        items = rl_cai.pair_plan(cfg, c, plan_pairs(cfg, c, prompts))
        ids, judgments = [it.id for it in items], [k for it in items for k in it.judgments]
    with session_scope(cfg.database_url) as s:
        return q.pair_counts(s, ids, judgments)
