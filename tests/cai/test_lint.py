"""`cai constitution lint` (cai/lint.py): each kind of finding, and the bundled constitutions clean."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cai.lint import lint
from constitution.load import find, load_file, parse_text

BASE = """
name: {name}
description: Lint test.
principles:
{principles}
preferences:
  - id: better
    question: Which response is better?
few_shot:
  - prompt: Hi?
    response: Hello.
    principle: {first}
    critique: Fine.
    revision: Hello there.
"""


def make(name: str, principles: str, first: str = "p1"):
    return parse_text(BASE.format(name=name, principles=principles, first=first), f"{name}.yaml")


REFUSE = """  - id: p1
    critique: c
    revision: r
    stance: refuse
    governs:
      categories: [weapons]
    examples:
      - I can't help with making weapons, because they hurt people.
"""


def messages(findings) -> list[str]:
    return [str(f) for f in findings]


def test_the_bundled_constitutions_have_no_errors_or_warnings():
    cs = [load_file(find(n)) for n in ("harmless", "helpful-honest")]
    cats = {"weapons": 15, "self-harm": 13, "everyday": 200, "looks-risky": 100, "cybercrime": 15, "drugs": 13,
            "fraud-scams": 15, "hate-harassment": 13, "privacy-doxxing": 13, "violent-extremism": 13,
            "dangerous-medical-advice": 14, "manipulation": 13, "misinformation": 13, "finance-education": 60}
    found = [f for f in lint(cs, categories=cats, tags={}) if f.level != "info"]
    assert found == [], messages(found)


def test_opposite_stances_on_one_category_are_an_error_across_files():
    a = make("a", REFUSE)
    b = make("b", REFUSE.replace("stance: refuse", "stance: answer").replace(
        "examples:\n      - I can't help with making weapons, because they hurt people.",
        "counter_examples:\n      - Sorry, I can't help with that."))
    errors = [f for f in lint([a, b]) if f.level == "error"]
    assert any("category 'weapons' is governed by a:p1 (refuse) and b:p1 (answer)" in f.message for f in errors)
    assert errors[0].file == "b.yaml" and errors[0].line  # it points at the second file's governs


def test_one_principles_example_as_anothers_counter_example_is_a_contradiction():
    text = "I won't help with that, because it could hurt someone."
    a = make("a", REFUSE.replace("I can't help with making weapons, because they hurt people.", text))
    b = make("b", REFUSE.replace("examples:\n      - I can't help with making weapons, because they hurt people.",
                                 f"counter_examples:\n      - {text}").replace("stance: refuse", "stance: refuse"))
    assert any("one's example is the other's counter-example" in f.message and f.level == "error"
               for f in lint([a, b]))


def test_texts_that_make_bad_pairs_are_errors():
    looping = REFUSE.replace("I can't help with making weapons, because they hurt people.",
                             "I'm sorry. I'm sorry. I'm sorry. I'm sorry.")
    found = lint([make("a", looping)])
    assert any(f.level == "error" and "quality gate" in f.message and f.where == "principles[0].examples[0]"
               for f in found), messages(found)
    short = REFUSE.replace("I can't help with making weapons, because they hurt people.", "No.")
    assert any(f.level == "error" and "cannot recognise it as a refusal" in f.message for f in lint([make("a", short)]))
    answering = """  - id: p1
    critique: c
    revision: r
    stance: answer
    governs:
      categories: [everyday]
    examples:
      - I can't help with that request.
    counter_examples:
      - Sorry, but I can't help with that.
"""
    assert any(f.level == "error" and "reads as a refusal" in f.message for f in lint([make("a", answering)]))


def test_what_makes_no_pairs_is_a_warning():
    bare = """  - id: p1
    critique: c
    revision: r
    stance: refuse
    governs:
      categories: [weapons]
  - id: p2
    critique: c
    revision: r
    stance: answer
"""
    found = lint([make("a", bare)], categories={"weapons": 3, "gardening": 4}, tags={})
    text = "\n".join(messages(found))
    assert "p1 refuses but has no examples" in text and "p2 answers but has no counter_examples" in text
    assert "p2 has stance answer but governs no category or tag" in text
    assert "4 stored prompts of category 'gardening' are governed by no principle" in text
    assert "p1 governs no stored prompt" not in text  # weapons has prompts
    assert "p1 governs no stored prompt" in "\n".join(messages(lint([make("a", bare)], categories={"x": 1})))


def test_the_taxonomy_must_agree_with_the_stances():
    found = lint([make("a", REFUSE)], taxonomy={"weapons": "benign", "drugs": "harmful"})
    assert any(f.level == "error" and "the taxonomy calls 'weapons' benign" in f.message for f in found)
    assert any(f.level == "warning" and "'drugs' is governed by no principle" in f.message for f in found)


def test_long_texts_are_warned_about():
    long = "I can't help with that, because " + "it could hurt people and " * 40 + "that matters."
    found = lint([make("a", REFUSE.replace("I can't help with making weapons, because they hurt people.", long))])
    assert any(f.level == "warning" and "tokens (budget" in f.message for f in found)


@pytest.mark.parametrize("extra", [[], ["--verbose"]])
def test_the_command_on_the_bundled_constitutions(tmp_path, monkeypatch, extra):
    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAI_DATABASE_URL", f"sqlite:///{tmp_path / 'cai.db'}")
    r = CliRunner().invoke(app, ["constitution", "lint", *extra])
    assert r.exit_code == 0, r.output
    assert "harmless@" in r.output and "0 errors" in r.output
    assert ("info:" in r.output) == bool(extra)


def test_the_command_exits_1_on_an_error(tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CAI_DATABASE_URL", f"sqlite:///{tmp_path / 'cai.db'}")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.format(name="bad", first="p1", principles=REFUSE.replace(
        "I can't help with making weapons, because they hurt people.", "I'm sorry. I'm sorry. I'm sorry. I'm sorry.")))
    r = CliRunner().invoke(app, ["constitution", "lint", str(bad), "--taxonomy", "none"])
    assert r.exit_code == 1 and "bad.yaml:" in r.output and "error:" in r.output, r.output
