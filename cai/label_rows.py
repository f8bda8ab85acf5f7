"""What `cai label` stores: the row each stage writes for an item and its result; no reads.

    cai label --constitution harmless --prompts red-team --samples 2 --principles-per-pair 4 [--cot]

flows/label.py runs the stages (sample -> cot -> judge -> pair, or sample -> reward for best-of-n)
and hands each finished batch to these: `sample_row` and `cot_row` (Response rows), `judgment_row`
(one judge verdict in one order), `pair_label` (the averaged soft label from stored judgments),
`ai_pair_row` and `best_of_n_row` (PreferencePair rows). What a row is keyed by is in cai/rl_cai.py.
"""

from __future__ import annotations

from typing import Any

from cai import best_of_n, judge
from cai.quality import assess
from cai.rl_cai import COT_KIND, Candidate, JudgmentItem, PairItem, cot_key
from constitution.load import Constitution
from engines.base import Completion, Sampling
from store.models import Judgment, PreferencePair, Prompt, Response

Message = dict[str, str]


def sample_row(key: str, p: Prompt, index: int, comp: Completion, *, model: str, sampling: Sampling, seed: int,
               c: Constitution, run_id: str) -> Response:
    """One policy sample, with its quality figures (the gates read them)."""
    return Response(
        id=key, prompt_id=p.id, kind="sample", sample_index=index, conversation=p.messages,
        text=comp.text.strip(), quality=assess(p.text, comp.text, comp.outputs[0].finish_reason).to_dict(),
        model=model, sampling=sampling.to_dict(), seed=seed,
        constitution=c.name, constitution_version=c.version, run_id=run_id,
        prompt_tokens=comp.prompt_tokens, completion_tokens=comp.outputs[0].completion_tokens,
        finish_reason=comp.outputs[0].finish_reason,
    )


def cot_row(it: JudgmentItem, comp: Completion, *, model: str, sampling: Sampling, seed: int, c: Constitution,
            run_id: str) -> Response:
    """The judge's reasoning for one judgment: its own Response row, so the cot stage can resume."""
    return Response(
        id=cot_key(it.key), prompt_id=it.pair.prompt_id, kind=COT_KIND, principle_id=it.principle.id,
        principle_hash=it.principle.hash, conversation=judge.cot_conversation(it.question),
        text=judge.clean_reasoning(comp.text), model=model, sampling=sampling.to_dict(),
        seed=seed, constitution=c.name, constitution_version=c.version, run_id=run_id,
        prompt_tokens=comp.prompt_tokens, completion_tokens=comp.outputs[0].completion_tokens,
        finish_reason=comp.outputs[0].finish_reason,
    )


def judgment_row(it: JudgmentItem, r: judge.Scored, calibrated: float | None, *, conversation: list[Message],
                 reasoning: str | None, judge_model: str, c: Constitution, run_id: str) -> Judgment:
    """One verdict in one order. With calibration, prob_x is the calibrated figure and the raw one is kept."""
    return Judgment(
        id=it.key, pair_key=it.pair.key, prompt_id=it.pair.prompt_id, response_x_id=it.pair.x.id,
        response_y_id=it.pair.y.id, principle_id=it.principle.id, principle_hash=it.principle.hash,
        order=it.order, logp_a=r.logp_a, logp_b=r.logp_b, prob_x=r.prob_x if calibrated is None else calibrated,
        prob_x_raw=None if calibrated is None else r.prob_x, scoring=None if r.mode == "logprobs" else r.mode,
        reasoning=reasoning, conversation=conversation, judge_model=judge_model,
        constitution=c.name, constitution_version=c.version, run_id=run_id,
    )


def pair_label(judgments: list[Judgment], min_margin: float) -> tuple[judge.PairLabel, list[str]]:
    """A pair's label from its stored judgments, and how they were scored when not from log-probs."""
    return (judge.label_pair([(j.principle_id, j.order, j.prob_x) for j in judgments], min_margin),
            sorted({j.scoring for j in judgments if j.scoring}))


def chosen_rejected(it: PairItem, lab: judge.PairLabel) -> tuple[Candidate, Candidate]:
    return (it.pair.x, it.pair.y) if lab.chosen == "x" else (it.pair.y, it.pair.x)


def ai_pair_row(it: PairItem, lab: judge.PairLabel, scoring: list[str], *, status: str, c: Constitution,
                policy: str | None, judge_model: str, source: str, settings: dict[str, Any],
                run_id: str) -> PreferencePair:
    """The judged pair; `policy` None (stored replies) names the models of its two replies."""
    chosen, rejected = chosen_rejected(it, lab)
    return PreferencePair(
        id=it.id, prompt_id=it.pair.prompt_id, chosen_id=chosen.id, rejected_id=rejected.id,
        method="ai", label_prob=lab.label_prob, status=status, principle_ids=list(it.principle_ids),
        constitution=c.name, constitution_version=c.version,
        policy_model=policy or ",".join(sorted({it.pair.x.model, it.pair.y.model})),
        judge_model=judge_model,
        details={"pair_key": it.pair.key, "x_id": it.pair.x.id, "y_id": it.pair.y.id,
                 "prob_x": lab.prob_x, "mean_xy": lab.mean_xy, "mean_yx": lab.mean_yx,
                 "n_judgments": lab.n, "principle_hashes": it.principle_hashes,
                 "per_principle": lab.per_principle, "judgments": list(it.judgments),
                 "source": source, "settings": settings,
                 **({"scoring": scoring} if scoring else {})},
        run_id=run_id)


def best_of_n_row(key: str, p: Prompt, n: int, scores: dict[str, float], picked: best_of_n.Picked, *, status: str,
                  c: Constitution, policy: str, reward_model: str, min_margin: float, run_id: str) -> PreferencePair:
    """Best vs worst of the N scored replies (cai/best_of_n.py), with every score kept."""
    return PreferencePair(
        id=key, prompt_id=p.id, chosen_id=picked.chosen, rejected_id=picked.rejected, method="best-of-n",
        label_prob=picked.label_prob, status=status, principle_ids=[], constitution=c.name,
        constitution_version=c.version, policy_model=policy, judge_model=reward_model,
        details={"source": "best-of-n", "scores": scores, "margin": picked.margin, "n": n,
                 "min_margin": min_margin},
        run_id=run_id)
