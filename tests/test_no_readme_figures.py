"""Config help strings and code comments say what a setting does and why; they do not cite README
measurements, which go stale with every run (measurements live in docs/results/, one dated page each).

Checked: every config field's description (`cai <stage> --help` and docs/cli.md show them) and the
comments and docstrings of the product and bench code."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cai", "flows", "engines", "store", "training", "constitution", "bench")
# "README" as a source of figures; README.md the file (an export's dataset card) is fine
README = re.compile(r"\bREADME\b(?!\.md)")
# a measurement in a help string: a date, "from 12 % to 0 %", "one reply of 50", "all 250 undid ..."
MEASURED = re.compile(r"\b202[5-9]-\d\d-\d\d\b|\bfrom \d+(?:\.\d+)? ?% to \d|\b(?:one|\d+) (?:reply|prompt)s? of \d+\b"
                      r"|\ball \d+ (?:\w+ )?(?:undid|raised|lowered|left)\b")


def _descriptions(model: type[BaseModel], prefix: str, seen: set[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for name, f in model.model_fields.items():
        if (model.__name__, name) not in seen:
            seen.add((model.__name__, name))
            out.append((f"{model.__name__}.{name}", f.description or ""))
        default = None if f.is_required() else f.get_default(call_default_factory=True)
        sub = type(default) if isinstance(default, BaseModel) else f.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _descriptions(sub, f"{prefix}{name}.", seen)
    return out


def config_help_citations() -> list[str]:
    from flows.configs import CONFIGS

    seen: set[tuple[str, str]] = set()
    bad = []
    for model in CONFIGS.values():
        for where, text in _descriptions(model, "", seen):
            if README.search(text) or MEASURED.search(text):
                bad.append(f"{where}: {text}")
    return bad


def comment_citations(root: Path = ROOT) -> list[str]:
    bad = []
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            if "migrations/versions" in f.as_posix():
                continue
            src = f.read_text(encoding="utf-8")
            for tok in tokenize.generate_tokens(io.StringIO(src).readline):
                is_doc = tok.type == tokenize.STRING and tok.string.lstrip("rbuRBU").startswith(('"""', "'''"))
                if tok.type != tokenize.COMMENT and not is_doc:
                    continue
                m = README.search(tok.string)
                if m:
                    line = tok.start[0] + tok.string[: m.start()].count("\n")
                    bad.append(f"{f.relative_to(root)}:{line}: {src.splitlines()[line - 1].strip()}")
    return bad


def test_config_help_cites_no_readme_figures() -> None:
    bad = config_help_citations()
    assert not bad, "config help that cites README figures (say what the setting does, in one line):\n" + "\n".join(bad)


def test_code_comments_cite_no_readme() -> None:
    bad = comment_citations()
    assert not bad, "comments that cite the README (point at docs/results/ or say why):\n" + "\n".join(bad)


def test_the_checks_catch_a_citation(tmp_path: Path) -> None:
    """The patterns have teeth: the phrasings that used to be in the code are caught."""
    for text in ["1.15 took SmolLM2-135M's looping replies from 12 % to 0 %",
                 "SFT alone: one reply of 50 worse each way", "all 250 undid the refusals SFT taught",
                 "more lowers over-refusal (README)"]:
        assert README.search(text) or MEASURED.search(text), text
    assert not README.search("writes README.md and manifest.json")
    (tmp_path / "cai").mkdir()
    (tmp_path / "cai" / "x.py").write_text("X = 1  # chosen on the dev split (README)\n", encoding="utf-8")
    assert comment_citations(tmp_path) == ["cai/x.py:1: X = 1  # chosen on the dev split (README)"]
