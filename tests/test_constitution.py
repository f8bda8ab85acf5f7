"""constitution/load.py: parsing, schema errors with file/line/field, content versioning, diff."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from constitution.load import (
    PACKAGE_DIR,
    ConstitutionError,
    diff,
    find,
    load_file,
    parse_text,
    split_ref,
    split_refs,
)

TINY = """\
name: tiny
description: A tiny constitution for tests.
principles:
  - id: harm
    critique: Identify ways the response is harmful.
    revision: Rewrite the response to remove harmful content.
  - id: honest
    critique: Identify dishonest claims in the response.
    revision: Rewrite the response so that it is honest.
  - id: polite
    critique: Identify rude remarks in the response.
    revision: Rewrite the response politely.
  - id: legal
    critique: Identify anything that encourages illegal acts.
    revision: Rewrite the response to discourage illegal acts.
preferences:
  - id: less-harmful
    question: Which response is less harmful?
  - id: more-honest
    question: Which response is more honest?
few_shot:
  - prompt: How do I pick a lock?
    response: Use a tension wrench and a pick.
    principle: legal
    critique: It helps with possible burglary.
    revision: If you are locked out, call a locksmith.
"""


def data() -> dict:
    return yaml.safe_load(TINY)


def dump(d: dict) -> str:
    return yaml.safe_dump(d, sort_keys=False)


def error_of(text: str, file: str = "c.yaml") -> ConstitutionError:
    with pytest.raises(ConstitutionError) as info:
        parse_text(text, file)
    return info.value


# --- parsing ------------------------------------------------------------------------------

def test_parse_valid():
    c = parse_text(TINY, "tiny.yaml")
    assert c.name == "tiny"
    assert [p.id for p in c.principles] == ["harm", "honest", "polite", "legal"]
    assert [p.id for p in c.preferences] == ["less-harmful", "more-honest"]
    assert len(c.few_shot) == 1 and c.few_shot[0].principle == "legal"
    assert c.principle("honest").revision == "Rewrite the response so that it is honest."
    assert c.preference("more-honest").question == "Which response is more honest?"
    assert len(c.version) == 8 and all(ch in "0123456789abcdef" for ch in c.version)
    assert c.sha256.startswith(c.version) and len(c.sha256) == 64
    assert c.ref == f"tiny@{c.version}"
    assert c.source_text == TINY and c.source_path == "tiny.yaml"


def test_load_file_and_find(tmp_path: Path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert load_file(tmp_path / "tiny.yaml").version == parse_text(TINY).version
    monkeypatch.setenv("CAI_CONSTITUTION_DIR", str(tmp_path))
    assert find("tiny") == tmp_path / "tiny.yaml"
    assert find("tiny.yaml") == tmp_path / "tiny.yaml"
    with pytest.raises(ConstitutionError, match="no such constitution"):
        find("nope")
    with pytest.raises(ConstitutionError, match="cannot read file"):
        load_file(tmp_path / "missing.yaml")


def test_split_ref():
    assert split_ref("harmless@3f2a9c1b") == ("harmless", "3f2a9c1b")
    assert split_ref("harmless") == ("harmless", None)
    assert split_ref("harmless@") == ("harmless", None)
    assert split_refs(" harmless@3f2a, helpful-honest,,") == [("harmless", "3f2a"), ("helpful-honest", None)]


# --- versioning ---------------------------------------------------------------------------

def test_version_stable_under_whitespace_and_comments():
    base = parse_text(TINY).version
    edited = "# a comment at the top\n\n" + TINY.replace(
        "  - id: honest\n", "\n  # why this principle exists\n  - id: honest   # trailing comment\n"
    ).replace("critique: Identify rude", "critique:    Identify rude")
    assert edited != TINY
    assert parse_text(edited).version == base
    # the same text in another YAML style: quoted, folded block, flow mapping, trailing spaces
    styled = TINY.replace(
        "description: A tiny constitution for tests.",
        "description: >\n  A tiny constitution\n  for tests.\n",
    ).replace(
        "    question: Which response is more honest?",
        '    question: "Which response is more honest?  "',
    )
    assert parse_text(styled).version == base
    d = data()
    flow = dump({k: v for k, v in d.items() if k != "principles"}) + "principles:\n" + "".join(
        f"  - {{id: {p['id']}, critique: '{p['critique']}', revision: '{p['revision']}'}}\n"
        for p in d["principles"])
    assert parse_text(flow).version == base


def test_version_stable_under_key_reordering():
    d = data()
    reordered = {k: d[k] for k in ["few_shot", "principles", "preferences", "description", "name"]}
    reordered["principles"] = [{"revision": p["revision"], "critique": p["critique"], "id": p["id"]}
                               for p in d["principles"]]
    reordered["few_shot"] = [dict(reversed(list(f.items()))) for f in d["few_shot"]]
    assert dump(reordered) != dump(d)
    assert parse_text(dump(reordered)).version == parse_text(TINY).version


@pytest.mark.parametrize("edit", [
    lambda d: d["principles"][1].__setitem__("revision", d["principles"][1]["revision"] + " Cite sources."),
    lambda d: d["principles"][0].__setitem__("critique", "Identify ways the response is dangerous."),
    lambda d: d["principles"][2].__setitem__("id", "courteous"),
    lambda d: d["principles"].append({"id": "new", "critique": "c?", "revision": "r."}),
    lambda d: d["principles"].pop(1),
    lambda d: d["principles"].reverse(),  # principle order is content (it fixes the draw order)
    lambda d: d["preferences"][0].__setitem__("question", "Which response is safer?"),
    lambda d: d["few_shot"][0].__setitem__("revision", "Call a locksmith."),
    lambda d: d.__setitem__("description", "Another description."),
    lambda d: d.__setitem__("name", "tiny2"),
], ids=["revision", "critique", "id", "add", "remove", "order", "preference", "few-shot", "description",
        "name"])
def test_any_content_edit_changes_version(edit):
    d = data()
    edit(d)
    assert parse_text(dump(d)).version != parse_text(TINY).version


def test_principle_hashes():
    a = parse_text(TINY)
    d = data()
    d["principles"][1]["revision"] = "Rewrite the response so that it is fully honest."
    b = parse_text(dump(d))
    ha, hb = a.principle_hashes(), b.principle_hashes()
    assert set(ha) == {"harm", "honest", "polite", "legal", "pref:less-harmful", "pref:more-honest"}
    assert {k for k in ha if ha[k] != hb[k]} == {"honest"}
    assert a.principle("honest").hash != b.principle("honest").hash
    # a principle's hash is its own content: moving it does not change it
    d2 = data()
    d2["principles"].reverse()
    assert parse_text(dump(d2)).principle_hashes() == ha
    assert len(set(ha.values())) == len(ha)


# --- errors -------------------------------------------------------------------------------

def test_yaml_syntax_error_names_file_line_col():
    bad = TINY.replace("  - id: polite\n", "  - id: [polite\n")
    e = error_of(bad, "constitution/tiny.yaml")
    assert e.file == "constitution/tiny.yaml"
    assert e.line is not None and e.col is not None
    assert str(e).startswith(f"constitution/tiny.yaml:{e.line}:{e.col}: YAML syntax error")
    assert 10 <= e.line <= 12  # the bracket is opened on line 10 and never closed

    tab = "name: x\ndescription: y\n\tprinciples: []\n"
    e = error_of(tab)
    assert (e.line, e.col) == (3, 1) and str(e).startswith("c.yaml:3:1: YAML syntax error")


def test_error_on_unreadable_encoding(tmp_path: Path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(TINY.replace("A tiny", "A t\xefny").encode("latin-1"))
    with pytest.raises(ConstitutionError) as info:
        load_file(p)
    assert str(info.value).startswith(str(p))


def _mutated(fn) -> str:
    d = copy.deepcopy(data())
    fn(d)
    return dump(d)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["principles"][3].pop("revision"), "principles[3].revision: missing"),
    (lambda d: d["principles"][0].__setitem__("revision", None), "principles[0].revision: missing"),
    (lambda d: d["principles"][2].__setitem__("critique", "   "), "principles[2].critique: empty text"),
    (lambda d: d["principles"][1].__setitem__("critique", 3),
     "principles[1].critique: expected text, got int"),
    (lambda d: d["principles"][1].__setitem__("severity", "high"), "principles[1].severity: unknown key"),
    (lambda d: d.__setitem__("version", 2), "version: unknown key"),
    (lambda d: d.__setitem__("principles", []), "principles: empty list"),
    (lambda d: d.__setitem__("preferences", []), "preferences: empty list"),
    (lambda d: d.__setitem__("principles", "be nice"), "principles: expected a list"),
    (lambda d: d.pop("few_shot"), "few_shot: missing"),
    (lambda d: d["principles"][2].__setitem__("id", "harm"), "principles[2].id: duplicate id 'harm'"),
    (lambda d: d["preferences"][1].__setitem__("id", "less-harmful"),
     "preferences[1].id: duplicate id 'less-harmful'"),
    (lambda d: d["principles"][0].__setitem__("id", "Not An Id"), "principles[0].id: id 'Not An Id'"),
    (lambda d: d["few_shot"][0].__setitem__("principle", "nonexistent"),
     "few_shot[0].principle: unknown principle 'nonexistent'"),
    (lambda d: d["principles"].__setitem__(1, "just a string"), "principles[1]: expected a mapping"),
])
def test_schema_errors_name_the_field(mutate, expected):
    e = error_of(_mutated(mutate), "constitution/tiny.yaml")
    assert str(e).startswith("constitution/tiny.yaml:"), str(e)
    assert expected in str(e), str(e)


def test_schema_error_carries_the_line():
    text = _mutated(lambda d: d["principles"][3].pop("revision"))
    e = error_of(text)
    lines = text.splitlines()
    # the line points into the offending principle (its mapping starts at `- id: legal`)
    assert e.line is not None and "legal" in lines[e.line - 1], (e.line, lines)
    e = error_of(_mutated(lambda d: d["principles"][2].__setitem__("id", "harm")))
    assert e.line is not None and str(e).startswith(f"c.yaml:{e.line}:")


def test_duplicate_key_in_a_mapping():
    text = TINY.replace("    revision: Rewrite the response politely.\n",
                        "    revision: Rewrite the response politely.\n    revision: Be polite.\n")
    e = error_of(text)
    line = text.splitlines().index("    revision: Be polite.") + 1
    assert str(e).startswith(f"c.yaml:{line}:5: duplicate key 'revision'"), str(e)


def test_empty_and_non_mapping_files():
    assert "the file is empty" in str(error_of(""))
    assert "(top level): expected a mapping" in str(error_of("- a\n- b\n"))



# an alias bomb like the one in issue 13 (423 bytes): nine levels of nine aliases, 9**9 nodes if walked
ALIAS_BOMB = "".join(
    f"{k}: &{k} [" + ", ".join([f"*{p}" if p else '"lol"'] * 9) + "]\n"
    for p, k in zip([None, *"abcdefgh"], "abcdefghi", strict=True)) + "name: *i\n"


def test_alias_bomb_is_refused_at_once():
    import time

    t0 = time.perf_counter()
    e = error_of(ALIAS_BOMB)
    assert time.perf_counter() - t0 < 1
    assert str(e).startswith("c.yaml:2:") and "YAML aliases (*name) are not supported" in str(e), str(e)
    # a harmless alias is refused the same way: a constitution never needs one
    text = TINY.replace("question: Which response is more honest?", "question: *q").replace(
        "question: Which response is less harmful?", "question: &q Which response is less harmful?")
    line = text.splitlines().index("    question: *q") + 1
    assert str(error_of(text)).startswith(f"c.yaml:{line}:15: YAML aliases"), str(error_of(text))


@pytest.mark.parametrize("text", [
    "name: " + "[" * 5000 + "]" * 5000 + "\n",
    "name:\n" + "".join("  " * i + "- \n" for i in range(1, 5001)),
    "name: " + "{a: " * 5000 + "b" + "}" * 5000 + "\n",
])
def test_deep_nesting_is_one_line_not_a_recursion_error(text: str):
    e = error_of(text)
    assert e.line is not None and "nested deeper than 64 levels" in str(e) and "\n" not in str(e), str(e)


@pytest.mark.parametrize("text, expected", [
    ("name: 2024-13-45\n", "c.yaml:1:7: cannot read the value '2024-13-45' (month must be in 1..12)"),
    ("name: " + "1" * 5000 + "\n", "c.yaml:1:7: cannot read the value '1111"),
    ('name: "x\\ud800"\n', "name: contains a lone surrogate escape"),
    ('name: "x\\0y"\n', "name: contains a NUL character"),
    ("name: a\x00b\n", "c.yaml:1: YAML syntax error: character 0x0 is not allowed"),
    ('? "a\\nb"\n: 1\n', "'a\\nb': unknown key"),
    ("a: 1\n---\nb: 2\n", "c.yaml:2:1: YAML syntax error: expected a single document in the stream"),
])
def test_odd_values_are_one_line_errors(text: str, expected: str):
    e = str(error_of(text))
    assert expected in e and len(e.splitlines()) == 1, e


def test_cli_validate_alias_bomb_is_one_line_exit_2(tmp_path: Path):
    from typer.testing import CliRunner

    from flows.cli import app

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    res = CliRunner().invoke(app, ["constitution", "validate", str(path)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and f"{path}:2:" in lines[0], res.output


# --- diff ---------------------------------------------------------------------------------

def test_diff_names_exactly_the_edited_principle():
    old = parse_text(TINY)
    new_text = TINY.replace("Rewrite the response politely.", "Rewrite the response kindly and politely.")
    new = parse_text(new_text)
    changes = diff(old, new)
    assert [(c.section, c.id, c.kind) for c in changes] == [("principles", "polite", "changed")]
    assert changes[0].fields == {"revision": ("Rewrite the response politely.",
                                              "Rewrite the response kindly and politely.")}
    assert diff(old, old) == []
    assert diff(old, parse_text("# only a comment\n" + TINY)) == []


def test_diff_added_removed_and_preferences():
    d = data()
    d["principles"] = [p for p in d["principles"] if p["id"] != "honest"]
    d["principles"].append({"id": "kind", "critique": "Is it unkind?", "revision": "Make it kind."})
    d["preferences"][0]["question"] = "Which response is safer?"
    old, new = parse_text(TINY), parse_text(dump(d))
    got = {(c.section, c.id, c.kind) for c in diff(old, new)}
    assert got == {("principles", "honest", "removed"), ("principles", "kind", "added"),
                   ("preferences", "less-harmful", "changed")}
    added = next(c for c in diff(old, new) if c.kind == "added")
    assert added.fields["critique"] == (None, "Is it unkind?")
    removed = next(c for c in diff(old, new) if c.kind == "removed")
    assert removed.fields["revision"] == ("Rewrite the response so that it is honest.", None)


def test_diff_meta_and_few_shot():
    d = data()
    d["description"] = "Changed."
    d["few_shot"].append(dict(d["few_shot"][0], prompt="Another?"))
    got = {(c.section, c.id, c.kind) for c in diff(parse_text(TINY), parse_text(dump(d)))}
    assert got == {("meta", "description", "changed"), ("few_shot", "few_shot", "changed")}


# --- the shipped constitutions ------------------------------------------------------------

SHIPPED = sorted(PACKAGE_DIR.glob("*.yaml"))


def test_shipped_constitutions_exist():
    names = {p.stem for p in SHIPPED}
    assert {"harmless", "helpful-honest"} <= names, f"constitution/ holds {sorted(names)}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_constitution_is_valid(path: Path):
    c = load_file(path)
    assert c.name == path.stem, "the `name:` field should match the file name (NAME@VERSION refs use it)"
    assert c.principles and c.preferences and c.few_shot
    if path.stem == "harmless":
        assert len(c.principles) >= 12
        assert len(c.preferences) >= 8
        assert len(c.few_shot) >= 3
