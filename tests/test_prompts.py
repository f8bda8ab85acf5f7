"""cai/prompts.py parsing, store.queries and flows.common.ensure_tags: formats, bad rows, dedup, tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import select

from cai.errors import UserError
from cai.prompts import BUNDLED, DATA_DIR, parse_file, prompt_id
from flows.common import ensure_tags
from store.db import session_scope
from store.models import Prompt, PromptTag
from store.queries import prompts_for_tags, store_prompts


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _texts(res) -> list[str]:
    return [p.messages[-1]["content"] for p in res.prompts]


def test_jsonl_prompt_and_messages(tmp_path: Path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "How are you?"}]
    f = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "  What is 2+2?  ", "category": "math"}),
        "",
        json.dumps({"messages": msgs, "extra": 1}),
    ])
    res = parse_file(f)
    assert res.errors == []
    assert [p.line for p in res.prompts] == [1, 3]
    assert res.prompts[0].messages == [{"role": "user", "content": "What is 2+2?"}]
    assert res.prompts[0].category == "math"
    assert res.prompts[1].messages == msgs and res.prompts[1].category is None


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "unterminated', "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"text": "no prompt field"}', "expected a 'prompt' field or a 'messages' list"),
    ('{"prompt": "   "}', "'prompt' must be non-empty text"),
    ('{"prompt": 42}', "'prompt' must be non-empty text"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] must be"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "the last message must be from the user"),
    ('{"messages": [{"role": "user", "content": " "}]}', "the last user message is empty"),
])
def test_jsonl_bad_rows_by_line(tmp_path: Path, line: str, message: str):
    f = _write(tmp_path / "p.jsonl", ['{"prompt": "good one"}', line, '{"prompt": "good two"}'])
    res = parse_file(f)
    assert _texts(res) == ["good one", "good two"]
    assert len(res.errors) == 1 and res.errors[0][0] == 2
    assert message in res.errors[0][1]


def test_csv(tmp_path: Path):
    f = tmp_path / "p.csv"
    f.write_text('prompt,category\n"a prompt, with a comma",x\n"two\nlines",\n,y\nplain,z\n',
                 encoding="utf-8")
    res = parse_file(f)
    assert _texts(res) == ["a prompt, with a comma", "two\nlines", "plain"]
    assert [p.category for p in res.prompts] == ["x", None, "z"]
    assert res.errors == [(5, "empty 'prompt' cell")]  # physical line 5 (the quoted cell spans 3-4)


def test_csv_windows_line_endings(tmp_path: Path):
    f = tmp_path / "p.csv"
    f.write_bytes(b'prompt\r\nfirst\r\n""\r\n"multi\r\nline"\r\nlast\r\n')
    res = parse_file(f)
    assert _texts(res) == ["first", "multi\nline", "last"]  # line ends are normalised
    # a row is numbered by its first physical line
    assert [p.line for p in res.prompts] == [2, 4, 6] and res.errors == [(3, "empty 'prompt' cell")]


def test_csv_without_prompt_column(tmp_path: Path):
    f = _write(tmp_path / "p.csv", ["question,answer", "a,b"])
    res = parse_file(f)
    assert res.prompts == [] and res.errors[0][0] == 1 and "'prompt' column" in res.errors[0][1]


def test_plain_text(tmp_path: Path):
    f = _write(tmp_path / "p.txt", ["first prompt", "", "   ", "  second prompt  ", "first prompt"])
    res = parse_file(f)
    assert _texts(res) == ["first prompt", "second prompt", "first prompt"]
    assert [p.line for p in res.prompts] == [1, 4, 5]
    assert res.prompts[0].id == res.prompts[2].id


def test_same_prompt_same_id_in_every_format(tmp_path: Path):
    a = parse_file(_write(tmp_path / "a.txt", ["Tell me a joke"])).prompts[0]
    b = parse_file(_write(tmp_path / "b.jsonl", ['{"prompt": "Tell me a joke"}'])).prompts[0]
    c = parse_file(_write(tmp_path / "c.jsonl", [json.dumps(
        {"messages": [{"role": "user", "content": "Tell me a joke"}]})])).prompts[0]
    d = parse_file(_write(tmp_path / "d.csv", ["prompt", "Tell me a joke"])).prompts[0]
    assert a.id == b.id == c.id == d.id == prompt_id([{"role": "user", "content": "Tell me a joke"}])
    assert prompt_id([{"role": "user", "content": "Tell me a joke!"}]) != a.id


def test_hf_dataset_dir(tmp_path: Path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "plain prompt", "messages": None},
            {"prompt": None,
             "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
            {"prompt": "", "messages": None}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    res = parse_file(tmp_path / "ds")
    assert _texts(res) == ["plain prompt", "u"]
    assert [n for n, _ in res.errors] == [3]

    DatasetDict({"train": Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]),
                 "test": Dataset.from_list([{"prompt": "c"}])}).save_to_disk(str(tmp_path / "dd"))
    assert sorted(_texts(parse_file(tmp_path / "dd"))) == ["a", "b", "c"]


def test_unreadable_inputs_are_user_errors(tmp_path: Path):
    (tmp_path / "not-a-dataset").mkdir()
    with pytest.raises(UserError, match="not a saved Hugging Face dataset"):
        parse_file(tmp_path / "not-a-dataset")
    (tmp_path / "bin.txt").write_bytes(b"ok line\n\xff\xfe\x00binary")
    with pytest.raises(UserError, match=r"bin.txt:2: not UTF-8"):
        parse_file(tmp_path / "bin.txt")


def test_store_prompts_dedups_and_tags(db_url, tmp_path: Path):
    res = parse_file(_write(tmp_path / "p.txt", ["a", "b", "a", "c"]))
    with session_scope(db_url) as s:
        assert store_prompts(s, res.prompts, "p.txt", ["set-1"]) == (3, 0)
    with session_scope(db_url) as s:
        # the same prompts again, plus one new, under a second tag
        res2 = parse_file(_write(tmp_path / "q.txt", ["a", "b", "c", "d"]))
        assert store_prompts(s, res2.prompts, "q.txt", ["set-2"]) == (1, 3)
    with session_scope(db_url) as s:
        assert len(s.exec(select(Prompt)).all()) == 4
        tags = s.exec(select(PromptTag.tag, PromptTag.prompt_id)).all()
        assert sum(1 for t, _ in tags if t == "set-1") == 3 and sum(1 for t, _ in tags if t == "set-2") == 4
        got = prompts_for_tags(s, ["set-1", "set-2"])
        assert [p.text for p in got] != [] and [p.id for p in got] == sorted(p.id for p in got)
        assert {p.text for p in got} == {"a", "b", "c", "d"}
        first = s.get(Prompt, prompt_id([{"role": "user", "content": "a"}]))
        assert first.source == "p.txt"  # the first load wins; a rerun changes nothing


def test_ensure_tags(sqlite_url, tmp_path: Path):
    with session_scope(sqlite_url) as s:
        store_prompts(s, parse_file(_write(tmp_path / "p.txt", ["x"])).prompts, "p.txt", ["mine"])
    with session_scope(sqlite_url) as s:
        ensure_tags(s, ["mine"])
        with pytest.raises(UserError) as info:
            ensure_tags(s, ["no-such-tag"])
        assert "no-such-tag" in str(info.value) and "mine" in str(info.value)
        assert "cai prompts add" in str(info.value)


@pytest.mark.parametrize("tag", sorted(BUNDLED))
def test_bundled_sets_parse_cleanly(tag: str):
    path = DATA_DIR / BUNDLED[tag]
    if not path.exists():
        pytest.fail(f"bundled prompt set {path} is missing")
    res = parse_file(path)
    assert res.errors == [], res.errors[:5]
    assert len(res.prompts) >= 10
    assert len({p.id for p in res.prompts}) == len(res.prompts), "duplicate prompts in a bundled set"


# --- hardening (issue 13): nothing lost or corrupted by odd bytes, one named error per bad row -----

def test_only_newline_ends_a_line(tmp_path: Path):
    """U+2028, U+2029, U+0085 and \\f are text inside a line; "\\r\\n" ends one as "\\n" does."""
    odd = "a\u2028b\u2029c\x85d\x0ce"
    f = tmp_path / "p.jsonl"
    f.write_bytes((json.dumps({"prompt": odd}, ensure_ascii=False) + "\r\n"
                   + json.dumps({"prompt": "second"}) + "\n").encode())
    res = parse_file(f)
    assert res.errors == [] and _texts(res) == [odd, "second"] and [p.line for p in res.prompts] == [1, 2]
    t = tmp_path / "p.txt"
    t.write_bytes(f"{odd}\r\nnext\n".encode())
    res = parse_file(t)
    assert _texts(res) == [odd, "next"] and [p.line for p in res.prompts] == [1, 2]


def test_csv_unterminated_quote_is_named_not_merged(tmp_path: Path):
    f = tmp_path / "p.csv"
    f.write_text('prompt,category\ngood,x\n"never closed,y\nafter one,z\nafter two,w\n', encoding="utf-8")
    res = parse_file(f)
    assert _texts(res) == ["good", "after one", "after two"]
    assert len(res.errors) == 1 and res.errors[0][0] == 3 and "unterminated quoted cell" in res.errors[0][1]
    f.write_text('prompt\n"abc"def\nok\n', encoding="utf-8")
    res = parse_file(f)
    assert _texts(res) == ["ok"] and res.errors[0][0] == 2 and "malformed CSV row" in res.errors[0][1]


@pytest.mark.parametrize("name, content, line, message", [
    ("p.jsonl", '{"prompt": "x", "category": ["a", "b"]}', 2, "'category' must be text, got list"),
    ("p.jsonl", '{"prompt": "x", "category": {"a": 1}}', 2, "'category' must be text, got dict"),
    ("p.jsonl", '{"prompt": "lone \\ud800 surrogate"}', 2, "'prompt' contains a lone surrogate"),
    ("p.jsonl", '{"messages": [{"role": "user", "content": "n\\u0000l"}]}', 2,
     "messages[0].content contains a NUL character"),
    ("p.jsonl", '{"messages": [{"role": ["user"], "content": "x"}]}', 2, "messages[0] must be"),
    ("p.jsonl", "[" * 100_000 + "]" * 100_000, 2, "invalid JSON (nested too deeply)"),
    ("p.jsonl", '{"prompt": "x", "n": ' + "9" * 5000 + "}", 2, "invalid JSON (Exceeds the limit"),
    ("p.txt", "nul \x00 byte", 2, "the line contains a NUL character"),
    ("p.csv", '"' + "x" * (128 * 1024 + 1) + '"', 3, "'prompt' cell is 131073 characters, over the 131072 limit"),
    ("p.csv", "nul\x00cell", 3, "'prompt' contains a NUL character"),
])
def test_bad_rows_are_named_and_skipped(tmp_path: Path, name: str, content: str, line: int, message: str):
    f = tmp_path / name
    if name.endswith(".csv"):
        rows = ["prompt", "good one", content, "good two"]
    elif name.endswith(".txt"):
        rows = ["good one", content, "good two"]
    else:
        rows = ['{"prompt": "good one"}', content, '{"prompt": "good two"}']
    f.write_text("\n".join(rows) + "\n", encoding="utf-8")
    res = parse_file(f)
    assert _texts(res) == ["good one", "good two"]
    assert len(res.errors) == 1 and res.errors[0][0] == line and message in res.errors[0][1], res.errors
    assert "\n" not in res.errors[0][1]


@pytest.mark.parametrize("name", ["p.jsonl", "p.txt", "p.csv", "p.json"])
@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_an_empty_file_is_an_error_in_every_format(tmp_path: Path, name: str, content: bytes):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(UserError, match=rf"^{f}: the file is empty"):
        parse_file(f)


def test_prompts_add_bad_input_is_one_line_exit_2_and_keeps_stored_rows(tmp_path: Path, sqlite_url, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("CAI_DATABASE_URL", sqlite_url)
    good = _write(tmp_path / "good.txt", ["first", "second"])
    assert CliRunner().invoke(app, ["prompts", "add", str(good)]).exit_code == 0
    for name in ("empty.jsonl", "empty.txt", "empty.csv"):
        (tmp_path / name).write_text("")
        res = CliRunner().invoke(app, ["prompts", "add", str(tmp_path / name)])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and "the file is empty" in lines[0], res.output
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "third"}\n{"prompt": "x", "category": [1]}\n' + "[" * 100_000 + "\n")
    res = CliRunner().invoke(app, ["prompts", "add", str(mixed)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "1 prompts read (1 new, 0 already stored), 2 bad rows skipped" in " ".join(res.stdout.split())
    with session_scope(sqlite_url) as s:
        assert sorted(p.text for p in s.exec(select(Prompt))) == ["first", "second", "third"]


def test_bundled_sets_are_disjoint_and_eval_sets_unseen():
    """No prompt sits in two bundled sets, and no held-out or dev prompt is a near copy of a
    training prompt (difflib ratio >= 0.85), so what eval measures was never trained on."""
    import difflib

    texts = {tag: [p.messages[-1]["content"] for p in parse_file(DATA_DIR / f).prompts] for tag, f in BUNDLED.items()}
    seen: dict[str, str] = {}
    for tag, prompts in texts.items():
        for p in prompts:
            assert p not in seen, f"{p!r} is in both {seen[p]} and {tag}"
            seen[p] = tag
    unseen = [t for t in texts if "heldout" in t or t.endswith("-dev")]
    assert {"red-team-dev", "benign-dev", "red-team-heldout", "benign-heldout"} <= set(unseen)
    train = [p.lower() for t in texts if t not in unseen for p in texts[t]]
    for tag in unseen:
        for p in texts[tag]:
            m = difflib.SequenceMatcher(None, "", p.lower())  # b is cached: the unseen prompt
            for q in train:
                m.set_seq1(q)
                assert m.quick_ratio() < 0.85 or m.ratio() < 0.85, f"{tag}: {p!r} is near the training prompt {q!r}"
