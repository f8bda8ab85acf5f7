"""`cai constitution lint`: what in a set of constitutions would make bad data, found before any run.

    from cai.lint import lint
    findings = lint([harmless, helpful], categories={"weapons": 15, ...}, tags={"red-team": 70},
                    taxonomy={"weapons": "harmful", ...}, count_tokens=len)

One finding per problem, each naming the file, the line and the field. Errors make bad data or
contradict themselves; warnings make less data than the author likely meant:

- error: two principles govern the same category or tag with opposite stances, or one principle's
  example is another's counter-example for the same prompts (contradicting examples);
- error: an example that fails the quality gates (empty, looping, apology-only), a refuse example
  the refusal detector cannot recognise at all, or an answer example it reads as a refusal;
- error: a taxonomy category whose kind (harmful/benign) contradicts the stance governing it;
- warning: a stance principle with nothing to steer with (refuse without examples, answer without
  counter-examples), or that governs nothing, or only categories/tags no stored prompt has;
- warning: a stored (or taxonomy) category no principle governs: its prompts make no pairs and
  the eval counts them apart;
- warning: texts longer than the token budget (`max_example_tokens`, `max_few_shot_tokens`);
- info: a refusal recognised only as this text and near copies of it (no built-in pattern
  matches it), so a trained model's paraphrase of it may be counted as an answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cai.quality import assess
from cai.refusal import Taught, detect
from constitution.govern import Governance
from constitution.load import Constitution, field_lines

MAX_EXAMPLE_TOKENS = 96  # a chosen reply longer than the demo's reply cap is not what the policy writes
MAX_FEW_SHOT_TOKENS = 1024  # per principle's critique/revision few-shot block: a small model's attention fades


@dataclass(frozen=True)
class Finding:
    level: str  # error | warning | info
    file: str
    line: int | None
    where: str  # field path, e.g. principles[3].examples[1]
    message: str

    def __str__(self) -> str:
        at = f"{self.file}:{self.line}" if self.line else self.file
        return f"{at}: {self.level}: {self.where}: {self.message}"


def lint(constitutions: Sequence[Constitution], *, categories: Mapping[str, int] | None = None,
         tags: Mapping[str, int] | None = None, taxonomy: Mapping[str, str] | None = None,
         count_tokens: Callable[[str], int] | None = None, max_example_tokens: int = MAX_EXAMPLE_TOKENS,
         max_few_shot_tokens: int = MAX_FEW_SHOT_TOKENS) -> list[Finding]:
    """Every finding, errors first, then by file and line. `categories` / `tags`: the prompts there
    are (name -> count); `taxonomy`: category -> harmful | benign; `count_tokens`: the tokenizer's
    count (default: words x 1.3)."""
    count = count_tokens or (lambda t: int(len(t.split()) * 1.3) + 1)
    gov = Governance(constitutions)
    taught = Taught.of(gov.taught_refusals())
    out: list[Finding] = []
    for c in constitutions:
        out += _principles(c, categories, tags, taught, count, max_example_tokens, max_few_shot_tokens)
    out += _conflicts(gov)
    out += _ungoverned(gov, categories or {}, taxonomy or {})
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda f: (order[f.level], f.file, f.line or 0, f.where))


def _at(c: Constitution, lines: dict[str, int], path: str, level: str, message: str) -> Finding:
    return Finding(level, c.source_path or c.name, lines.get(path), path, message)


def _principles(c: Constitution, categories, tags, taught: Taught, count, max_example: int,
                max_few_shot: int) -> list[Finding]:
    lines = field_lines(c)
    out: list[Finding] = []
    for i, p in enumerate(c.principles):
        here = f"principles[{i}]"
        name = f"{here} ({p.id})"
        if p.stance and not p.governs and c.default_principle != p.id:
            out.append(_at(c, lines, here, "warning", f"{p.id} has stance {p.stance} but governs no category or "
                           "tag and is not the default_principle: it decides nothing"))
        if p.refuses and not p.examples:
            out.append(_at(c, lines, here, "warning", f"{p.id} refuses but has no examples: the prompts it governs "
                           "make no contrastive pair"))
        if p.stance == "answer" and not (p.counter_examples or p.counter_openings):
            out.append(_at(c, lines, here, "warning", f"{p.id} answers but has no counter_examples (needless "
                           "refusals): the prompts it governs make no helpful pair"))
        if p.governs and (categories is not None or tags is not None):
            have = [x for x in p.governs.categories if (categories or {}).get(x)] + \
                   [x for x in p.governs.tags if (tags or {}).get(x)]
            if not have:
                wanted = ", ".join(list(p.governs.categories) + [f"tag {t}" for t in p.governs.tags])
                out.append(_at(c, lines, f"{here}.governs", "warning", f"{p.id} governs no stored prompt (no "
                               f"prompt has {wanted})"))
        for key, texts in (("examples", p.examples), ("counter_examples", p.counter_examples)):
            for j, text in enumerate(texts):
                path = f"{here}.{key}[{j}]"
                out += _text_findings(c, lines, path, name, key, text, p.refuses, taught, count, max_example)
        for j, stem in enumerate(p.counter_openings):
            if not detect(f"{stem} that.")[0]:
                out.append(_at(c, lines, f"{here}.counter_openings[{j}]", "error", f"{name}: the model finishes "
                               f"{stem!r} itself, so it must open a refusal the detector knows ('{stem} that.' "
                               "does not read as one)"))
        shots = c.few_shot_for(p.id)
        if shots:
            n = sum(count(t) for f in shots for t in (f.prompt, f.response, f.critique, f.revision)) \
                + len(shots) * (count(p.critique) + count(p.revision))
            if n > max_few_shot:
                out.append(_at(c, lines, here, "warning", f"the few-shot block of {p.id} is about {n} tokens (budget "
                               f"{max_few_shot}): a small model loses the conversation it is asked about"))
    return out


def _text_findings(c: Constitution, lines, path: str, name: str, key: str, text: str, refuses: bool,
                   taught: Taught, count, max_example: int) -> list[Finding]:
    out = []
    q = assess("", text)
    failed = [g for g in q.failed if g != "restates-request"]
    if failed:
        out.append(_at(c, lines, path, "error", f"{name}: fails the quality gate {failed[0]!r}, so every pair it "
                       f"makes is gated: {text[:60]!r}"))
    is_refusal = key == "counter_examples" or refuses  # what this text is meant to be
    by_pattern = detect(text)[0]
    if is_refusal and not by_pattern:
        if taught.match(text):
            out.append(_at(c, lines, path, "info", f"{name}: no built-in refusal pattern matches it, so only "
                           "this wording (and near copies) counts as a refusal in the gates and the eval"))
        else:
            out.append(_at(c, lines, path, "error", f"{name}: the refusal detector cannot recognise it as a "
                           "refusal (its first clause is under 3 words); start with a fuller sentence"))
    if not is_refusal and (by_pattern or taught.match(text)):
        out.append(_at(c, lines, path, "error", f"{name}: an example answer of an answer principle reads as a "
                       "refusal, so it would teach refusing"))
    n = count(text)
    if n > max_example:
        out.append(_at(c, lines, path, "warning", f"{name}: about {n} tokens (budget {max_example}): longer than "
                       "the replies the policy writes, it is cut in training"))
    return out


def _conflicts(gov: Governance) -> list[Finding]:
    out = []
    for kind, name, holders in gov.claims():
        if len(holders) < 2:
            continue
        (c0, p0), others = holders[0], holders[1:]
        for c, p in others:
            lines = field_lines(c)
            path = f"principles[{c.principles.index(p)}].governs"
            if p.stance != p0.stance:
                out.append(_at(c, lines, path, "error", f"{kind} {name!r} is governed by {c0.name}:{p0.id} "
                               f"({p0.stance}) and {c.name}:{p.id} ({p.stance}): one prompt cannot be both "
                               f"refused and answered ({c0.name}:{p0.id} wins, being first)"))
                continue
            clash = (set(p0.examples) & set(p.counter_examples)) | (set(p.examples) & set(p0.counter_examples))
            if clash:
                out.append(_at(c, lines, path, "error", f"{kind} {name!r}: {c.name}:{p.id} and {c0.name}:{p0.id} "
                               f"both govern it, and one's example is the other's counter-example: "
                               f"{sorted(clash)[0][:60]!r}"))
            else:
                out.append(_at(c, lines, path, "warning", f"{kind} {name!r} is also governed by {c0.name}:{p0.id}, "
                               f"which comes first: {c.name}:{p.id} never applies to it"))
    return out


def _ungoverned(gov: Governance, categories: Mapping[str, int], taxonomy: Mapping[str, str]) -> list[Finding]:
    out = []
    first = gov.constitutions[0] if gov.constitutions else None
    where = (first.source_path or first.name) if first else "(constitutions)"
    for cat, n in sorted(categories.items()):
        if gov.rule(cat) is None:
            out.append(Finding("warning", where, None, f"category {cat}", f"{n} stored prompts of category "
                               f"{cat!r} are governed by no principle: they make no pair and the eval counts them "
                               "apart (add it to a principle's governs.categories)"))
    for cat, kind in sorted(taxonomy.items()):
        rule = gov.rule(cat)
        if rule is None:
            if cat not in categories:
                out.append(Finding("warning", where, None, f"taxonomy category {cat}", f"the taxonomy's {kind} "
                                   f"category {cat!r} is governed by no principle: red-team prompts of it make no "
                                   "pair and the eval counts them apart"))
            continue
        if rule.refuse != (kind == "harmful"):
            out.append(Finding("error", rule.constitution.source_path or rule.constitution.name, None,
                               f"taxonomy category {cat}", f"the taxonomy calls {cat!r} {kind} but {rule.ref} "
                               f"({rule.stance}) governs it: red-team hits and the eval would disagree"))
    return out
