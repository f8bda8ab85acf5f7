"""Quality gates on a model reply: what a person reading it would reject, as named, stored checks.

    from cai.quality import assess
    q = assess("How can I sleep better?", "I'm sorry. I'm sorry. I'm sorry. I'm sorry.")
    q.failed       # ('repetition', 'apology-loop')
    q.refused      # False: an apology loop is not a refusal, it is a broken reply

Every response the factory stores gets these figures (`Response.quality`), every pair is judged
by them (`gate_pair`), and the evaluation reports them per model. A 135M model's typical
failures are exactly these: apology or boilerplate loops, one line or list item repeated,
replies that only restate the request, empty or cut-off text. Thresholds were set on the
hand-labelled replies in data/refusal_labelled.jsonl (tests/cai/test_quality.py prints the
precision and recall of each gate there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cai.refusal import Taught, detect

MIN_WORDS = 3  # fewer words is not an answer ("Sure.", "1.")
MAX_REPEATED_TRIGRAMS = 0.25  # share of word trigrams that occur earlier in the reply
MIN_DISTINCT_2 = 0.45  # unique bigrams / bigrams, for replies of 12+ words
MAX_SAME_SENTENCE = 2  # one sentence (normalised) may appear at most twice
MAX_WORD_SHARE = 0.3  # one content word making up this share of an 8+ word reply ("rain rain rain")
MAX_NUMBER_SHARE = 0.4  # a bare numbered list with nothing after the numbers ("1. 2. 3. 4.")
RESTATE_OVERLAP = 0.8  # share of the reply's content words that come from the request

# Sentences that carry no content: apologies, "I'm here to help", "As an AI ...", thanks.
_BOILERPLATE = re.compile(
    r"^(?:i'?m\s+(?:so\s+|really\s+|truly\s+)?sorry|i\s+apologi[sz]e|sorry\b|my\s+apologies|"
    r"i'?m\s+here\s+to\s+help|i\s+am\s+here\s+to\s+help|i'?m\s+(?:just\s+)?an?\s+ai|as\s+an\s+ai|"
    r"thank\s+you\s+for\s+(?:your|the)\s+(?:question|understanding|patience)|i\s+hope\s+this\s+helps|"
    r"please\s+(?:let\s+me\s+know|feel\s+free)|i\s+understand\s+(?:your|that|how))",
    re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_STOP = frozenset("a an the and or but to of in on for with is are was be it i you my me your how what "
                  "can do does should could would please tell about this that".split())


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def repeated_ngram_share(tokens: Sequence[str], n: int = 3) -> float:
    """Share of the n-grams that already occurred earlier in the same text (0 = none repeat)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def distinct_n(tokens: Sequence[str], n: int = 2) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


# A list item or heading opened and left empty at the very end ("...help:\n\n1.", "\n- ", "\n### ").
_DANGLING_MARKER = re.compile(r"(?:\n[ \t]*(?:\d+[.)]|[-*\u2022]|#+)[ \t]*)+$")
_LIST_NUMBER = re.compile(r"(?:^|\n)[ \t]*\d+$")  # before a ".", it numbers an item: no sentence ends there


def dangling(text: str) -> bool:
    """The reply ends announcing what never comes: a trailing colon, or an empty list item or heading."""
    text = text.strip()
    return text.endswith(":") or bool(_DANGLING_MARKER.search("\n" + text))


def trim_to_sentence(text: str) -> str:
    """A reply cut off by the token limit, shortened to its last complete sentence (if it has one).

    An empty list item at the end goes, and so does an announcement that nothing follows ("Here are
    some tips:"): a row ending "...help:\n\n1." would teach a model to stop right after the opener."""
    text = _DANGLING_MARKER.sub("", "\n" + text.strip()).strip()
    if not text or (text[-1] in ".!?)\"'`*" and not _LIST_NUMBER.search(text[:-1])):
        return text
    ends = [m.start() for m in re.finditer(r"[.!?](?=\s)", text) if not _LIST_NUMBER.search(text[:m.start()])]
    return text[:ends[-1] + 1].strip() if ends else text


@dataclass(frozen=True)
class Quality:
    words: int
    repeated_trigrams: float
    distinct_2: float
    max_sentence_repeats: int
    boilerplate_sentences: int
    boilerplate_share: float
    restates: bool
    truncated: bool
    refused: bool
    refusal_pattern: str | None
    failed: tuple[str, ...]  # names of the gates this reply fails, in GATES order

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = list(self.failed)
        return d


GATES = ("empty", "truncated", "dangling", "repetition", "apology-loop", "restates-request")


def assess(prompt: str, reply: str, finish_reason: str | None = None, taught: Taught | None = None) -> Quality:
    """Every gate's figure for one reply to `prompt` (the user's request text). `taught`: the
    refusals the constitutions teach (cai/refusal.py), which count as refusals too."""
    toks = words(reply)
    sents = [s.lower().rstrip(".!? ") for s in sentences(reply)]
    counts: dict[str, int] = {}
    for s in sents:
        counts[s] = counts.get(s, 0) + 1
    # a sentence that declines ("I'm sorry, but as an AI I can't ...") carries the refusal: not filler
    boiler = sum(bool(_BOILERPLATE.match(s)) and not detect(s, taught)[0] for s in sents)
    rep3 = repeated_ngram_share(toks, 3)
    d2 = distinct_n(toks, 2)
    content = [w for w in toks if w not in _STOP]
    asked = set(words(prompt))
    overlap = sum(w in asked for w in content) / len(content) if content else 0.0
    restates = bool(content) and overlap >= RESTATE_OVERLAP and len(toks) <= 2 * max(len(words(prompt)), 4)
    # a colon the cap cut after announces what never came: cut off, not complete
    truncated = finish_reason == "length" and bool(reply.strip()) and reply.strip()[-1] not in ".!?)\"'`*"
    refused, pattern = detect(reply, taught)
    most = max(counts.values(), default=0)
    failed = []
    if len(toks) < MIN_WORDS:
        failed.append("empty")
    if truncated and trim_to_sentence(reply) == reply.strip():  # cut off with no complete sentence
        failed.append("truncated")
    if finish_reason != "length" and dangling(reply):  # the model itself stopped after "Here's how:\n\n1."
        failed.append("dangling")
    top_word = max((toks.count(w) for w in set(content)), default=0)
    numbers = sum(w.isdigit() for w in toks)
    if (rep3 > MAX_REPEATED_TRIGRAMS or most > MAX_SAME_SENTENCE or (len(toks) >= 12 and d2 < MIN_DISTINCT_2)
            or (len(toks) >= 8 and top_word / len(toks) > MAX_WORD_SHARE)
            or (len(toks) >= 6 and numbers / len(toks) >= MAX_NUMBER_SHARE
                and sum(not w.isdigit() for w in content) < 3)):
        failed.append("repetition")
    # an apology loop: two or more content-free sentences that make up most of the reply, or a
    # reply that is nothing but apology/boilerplate ("I'm sorry for any confusion."): no answer,
    # and no refusal either (a refusal that opens with "I'm sorry, but I can't" is not one)
    if (boiler >= 2 and boiler / max(len(sents), 1) >= 0.5) or (not refused and sents and boiler == len(sents)):
        failed.append("apology-loop")
    if restates and not refused:
        failed.append("restates-request")
    return Quality(words=len(toks), repeated_trigrams=round(rep3, 4), distinct_2=round(d2, 4),
                   max_sentence_repeats=most, boilerplate_sentences=boiler,
                   boilerplate_share=round(boiler / len(sents), 4) if sents else 0.0, restates=restates,
                   truncated=truncated, refused=refused, refusal_pattern=pattern, failed=tuple(failed))


def merit(q: Quality, refuse: bool | None) -> int:
    """How good a reply is for ordering a pair: minus its failed gates, plus one for the right
    stance (refusing a request its governing principle says to refuse; answering one it says to
    answer; no stance when nothing governs the prompt)."""
    stance = 0 if refuse is None else int(q.refused == refuse)
    return stance - len(q.failed)


def gate_pair(chosen: Quality, rejected: Quality, refuse: bool | None) -> str | None:
    """None when the pair may train; else the status that keeps it out (and says why).

    `gated:<gate>`: the chosen reply fails that gate. `gated:not-better`: the chosen reply is
    no better than the rejected one on the gates and the stance (e.g. both refuse).
    """
    if chosen.failed:
        return f"gated:{chosen.failed[0]}"
    if refuse is not None and chosen.refused != refuse:
        return "gated:wrong-stance"  # a refusal chosen where the principle says answer, or the reverse
    if merit(chosen, refuse) <= merit(rejected, refuse):
        return "gated:not-better"
    return None


def pair_status(prompt: Any, chosen: Any, rejected: Any, refuse: bool | None, taught: Taught | None = None) -> str:
    """"ok", or the gate status (gate_pair) that keeps a pair out of training and export, for a
    prompt row and two reply rows.

    `refuse` is the stance the prompt's governing principle declares (constitution/govern.py; None:
    nothing governs it, so no stance is checked). Rows stored before gates existed have no quality
    figures: they are assessed here, knowing the constitutions' own refusals (`taught`).
    """
    def q(r: Any) -> Quality:
        return from_dict(r.quality) if r.quality else assess(prompt.text, r.text, r.finish_reason, taught)

    return gate_pair(q(chosen), q(rejected), refuse) or "ok"


def finish(prompt: str, text: str, finish_reason: str | None, taught: Taught | None = None) -> tuple[str, dict]:
    """What a stage stores for one reply: the text (cut back to its last complete sentence when the
    token limit stopped it mid-sentence, so no training row ends mid-word) and its gate figures."""
    text = text.strip()
    trimmed = trim_to_sentence(text) if finish_reason == "length" else text
    q = assess(prompt, trimmed, "stop" if trimmed != text else finish_reason, taught)
    return trimmed, q.to_dict() | {"trimmed": trimmed != text}


def from_dict(d: dict) -> Quality:
    """A stored Response.quality back as a Quality."""
    fields = {k: v for k, v in d.items() if k in Quality.__dataclass_fields__}
    fields["failed"] = tuple(fields.get("failed", ()))
    return Quality(**fields)
