"""Property tests for cai/prompts.py: whatever a prompts file holds, rows or one-line errors.

    .venv/bin/python -m pytest tests/test_hardening_prompts.py

For any bytes in a .jsonl/.csv/.txt file, `parse_file` returns prompts that any store can keep
exactly (UTF-8 encodable, no NUL) plus bad rows named by line, or raises one UserError naming
the file; never another exception.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cai.errors import UserError
from cai.prompts import ROLES, ParseResult, parse_file

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = st.sampled_from([".jsonl", ".csv", ".txt"])

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                                           "content": st.one_of(st.text(max_size=20), json_values)}),
                    max_size=4)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=30), messages, json_values)},
                          optional={"category": json_values}),
    st.fixed_dictionaries({"messages": st.one_of(messages, json_values)}, optional={"category": json_values}),
)


def check(path: Path, parse=parse_file) -> ParseResult | None:
    try:
        res = parse(path)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(str(path)), message
        return None
    lines = set()
    for n, message in res.errors:
        assert isinstance(n, int) and n >= 1 and isinstance(message, str) and message
        assert "\n" not in message and "\r" not in message, message
        lines.add(n)
    for p in res.prompts:
        assert p.messages and p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip()
        for m in p.messages:
            assert set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
        texts = [m["content"] for m in p.messages] + ([p.category] if p.category is not None else [])
        for text in texts:
            assert isinstance(text, str) and "\x00" not in text
            text.encode("utf-8")  # no lone surrogates: PostgreSQL and SQLite store it exactly
        json.dumps(p.messages, ensure_ascii=False).encode("utf-8")
        assert len(p.id) == 24
        lines.add(p.line)
    return res


def write(tmp: str, suffix: str, blob: bytes) -> Path:
    path = Path(tmp) / f"prompts{suffix}"
    path.write_bytes(blob)
    return path


@FAST
@given(suffix=SUFFIXES, blob=st.binary(max_size=400))
def test_any_bytes(suffix: str, blob: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        check(write(tmp, suffix, blob))


@FAST
@given(suffix=SUFFIXES, text=st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_any_text(suffix: str, text: str):
    with tempfile.TemporaryDirectory() as tmp:
        check(write(tmp, suffix, text.encode("utf-8")))


@FAST
@given(suffix=SUFFIXES, text=st.text(alphabet='",\n\r\t \\{}[]:pmtrcaeg\x00\u2028\x85\x0c', max_size=200))
def test_format_punctuation(suffix: str, text: str):
    with tempfile.TemporaryDirectory() as tmp:
        check(write(tmp, suffix, (("prompt,category\n" if suffix == ".csv" else "") + text).encode()))


@FAST
@given(rows=st.lists(records, min_size=1, max_size=8), ascii_only=st.booleans())
def test_any_json_documents(rows: list, ascii_only: bool):
    """One line per document: each is a prompt or an error at its own line, none is lost."""
    with tempfile.TemporaryDirectory() as tmp:
        lines = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
        res = check(write(tmp, ".jsonl", ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")))
        if res is None:  # surrogates written raw are not UTF-8: the whole file is refused, by line
            return
        assert sorted([p.line for p in res.prompts] + [n for n, _ in res.errors]) == list(range(1, len(rows) + 1))


@FAST
@given(cells=st.lists(st.lists(st.text(max_size=15), min_size=1, max_size=3), min_size=1, max_size=8))
def test_csv_written_by_the_csv_module_round_trips(cells: list[list[str]]):
    """What a spreadsheet (csv.writer) writes is read back cell for cell, less bad cells."""
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["prompt", "category", "extra"])
    w.writerows(cells)
    with tempfile.TemporaryDirectory() as tmp:
        res = check(write(tmp, ".csv", buf.getvalue().encode("utf-8", "surrogatepass")))
    if res is None:
        return

    def norm(s: str) -> str:
        return s.replace("\r\n", "\n").replace("\r", "\n").strip()

    def storable(s: str) -> bool:
        return "\x00" not in s and not re.search("[\ud800-\udfff]", s)

    expected = [norm(row[0]) for row in cells if norm(row[0]) and all(storable(c) for c in row[:2])]
    assert [p.messages[-1]["content"] for p in res.prompts] == expected
