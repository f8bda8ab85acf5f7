"""The one definition of the exported dataset: split names, column names and feature types.

    cai export --constitution harmless --out exports/harmless

Column names follow TRL, so the splits train without any column mapping:
- `*_sft` splits: `messages` (the prompt's turns + the final revision as the assistant turn),
  what TRL's SFTTrainer reads for conversational data.
- `*_prefs` splits: `prompt`, `chosen`, `rejected` as lists of {"role", "content"}, what TRL's
  DPOTrainer reads for conversational data (`chosen`/`rejected` hold one assistant turn).
- `chosen_cut` / `rejected_cut` / `response_cut`: the generator's token cap stopped that reply
  (store.Response.finish_reason "length"). TRL appends an end-of-turn to every completion, so a
  trainer that keeps these rows teaches the model to stop where the cap cut (`cai train` scores a
  cut reply without one; see DESCRIPTIONS). Readers of a version-1 export (no such columns) take
  a missing column as "not cut".
Every row also carries its provenance, so it can be traced back to the store.

The two row shapes differ, so the Hub card declares two configs (`prefs`, the default, and
`sft`) whose splits keep the DatasetDict's names. Bump SCHEMA_VERSION when a column changes.
"""

from __future__ import annotations

from typing import Any

from datasets import Features, List, Value

SCHEMA_VERSION = 2  # 2: the *_cut columns

MESSAGE = {"role": Value("string"), "content": Value("string")}

# Shared by both row shapes; kept last so the training columns come first in viewers.
_PROVENANCE: dict[str, Any] = {
    "id": Value("string"),
    "prompt_id": Value("string"),
    "method": Value("string"),
    "status": Value("string"),
    "label_prob": Value("float64"),
    "principle_ids": List(Value("string")),
    "constitution": Value("string"),
    "constitution_version": Value("string"),
    "policy_model": Value("string"),
    "judge_model": Value("string"),
    "run_id": Value("string"),
}

SFT_FEATURES = Features({
    "messages": List(MESSAGE),
    "response_id": Value("string"),
    "response_cut": Value("bool"),
    **_PROVENANCE,
})

PREFS_FEATURES = Features({
    "prompt": List(MESSAGE),
    "chosen": List(MESSAGE),
    "rejected": List(MESSAGE),
    "chosen_id": Value("string"),
    "rejected_id": Value("string"),
    "chosen_cut": Value("bool"),
    "rejected_cut": Value("bool"),
    **_PROVENANCE,
})

SPLITS: dict[str, Features] = {
    "train_sft": SFT_FEATURES,
    "test_sft": SFT_FEATURES,
    "train_prefs": PREFS_FEATURES,
    "test_prefs": PREFS_FEATURES,
}

# Hub configs: name -> (its splits, whether it is the default config).
CONFIGS: dict[str, tuple[tuple[str, ...], bool]] = {
    "prefs": (("train_prefs", "test_prefs"), True),
    "sft": (("train_sft", "test_sft"), False),
}

# What a trainer should do with a cut reply: the card says it beside the columns and the counts.
# TRL (1.x) ends every completion with an end-of-turn, conversational (the chat template) or plain
# text (it appends the EOS token), so the rows cannot simply be passed in another format.
CUT_ADVICE = ("Score a cut reply without an end-of-turn/EOS token after it, or a model learns to stop "
              "mid-answer: TRL appends one to every completion (chat template or plain text), so drop "
              "rows with a cut chosen reply (`ds.filter(lambda r: not r[\"chosen_cut\"])`; "
              "`response_cut` for the SFT splits) or tokenize them yourself without it; "
              "`cai train --dataset` does this itself.")

# One line per column for the dataset card.
DESCRIPTIONS: dict[str, str] = {
    "messages": "prompt turns followed by the reply to teach as the assistant turn: the chosen reply of a "
                "revision pair (the final revision), a contrastive pair (the refusal its governing principle "
                "supplies) or a helpful pair (the model's plain answer); never an AI-labelled pair's",
    "prompt": "the prompt's turns, list of {role, content}",
    "chosen": "one assistant turn: the preferred response",
    "rejected": "one assistant turn: the dispreferred response",
    "response_id": "store id of the taught reply (store.Response.id)",
    "chosen_id": "store id of the chosen response",
    "rejected_id": "store id of the rejected response",
    "response_cut": "true when the token cap stopped the taught reply (see `chosen_cut`)",
    "chosen_cut": "true when the generator's token cap stopped the chosen response (finish_reason "
                  "`length`): the model had not finished, though the text may end at a trimmed sentence. "
                  + CUT_ADVICE,
    "rejected_cut": "true when the token cap stopped the rejected response (see `chosen_cut`)",
    "id": "store id of the preference pair the row comes from (store.PreferencePair.id)",
    "prompt_id": "store id of the prompt; the train/test split is a hash of it",
    "method": "`revision` (SL-CAI: final revision over initial answer), `contrastive` (the governing "
              "principle's refusal over the model's plain reply), `helpful` (the model's plain answer over a "
              "needless refusal the principle supplies), `ai` (RL-CAI: the feedback model's label) or "
              "`best-of-n` (a reward model's best over its worst of N samples)",
    "status": "`ok`, or `tie` / `position-inconsistent` when exported with the flags that include them",
    "label_prob": "P(chosen is better): 1.0 for revision, contrastive and helpful pairs; the judge's averaged "
                  "soft label for `ai`, sigmoid of the reward margin for `best-of-n`",
    "principle_ids": "constitution principles used (one per critique round, the governing principle of a "
                     "contrastive or helpful pair, or the judging principles; none for best-of-n)",
    "constitution": "constitution name",
    "constitution_version": "constitution version (short SHA-256 of its canonical content)",
    "policy_model": "model that wrote the responses",
    "judge_model": "feedback model that labelled the pair, or the reward model of best-of-n (null for revision, "
                   "contrastive and helpful pairs)",
    "run_id": "store id of the flow run that made the pair (store.Run.id)",
}


def data_files(fmt: str) -> dict[str, str]:
    """Split -> path (glob) inside the export directory, for the card's `configs`."""
    if fmt == "arrow":
        return {s: f"{s}/data-*.arrow" for s in SPLITS}
    return {s: f"data/{s}.{fmt}" for s in SPLITS}


# Which pairs' chosen reply is a reply to teach (an SFT row, in `cai export` and `cai train` alike): a
# revision, or a reply written to a directive. An AI label's chosen side (`ai`, `best-of-n`) is one model
# sample a judge preferred, at 135M a judge near chance: a preference to learn from, not a reply to copy.
SFT_METHODS = ("revision", "contrastive", "helpful")


def teaches_reply(method: str) -> bool:
    """Is the chosen reply of a pair made this way an SFT row? A record that names no method (a
    preference set made elsewhere, read by `cai train --dataset`) is taken as its author gave it."""
    return method in SFT_METHODS or not method


CUT_FINISH_REASON = "length"  # store.Response.finish_reason when the generator's token cap stopped it


def is_cut(finish_reason: str | None) -> bool:
    """What the *_cut columns hold: the token cap stopped the reply, the model had not finished."""
    return finish_reason == CUT_FINISH_REASON


def messages(turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Keep exactly role and content, so every row matches MESSAGE whatever the store holds."""
    return [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]
