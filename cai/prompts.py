"""Prompt parsing: JSONL, CSV, plain text or a saved HF dataset directory into ParsedPrompt rows.

    cai prompts add data/red_team.jsonl --tag red-team

Bad rows are reported by line number and skipped; the good rows are still returned
(`store.queries.store_prompts` stores them, `flows.common.ensure_tags` imports bundled sets).
Prompts are deduplicated by content (the hash of their canonical messages).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from cai.errors import UserError
from store.keys import content_hash

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Bundled prompt sets: tag -> file in data/. `--prompts red-team` imports these on first use.
BUNDLED = {
    "red-team": "red_team.jsonl",
    "red-team-heldout": "red_team_heldout.jsonl",
    "benign": "benign.jsonl",
    "benign-heldout": "benign_heldout.jsonl",
}
ROLES = {"system", "user", "assistant"}


@dataclass
class ParsedPrompt:
    messages: list[dict[str, str]]
    category: str | None = None
    line: int = 0

    @property
    def id(self) -> str:
        return prompt_id(self.messages)


@dataclass
class ParseResult:
    prompts: list[ParsedPrompt] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (line or row number, message)


def prompt_id(messages: list[dict[str, str]]) -> str:
    return content_hash([{"role": m["role"], "content": m["content"]} for m in messages], length=24)


def _from_record(rec: object) -> tuple[list[dict[str, str]], str | None]:
    """A JSON record -> messages; raise ValueError with what was expected."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    category = rec.get("category")
    # a missing column of a dataset (or JSON null) reads as None: treat it as absent
    if rec.get("messages") is not None:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list of {role, content}")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': text}}")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "user":
            raise ValueError("the last message must be from the user (the turn the model answers)")
        if not out[-1]["content"].strip():
            raise ValueError("the last user message is empty")
        return out, category
    if rec.get("prompt") is not None:
        text = rec["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'prompt' must be non-empty text")
        return [{"role": "user", "content": text.strip()}], category
    raise ValueError("expected a 'prompt' field or a 'messages' list")


def parse_file(path: str | Path) -> ParseResult:
    """Parse a prompts file by its extension (.jsonl/.json, .csv, .txt) or a dataset directory."""
    path = Path(path)
    res = ParseResult()
    if path.is_dir():
        return _parse_dataset_dir(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; prompts files are JSONL, CSV or plain text "
                        "(UTF-8), or a directory saved with datasets' save_to_disk") from None
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                msgs, cat = _from_record(json.loads(line))
            except json.JSONDecodeError as exc:
                res.errors.append((n, f"invalid JSON ({exc.msg} at column {exc.colno})"))
                continue
            except ValueError as exc:
                res.errors.append((n, str(exc)))
                continue
            res.prompts.append(ParsedPrompt(msgs, cat, n))
    elif suffix == ".csv":
        # newline="": a quoted cell may span lines, and splitlines() would drop its newlines
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            res.errors.append((1, f"CSV header must have a 'prompt' column (found: {reader.fieldnames})"))
            return res
        for row in reader:
            n = reader.line_num
            value = (row.get("prompt") or "").strip()
            if not value:
                res.errors.append((n, "empty 'prompt' cell"))
                continue
            res.prompts.append(ParsedPrompt([{"role": "user", "content": value}], row.get("category") or None,
                                            n))
    else:  # plain text, one prompt per line
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                res.prompts.append(ParsedPrompt([{"role": "user", "content": line.strip()}], None, n))
    return res


def _parse_dataset_dir(path: Path) -> ParseResult:
    from datasets import Dataset, DatasetDict, load_from_disk

    res = ParseResult()
    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise UserError(f"{path}: a directory, but not a saved Hugging Face dataset ({exc}); "
                        "save one with Dataset.save_to_disk, or pass a JSONL, CSV or text file") from None
    parts: list[tuple[str, Dataset]] = list(ds.items()) if isinstance(ds, DatasetDict) else [("", ds)]
    n = 0
    for _split, part in parts:
        for rec in part:
            n += 1
            try:
                msgs, cat = _from_record(rec)
            except ValueError as exc:
                res.errors.append((n, str(exc)))
                continue
            res.prompts.append(ParsedPrompt(msgs, cat, n))
    return res
