"""Property tests for constitution/load.py: whatever the text, a Constitution or one ConstitutionError.

    .venv/bin/python -m pytest tests/test_hardening_constitution.py

The error must be one line that starts with the file name (and, where the text has one, its
line), never a traceback, a RecursionError or a hang.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from constitution.load import Constitution, ConstitutionError, load_file, parse_text

FILE = "c.yaml"
VALID = {
    "name": "tiny",
    "description": "A tiny constitution.",
    "principles": [{"id": "harm", "critique": "Is it harmful?", "revision": "Make it harmless."}],
    "preferences": [{"id": "safer", "question": "Which is safer?"}],
    "few_shot": [{"prompt": "p", "response": "r", "principle": "harm", "critique": "c", "revision": "v"}],
}
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner,
                                                 max_size=4)), max_leaves=25)
KEYS = ["name", "description", "principles", "preferences", "few_shot", "id", "critique", "revision",
        "question", "prompt", "response", "principle", "extra"]


def outcome(fn, *args) -> Constitution | ConstitutionError:
    try:
        return fn(*args)
    except ConstitutionError as exc:
        return exc


def assert_clean(result, file: str = FILE) -> None:
    if isinstance(result, Constitution):
        result.canonical.encode("utf-8")  # every accepted text can be hashed and stored
        assert result.version and result.principles
        return
    message = str(result)
    assert len(message.splitlines()) == 1 and "\n" not in message, message
    assert re.match(re.escape(file) + r"(:\d+(:\d+)?)?: \S", message), message


@FAST
@given(st.text(max_size=300))
def test_any_text(text: str):
    assert_clean(outcome(parse_text, text, FILE))


@FAST
@given(st.text(alphabet="[]{}:-&*!?|>#'\"\n\t ,ab1@%\\", max_size=200))
def test_yaml_punctuation(text: str):
    assert_clean(outcome(parse_text, text, FILE))


@FAST
@given(documents)
def test_any_yaml_structure(doc):
    assert_clean(outcome(parse_text, yaml.safe_dump(doc, allow_unicode=True), FILE))


@st.composite
def near_valid(draw):
    """The valid constitution with one field replaced, added or removed anywhere in it."""
    doc = copy.deepcopy(VALID)
    node, path = doc, []
    while isinstance(node, (dict, list)) and node and (not path or draw(st.booleans())):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        path.append(key)
        if not isinstance(node[key], (dict, list)):
            break
        node = node[key]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.sampled_from(KEYS))] = draw(documents)
    else:
        parent[path[-1]] = draw(documents)
    return doc


@FAST
@given(near_valid())
def test_near_valid_documents(doc):
    assert_clean(outcome(parse_text, yaml.safe_dump(doc, allow_unicode=True), FILE))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_any_bytes_in_a_file(tmp_path: Path, blob: bytes):
    path = tmp_path / "c.yaml"
    path.write_bytes(blob)
    assert_clean(outcome(load_file, path), str(path))
