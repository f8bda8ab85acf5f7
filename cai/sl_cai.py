"""Pure functions of the SL-CAI stage: conversations, principle draws, content keys.

No database, no Prefect, no model: `flows/generate.py` wires these to the store and engine,
and tests call them directly. Each row kind has one builder (`initial_item`, `critique_item`,
`revision_item`) that both the planner and the resume walker use, so their keys cannot drift, and
one builder per stored row (`response_row`, `revision_pair`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cai.quality import finish
from constitution.load import Constitution, Principle
from engines.base import Completion
from store.keys import content_hash
from store.models import PreferencePair, Response

Message = dict[str, str]


def few_shot_prefix(c: Constitution, principle: Principle) -> list[Message]:
    """The few-shot examples of `principle` as chat turns (none if it has none). Only its own: an
    edit to another principle's example changes no conversation drawn under this one, so it
    redoes no row of a prompt that never drew that principle."""
    msgs: list[Message] = []
    for ex in c.few_shot_for(principle.id):
        p = c.principle(ex.principle)
        msgs += [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.response},
            {"role": "user", "content": p.critique},
            {"role": "assistant", "content": ex.critique},
            {"role": "user", "content": p.revision},
            {"role": "assistant", "content": ex.revision},
        ]
    return msgs


def critique_conversation(c: Constitution, prompt: list[Message], response: str, p: Principle) -> list[Message]:
    return few_shot_prefix(c, p) + list(prompt) + [
        {"role": "assistant", "content": response},
        {"role": "user", "content": p.critique},
    ]


def revision_conversation(c: Constitution, prompt: list[Message], response: str, p: Principle,
                          critique: str) -> list[Message]:
    return critique_conversation(c, prompt, response, p) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": p.revision},
    ]


def draw_principle(c: Constitution, seed: int, prompt_id: str, round_: int,
                   governing: str | None = None) -> Principle:
    """One principle per (prompt, round): in round 1 the principle that governs the prompt (when
    this constitution has one for it: constitution/govern.py), else drawn by a seeded hash of the ids.

    Drawing by id (not by text) means editing a principle's wording does not reshuffle which
    prompts use which principle, so only the rows that used the edited one are redone.
    """
    if governing and round_ == 1:
        return c.principle(governing)
    ids = sorted(p.id for p in c.principles)
    idx = int(content_hash("draw", seed, prompt_id, round_, length=16), 16) % len(ids)
    return c.principle(ids[idx])


def response_key(kind: str, prompt_id: str, parent_id: str | None, round_: int, model: str,
                 sampling: dict, conversation: list[Message]) -> str:
    """What produced a row; the exact conversation covers principle text and parent text."""
    return content_hash("response", kind, prompt_id, parent_id, round_, model, sampling, conversation)


def revision_pair_key(constitution: str, prompt_id: str, chosen_id: str, rejected_id: str) -> str:
    """No version in it: the rows' keys already cover every text that made them, so the same two
    rows are the same pair under every version that would make them."""
    return content_hash("pair", "revision", constitution, prompt_id, chosen_id, rejected_id)


@dataclass
class WorkItem:
    """One pending model call of a stage."""

    key: str
    prompt_id: str
    kind: str  # initial | critique | revision
    round: int
    conversation: list[Message]
    parent_id: str | None = None
    critique_id: str | None = None
    critique: str | None = None
    principle: Principle | None = None

    @property
    def size(self) -> int:
        return sum(len(m["content"]) for m in self.conversation)


# --- one builder per row kind: the planner and the chain walker both call these -------------

def initial_item(prompt_id: str, messages: list[Message], model: str, sampling: dict) -> WorkItem:
    return WorkItem(key=response_key("initial", prompt_id, None, 0, model, sampling, messages),
                    prompt_id=prompt_id, kind="initial", round=0, conversation=list(messages))


def critique_item(c: Constitution, prompt_id: str, messages: list[Message], parent_id: str, parent_text: str,
                  round_: int, seed: int, model: str, sampling: dict, governing: str | None = None) -> WorkItem:
    principle = draw_principle(c, seed, prompt_id, round_, governing)
    conv = critique_conversation(c, messages, parent_text, principle)
    return WorkItem(key=response_key("critique", prompt_id, parent_id, round_, model, sampling, conv),
                    prompt_id=prompt_id, kind="critique", round=round_, conversation=conv, parent_id=parent_id,
                    principle=principle)


def revision_item(c: Constitution, prompt_id: str, messages: list[Message], parent_id: str, parent_text: str,
                  critique_id: str, critique_text: str, round_: int, seed: int, model: str,
                  sampling: dict, governing: str | None = None) -> WorkItem:
    principle = draw_principle(c, seed, prompt_id, round_, governing)
    conv = revision_conversation(c, messages, parent_text, principle, critique_text)
    return WorkItem(key=response_key("revision", prompt_id, parent_id, round_, model, sampling, conv),
                    prompt_id=prompt_id, kind="revision", round=round_, conversation=conv, parent_id=parent_id,
                    critique_id=critique_id, critique=critique_text, principle=principle)


# --- the rows a stage stores ----------------------------------------------------------------

def response_row(it: WorkItem, comp: Completion, request: str, c: Constitution, model: str, sampling: dict,
                 seed: int, run_id: str) -> Response:
    """The row of one model call. An answer to the user (initial, revision) is gated and cut back to
    its last sentence (cai.quality.finish; `request` is the prompt's text); a critique answers the
    critic and is stored as written."""
    text, quality = comp.text.strip(), None
    if it.kind != "critique":
        text, quality = finish(request, text, comp.outputs[0].finish_reason)
    return Response(
        id=it.key, prompt_id=it.prompt_id, kind=it.kind, round=it.round, parent_id=it.parent_id,
        critique_id=it.critique_id, critique=it.critique,
        principle_id=it.principle.id if it.principle else None,
        principle_hash=it.principle.hash if it.principle else None,
        conversation=it.conversation, text=text, model=model, sampling=sampling,
        seed=seed, constitution=c.name, constitution_version=c.version, run_id=run_id,
        prompt_tokens=comp.prompt_tokens, completion_tokens=comp.outputs[0].completion_tokens,
        finish_reason=comp.outputs[0].finish_reason, quality=quality)


def revision_pair(c: Constitution, prompt_id: str, chain: list[Response], rounds: int, status: str, model: str,
                  run_id: str) -> PreferencePair:
    """chosen = the chain's final revision, rejected = its initial answer; the principles are those
    its revisions were made under (with their hashes, so an edit shows which pairs it touched)."""
    initial, final = chain[0], chain[-1]
    used = [r for r in chain if r.kind == "revision"]
    return PreferencePair(
        id=revision_pair_key(c.name, prompt_id, final.id, initial.id), prompt_id=prompt_id,
        chosen_id=final.id, rejected_id=initial.id, method="revision", label_prob=1.0, status=status,
        principle_ids=[r.principle_id for r in used], constitution=c.name,
        constitution_version=c.version, policy_model=model, run_id=run_id,
        details={"rounds": rounds, "chain": [r.id for r in chain],
                 "principle_hashes": {r.principle_id: r.principle_hash for r in used if r.principle_id}})
