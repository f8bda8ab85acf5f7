"""Prompt parsing: JSONL, CSV, plain text or a saved HF dataset directory into ParsedPrompt rows.

    cai prompts add data/red_team.jsonl --tag red-team

Bad rows are reported by line number and skipped; the good rows are still returned
(`store.queries.store_prompts` stores them, `flows.common.ensure_tags` imports bundled sets).
Prompts are deduplicated by content (the hash of their canonical messages). Every returned
prompt can be stored as it is: text with a NUL or a lone surrogate is a bad row.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.errors import UserError
from store.keys import prompt_id  # noqa: F401 - the id is a store key; cai.prompts.prompt_id is its public name here too


def user_tags(tags: list[str], file: Path) -> list[str]:
    """The tags `cai prompts add FILE --tag ...` stores: each like a constitution id (lowercase
    letters, digits, '-', '_'), since tags are printed in tables and the published dataset card;
    without --tag, the file's stem made into one (`My_Prompts.jsonl` -> `my-prompts`)."""
    from constitution.load import ID_RE

    if not tags:
        stem = re.sub(r"[^a-z0-9_-]+", "-", file.stem.lower().replace("_", "-")).strip("-_")
        if not ID_RE.match(stem):
            raise UserError(f"{file}: no tag can be made from the file name; pass --tag NAME (lowercase letters, "
                            "digits, '-' or '_')")
        return [stem]
    for tag in tags:
        if not ID_RE.match(tag):
            raise UserError(f"--tag {tag!r}: expected lowercase letters, digits, '-' or '_' (like red-team), "
                            "starting with a letter or digit")
    return list(tags)


DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Bundled prompt sets: tag -> file in data/. `--prompts red-team` imports these on first use.
BUNDLED = {
    "red-team": "red_team.jsonl",
    "red-team-heldout": "red_team_heldout.jsonl",
    "benign": "benign.jsonl",
    "benign-heldout": "benign_heldout.jsonl",
    # more of each, written for the data-quality work: a 135M model trained on refusals learns the
    # surface form ("How can I ...") unless it also sees many varied benign requests
    "red-team-more": "red_team_more.jsonl",
    "benign-more": "benign_more.jsonl",
    "red-team-heldout-more": "red_team_heldout_more.jsonl",
    "benign-heldout-more": "benign_heldout_more.jsonl",
    # benign requests in the surface forms the red-team sets use ("Write a ...", "Give me ...",
    # "Help me ...", "As a ...", "Pretend you're ..."), so a form alone never predicts harm
    "benign-forms": "benign_forms.jsonl",
    # more of those forms, for the requests a trained 135M model still refused on the dev set
    # ("Help me write ...", "Suggest ...", "Recommend ...", "Give me a recipe ...", scary scenes,
    # scam warnings): the "How can I ..." form, which benign-more covers 160 times, it no longer refuses.
    # In the demo's mix: with DPO at lr 7e-4 it met both targets on the dev split (docs/results/2026-12-04-dev-split.md)
    "benign-forms-more": "benign_forms_more.jsonl",
    # a development split: never trained on, and not the held-out sets either, so settings (the
    # DPO helpful ratio) are chosen here and the held-out sets measure the choice once
    "red-team-dev": "red_team_dev.jsonl",
    "benign-dev": "benign_dev.jsonl",
    # for bench/constitution_effect.py: a house rule (no picks of stocks or coins to buy) and the
    # money questions that look like it and must still be answered, each as training, dev and 40
    # held-out prompts; and more self-harm requests, training and 40 held-out, for the leave-one-out case
    "stock-picks": "stock_picks.jsonl",
    "stock-picks-dev": "stock_picks_dev.jsonl",
    "stock-picks-heldout": "stock_picks_heldout.jsonl",
    "finance-lookalike": "finance_lookalike.jsonl",
    "finance-lookalike-dev": "finance_lookalike_dev.jsonl",
    "finance-lookalike-heldout": "finance_lookalike_heldout.jsonl",
    "self-harm-more": "self_harm_more.jsonl",
    "self-harm-heldout": "self_harm_heldout.jsonl",
}
ROLES = {"system", "user", "assistant"}
MAX_CSV_CELL = 128 * 1024  # csv's own default field limit; a longer cell is a bad row, not a traceback
_SURROGATE = re.compile("[\ud800-\udfff]")
_CSV_LIMIT = threading.Lock()  # csv.field_size_limit is process-wide: one CSV parse at a time changes it


def refuse_bundled_tags(tags: list[str], file: str | Path) -> None:
    """A user's file never takes a bundled set's tag: the set is imported on the tag's first use only
    if no prompt carries it yet, so the user's prompts would silently replace it (and the held-out
    sets the eval measures on)."""
    def same_file(tag: str) -> bool:  # `cai prompts add data/red_team.jsonl --tag red-team`: the set itself
        try:
            return Path(file).read_bytes() == (DATA_DIR / BUNDLED[tag]).read_bytes()
        except OSError:
            return False

    taken = [t for t in tags if t in BUNDLED and not same_file(t)]
    if taken:
        raise UserError(f"{file}: tag {taken[0]!r} names a bundled prompt set (data/{BUNDLED[taken[0]]}); "
                        f"choose another tag, e.g. --tag my-{taken[0]}")


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


def _clean(text: str, field: str) -> str:
    """`text` unchanged, or ValueError if a database could not store it exactly."""
    if "\x00" in text:
        raise ValueError(f"{field} contains a NUL character (\\0), which PostgreSQL cannot store")
    if _SURROGATE.search(text):
        raise ValueError(f"{field} contains a lone surrogate (\\ud800-\\udfff), which is not text")
    return text


def _category(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"'category' must be text, got {type(value).__name__}")
    return _clean(str(value), "'category'")


def _messages(msgs: object, field: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"'{field}' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{field}[{i}] must be {{'role': system|user|assistant, 'content': text}}")
        out.append({"role": role, "content": _clean(m["content"], f"{field}[{i}].content")})
    if out[-1]["role"] != "user":
        raise ValueError("the last message must be from the user (the turn the model answers)")
    if not out[-1]["content"].strip():
        raise ValueError("the last user message is empty")
    return out


def _from_record(rec: object) -> tuple[list[dict[str, str]], str | None]:
    """A JSON record -> messages; raise ValueError with what was expected."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    category = _category(rec.get("category"))
    # a missing column of a dataset (or JSON null) reads as None: treat it as absent
    if rec.get("messages") is not None:
        return _messages(rec["messages"], "messages"), category
    if rec.get("prompt") is not None:
        text = rec["prompt"]
        if isinstance(text, list):  # TRL's conversational prompt, as `cai export` writes it
            return _messages(text, "prompt"), category
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'prompt' must be non-empty text")
        return [{"role": "user", "content": _clean(text.strip(), "'prompt'")}], category
    raise ValueError("expected a 'prompt' field or a 'messages' list")


def _lines(text: str) -> list[str]:
    """Physical lines split on "\n" alone: str.splitlines() also splits on U+2028, U+0085, \f, ...
    which are valid inside a JSON string or a prompt."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def parse_file(path: str | Path) -> ParseResult:
    """Parse a prompts file by its extension (.jsonl/.json, .csv, .txt) or a dataset directory.

    Raises UserError (naming the file) for a file that cannot be read at all or holds nothing;
    a bad row is reported in `errors` by its line and skipped, the good rows are kept.
    """
    path = Path(path)
    if path.is_dir():
        return _parse_dataset_dir(path)
    suffix = path.suffix.lower()
    try:
        # bytes, not read_text(): universal newlines would turn a lone "\r" inside a line into a break
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text; prompts files are JSONL, CSV or plain text "
                        "(UTF-8), or a directory saved with datasets' save_to_disk") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc.__class__.__name__})") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first prompt
    if not text.strip():
        raise UserError(f"{path}: the file is empty; expected one prompt per line (.txt), one JSON object "
                        "per line (.jsonl) or a CSV file with a 'prompt' column")
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _parse_jsonl(text)
    if suffix == ".csv":
        return _parse_csv(text)
    res = ParseResult()  # plain text, one prompt per line
    for n, line in enumerate(_lines(text), start=1):
        if line.strip():
            _add(res, n, _text_line, line)
    return res


def _text_line(line: str) -> tuple[list[dict[str, str]], None]:
    return [{"role": "user", "content": _clean(line.strip(), "the line")}], None


def _add(res: ParseResult, n: int, build, *args) -> None:
    """Append build(*args)'s (messages, category) as row `n`, or its ValueError as that row's error."""
    try:
        msgs, cat = build(*args)
    except ValueError as exc:
        res.errors.append((n, str(exc)))
        return
    res.prompts.append(ParsedPrompt(msgs, cat, n))


def _json(line: str) -> object:
    try:
        # strict=False: a raw tab or form feed inside a string is kept, as a person who typed it meant
        return json.loads(line, strict=False)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more than 4 300 digits
        raise ValueError(f"invalid JSON ({str(exc).splitlines()[0]})") from None


def _json_line(line: str) -> tuple[list[dict[str, str]], str | None]:
    return _from_record(_json(line))


def _parse_jsonl(text: str) -> ParseResult:
    res = ParseResult()
    for n, line in enumerate(_lines(text), start=1):
        if line.strip():
            _add(res, n, _json_line, line)
    return res


def _parse_csv(text: str) -> ParseResult:
    """CSV with a `prompt` column (and optionally `category`); rows numbered by their first line.

    strict: an unterminated quote would otherwise swallow every later row into one prompt. It
    is reported at the row where it opens, and the rows after that line are read again.
    """
    res = ParseResult()
    # the csv module splits physical lines itself (a quoted cell may hold "\n"); it also needs the
    # line ends normalised, as universal newlines did before
    lines = [ln + "\n" for ln in _lines(text.replace("\r\n", "\n").replace("\r", "\n"))]
    start = 0  # index of the line the reader starts at
    header: list[str] | None = None
    with _CSV_LIMIT:
        old = csv.field_size_limit(2**31 - 1)  # cells are measured below, per row, not by csv
        try:
            while start < len(lines):
                reader = csv.reader(itertools.islice(lines, start, None), strict=True)
                while True:
                    first = start + reader.line_num + 1  # the row's first physical line, 1-based
                    try:
                        row = next(reader)
                    except StopIteration:
                        start = len(lines)
                        break
                    except csv.Error as exc:
                        last = start + reader.line_num
                        if header is None:
                            res.errors.append((first, f"the CSV header row is malformed ({exc})"))
                            return res
                        if str(exc) == "unexpected end of data":  # the quote never closes: resume after its line
                            res.errors.append((first, 'unterminated quoted cell (a " opens here and never closes); '
                                               "the lines after it are read as rows again"))
                            start = first
                            break
                        span = f"lines {first}-{last}: " if last > first else ""
                        res.errors.append((first, f"{span}malformed CSV row ({exc})"))
                        continue
                    if header is None:
                        if not row:  # blank lines before the header
                            continue
                        header = row
                        if "prompt" not in header:
                            shown = ", ".join(repr(h[:40]) for h in header[:10])
                            res.errors.append((first, f"CSV header must have a 'prompt' column (found: {shown})"))
                            return res
                        continue
                    if row:  # a blank line
                        _add(res, first, _csv_row, row, header)
        finally:
            csv.field_size_limit(old)
    return res


def _csv_row(row: list[str], header: list[str]) -> tuple[list[dict[str, str]], str | None]:
    cells = dict(zip(header, row, strict=False))
    for name, value in cells.items():
        if len(value) > MAX_CSV_CELL:
            raise ValueError(f"{name!r} cell is {len(value)} characters, over the {MAX_CSV_CELL} limit")
    value = (cells.get("prompt") or "").strip()
    if not value:
        raise ValueError("empty 'prompt' cell")
    return [{"role": "user", "content": _clean(value, "'prompt'")}], _category(cells.get("category") or None)


def json_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file (training datasets, reward rows, review
    records); bad JSON, nesting too deep or bytes that are not UTF-8 are one-line UserErrors naming file:line."""
    out = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append((n, json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{path}:{n}: not JSON ({exc.msg})") from None
                    except RecursionError:
                        raise UserError(f"{path}:{n}: JSON nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#x}); save it as UTF-8") from None
    return out


def load_saved_dataset(path: Path, where: str = "", expected: str = "") -> Any:
    """`datasets.load_from_disk(path)`, its errors turned into one UserError naming the directory.

    `where` prefixes the message (e.g. "--dataset "); `expected` says what the caller wanted there.
    A damaged directory fails here or when its rows are read (arrow files are memory-mapped):
    callers that read rows wrap that in `saved_dataset_error` too.
    """
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except FileNotFoundError as exc:
        if not any((Path(path) / f).exists() for f in ("dataset_dict.json", "state.json")):  # never one
            raise UserError(f"{where}{path}: a directory, but not a saved Hugging Face dataset (no "
                            f"dataset_dict.json or state.json); expected {expected or _SAVED}") from None
        raise saved_dataset_error(path, exc, where, expected) from None
    except Exception as exc:  # noqa: BLE001 - a damaged directory: arrow, json and os errors alike
        raise saved_dataset_error(path, exc, where, expected) from None


_SAVED = "a directory written by Dataset.save_to_disk or `cai export --out DIR` (or a JSONL, CSV or text file)"


def saved_dataset_error(path: Path, exc: BaseException, where: str = "", expected: str = "") -> UserError:
    """One line for a saved dataset that is damaged (a file missing, truncated or not what it should be)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return UserError(f"{where}{path}: cannot read this saved dataset, it is damaged or incomplete "
                     f"({exc.__class__.__name__}: {first}); expected {expected or _SAVED}")


def _parse_dataset_dir(path: Path) -> ParseResult:
    from datasets import Dataset, DatasetDict

    res = ParseResult()
    ds = load_saved_dataset(path)
    parts: list[tuple[str, Dataset]] = list(ds.items()) if isinstance(ds, DatasetDict) else [("", ds)]
    if any(name.endswith("_prefs") for name, _ in parts):
        # a `cai export` directory: every *_sft row's prompt is also a *_prefs row's prompt
        parts = [(name, part) for name, part in parts if not name.endswith("_sft")]
    if not sum(len(part) for _, part in parts):
        raise UserError(f"{path}: the saved dataset has no rows")
    from pyarrow import ArrowException

    n = 0
    try:
        for _split, part in parts:
            for rec in part:
                n += 1
                _add(res, n, _from_record, rec)
    except (OSError, ArrowException) as exc:  # a damaged arrow file, found as its rows are read: nothing is
        raise saved_dataset_error(path, exc) from None  # stored from it, the file as a whole is bad
    return res
