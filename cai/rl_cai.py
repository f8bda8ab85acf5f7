"""Pure pieces of RL-CAI labelling: content keys, candidate pairs, the judgment plan, the job's size.

`flows/label.py` reads candidates from the store and runs these plans through the engine; the
functions that take `cfg` read a LabelConfig's settings (flows/configs.py), as the flow has them;
`cai/judge.py` holds the judge prompt and the probability arithmetic, `cai/label_rows.py` the rows stored.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cai import judge
from constitution.load import Constitution, Preference
from engines.base import Completion, Engine, Sampling
from store.keys import content_hash
from store.models import Prompt, Response

Message = dict[str, str]


def sample_key(prompt_id: str, model: str, sampling: dict, seed: int, index: int) -> str:
    return content_hash("sample", prompt_id, model, sampling, seed, index)


def sample_items(cfg: Any, prompts: list[Prompt]) -> list[tuple[str, Prompt, int]]:
    """(key, prompt, sample index) of each of the `cfg.samples` policy samples of every prompt."""
    return [(sample_key(p.id, cfg.policy, cfg.sampling(i).to_dict(), cfg.seed, i), p, i)
            for p in prompts for i in range(cfg.samples)]


def job_size(cfg: Any, n_prompts: int) -> dict[str, int]:
    """New tokens (samples, CoT arguments) and choice scorings the run needs at most."""
    pairs = n_prompts * (cfg.samples * (cfg.samples - 1) // 2 if cfg.source == "samples" else 1)
    judgments = pairs * cfg.principles_per_pair * 2  # both orders
    tokens = n_prompts * cfg.samples * cfg.max_new_tokens if cfg.source in ("samples", "best-of-n") else 0
    if cfg.cot:
        tokens += judgments * cfg.cot_max_new_tokens
    return {"job_tokens": tokens, "job_scorings": judgments}


COT_KIND = "judge-cot"  # CoT reasoning is its own Response row so the cot stage can resume


def cot_key(judgment: str) -> str:
    return content_hash(COT_KIND, judgment)


def nonempty(outs: list[Completion]) -> list[Completion | Exception]:
    """An empty reply fails its item (retried, then quarantined) instead of becoming a row."""
    return [c if c.text.strip() else ValueError("empty output from the model") for c in outs]


def generate_samples(engine: Engine, items: list[tuple[str, Prompt, int]],
                     sampling: Callable[[int], Sampling]) -> list[Completion | Exception]:
    """(key, prompt, sample index) items answered with one engine call per sample index (each index
    has its own seeded settings), in the items' order."""
    results: dict[str, Completion | Exception] = {}
    for index in sorted({i for _, _, i in items}):
        group = [it for it in items if it[2] == index]
        outs = engine.generate([p.messages for _, p, _ in group], sampling(index))
        results.update(zip([k for k, _, _ in group], nonempty(outs), strict=True))
    return [results[k] for k, _, _ in items]


def pair_key(prompt_id: str, x_id: str, y_id: str) -> str:
    return content_hash("pair", prompt_id, x_id, y_id)


def judgment_key(pkey: str, principle_hash: str, repeat: int, order: str, judge_model: str,
                 settings: dict) -> str:
    return content_hash("judgment", pkey, principle_hash, repeat, order, judge_model, settings)


def pair_id(constitution: str, pkey: str, judge_model: str, settings: dict, judgments: list[str]) -> str:
    """No version in it: the judgments' keys cover the preference texts they used, so a pair is
    minted again only when a question it was judged under changed."""
    return content_hash("ai", constitution, pkey, judge_model, settings, sorted(judgments))


@dataclass(frozen=True)
class Candidate:
    id: str
    text: str
    model: str


@dataclass(frozen=True)
class Pair:
    key: str
    prompt_id: str
    prompt: list[Message]
    x: Candidate  # canonical order: x.id < y.id
    y: Candidate


def final_revisions(revisions: list[Response]) -> list[Response]:
    """Each prompt's revisions of its last round (the `final-revision` kind), in the order given."""
    last: dict[str, int] = {}
    for r in revisions:
        last[r.prompt_id] = max(last.get(r.prompt_id, 0), r.round)
    return [r for r in revisions if r.round == last[r.prompt_id]]


def dry_run_candidate(key: str, model: str, max_new_tokens: int) -> Candidate:
    """A stand-in for a sample a dry run has not made: as long as it may be, and distinct (identical
    texts are never paired)."""
    text = (key + " " + "x" * 4 * max_new_tokens)[:4 * max_new_tokens]
    return Candidate(key, text, model)


def form_pairs(prompt_id: str, prompt: list[Message], candidates: list[Candidate]) -> list[Pair]:
    """Every unordered pair of a prompt's candidates, x before y by id; identical texts skipped."""
    unique = sorted({c.id: c for c in candidates}.values(), key=lambda c: c.id)
    return [Pair(pair_key(prompt_id, x.id, y.id), prompt_id, prompt, x, y)
            for x, y in itertools.combinations(unique, 2) if x.text.strip() != y.text.strip()]


def candidates(prompts: list[Prompt], rows: list[Response], stand_ins: list[tuple[str, Prompt]], model: str,
               max_new_tokens: int) -> dict[str, list[Candidate]]:
    """prompt id -> the replies to compare: the stored `rows`, then a dry run's stand-ins (key,
    prompt) for samples not made yet."""
    out: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
    for r in rows:
        out[r.prompt_id].append(Candidate(r.id, r.text, r.model))
    for key, p in stand_ins:
        out[p.id].append(dry_run_candidate(key, model, max_new_tokens))
    return out


def prompt_pairs(prompts: list[Prompt], cands: dict[str, list[Candidate]]) -> list[Pair]:
    """Every prompt's pairs of candidates, prompt by prompt (form_pairs)."""
    return [pair for p in prompts for pair in form_pairs(p.id, p.messages, cands[p.id])]


@dataclass(frozen=True)
class JudgmentItem:
    key: str  # the judgment id
    pair: Pair
    principle: Preference
    repeat: int
    order: str
    max_chars: int
    cot: bool

    @property
    def question(self) -> str:
        """The judge's user turn, built when needed: a big run holds many items but few texts."""
        a, b = (self.pair.x, self.pair.y) if self.order == "xy" else (self.pair.y, self.pair.x)
        return judge.judge_question(self.pair.prompt, self.principle.question, a.text, b.text, self.max_chars,
                                    self.cot)

    @property
    def size(self) -> int:
        texts = [m["content"] for m in self.pair.prompt] + [self.pair.x.text, self.pair.y.text]
        return sum(min(len(t), self.max_chars) for t in texts) + len(self.principle.question)


def judge_items(c: Constitution, pairs: list[Pair], *, judge_model: str, settings: dict, seed: int,
                principles_per_pair: int, max_chars: int, cot: bool) -> list[JudgmentItem]:
    """principles_per_pair x both orders per pair; one principle is shared by both orders."""
    return [JudgmentItem(key=judgment_key(p.key, pref.hash, repeat, order, judge_model, settings), pair=p,
                         principle=pref, repeat=repeat, order=order, max_chars=max_chars, cot=cot)
            for p in pairs
            for pref, repeat in judge.draw_principles(c, seed, p.key, principles_per_pair)
            for order in judge.ORDERS]


def judgment_plan(cfg: Any, c: Constitution, pairs: list[Pair]) -> list[JudgmentItem]:
    """The judgments `cfg` asks of these pairs (judge_items with its settings)."""
    return judge_items(c, pairs, judge_model=cfg.judge, settings=cfg.judge_settings(), seed=cfg.seed,
                       principles_per_pair=cfg.principles_per_pair, max_chars=cfg.max_chars, cot=cfg.cot)


@dataclass(frozen=True)
class PairItem:
    id: str
    pair: Pair
    judgments: tuple[str, ...]
    principle_ids: tuple[str, ...]
    principle_hashes: dict[str, str]  # "pref:<id>" -> the hash of the question it was judged under


def pair_items(c: Constitution, pairs: list[Pair], items: list[JudgmentItem], judge_model: str,
               settings: dict) -> list[PairItem]:
    """One pair row per pair, naming the judgments its label averages."""
    by_pair: dict[str, list[JudgmentItem]] = {}
    for it in items:
        by_pair.setdefault(it.pair.key, []).append(it)
    return [PairItem(pair_id(c.name, p.key, judge_model, settings, [it.key for it in by_pair[p.key]]), p,
                     tuple(it.key for it in by_pair[p.key]),
                     tuple(it.principle.id for it in by_pair[p.key] if it.order == "xy"),
                     {f"pref:{it.principle.id}": it.principle.hash for it in by_pair[p.key]}) for p in pairs]


def pair_plan(cfg: Any, c: Constitution, pairs: list[Pair]) -> list[PairItem]:
    """The pair rows `cfg` makes of these pairs, each naming the judgments of judgment_plan it averages."""
    return pair_items(c, pairs, judgment_plan(cfg, c, pairs), cfg.judge, cfg.pair_settings())
