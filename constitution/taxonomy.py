"""Load and version a harm taxonomy: categories, their descriptions and seed attack prompts.

    from constitution.taxonomy import load_taxonomy
    t = load_taxonomy("harms")            # constitution/taxonomy/harms.yaml, or a path
    t.ref                                 # "harms@1c9e2f0a"

Versioned like a constitution: the version is the short SHA-256 of the canonical parsed content,
so comments and whitespace are not new versions. Every error is one line naming file:line and the
field path (the YAML reading and line lookup are the constitution loader's, aliases refused).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from constitution.load import ID_RE, VERSION_LEN, ConstitutionError, _compose, _fmt_path, _no_duplicate_keys, _node_at

TAXONOMY_DIR = Path(__file__).parent / "taxonomy"
KINDS = ("harmful", "benign")
MIN_SEEDS = 2  # a few-shot list needs at least two examples to show a pattern


class TaxonomyError(ConstitutionError):
    """A taxonomy file is malformed; `str(err)` names the file, line, field and what was expected."""


@dataclass(frozen=True)
class Seed:
    prompt: str
    style: str

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps([self.style, self.prompt], ensure_ascii=False).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Category:
    id: str
    kind: str  # harmful | benign
    description: str
    seeds: tuple[Seed, ...]


@dataclass
class Taxonomy:
    name: str
    description: str
    styles: dict[str, str]
    categories: list[Category]
    source_text: str = ""
    source_path: str = ""
    _by_id: dict[str, Category] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {c.id: c for c in self.categories}

    def content(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "styles": self.styles,
                "categories": [{"id": c.id, "kind": c.kind, "description": c.description,
                                "seeds": [{"style": s.style, "prompt": s.prompt} for s in c.seeds]}
                               for c in self.categories]}

    @property
    def canonical(self) -> str:
        return json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def version(self) -> str:
        return hashlib.sha256(self.canonical.encode("utf-8")).hexdigest()[:VERSION_LEN]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def category(self, cid: str) -> Category:
        return self._by_id[cid]


def parse_taxonomy(text: str, file: str = "<text>") -> Taxonomy:
    """Parse and validate taxonomy YAML; raise TaxonomyError naming file:line and the field."""
    try:
        root, data = _compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [""])[0]
        raise TaxonomyError(file, f"YAML syntax error: {problem}", mark.line + 1 if mark else None) from None

    def fail(path: list[str | int], message: str):
        node = _node_at(root, path) or _node_at(root, path[:-1])
        line = node.start_mark.line + 1 if node is not None else None
        raise TaxonomyError(file, f"{_fmt_path(path) or '(top level)'}: {message}", line)

    def text_at(obj: Any, path: list[str | int]) -> str:
        if not isinstance(obj, str):
            fail(path, "missing" if obj is None else f"expected text, got {type(obj).__name__}")
        if not obj.strip():
            fail(path, "empty text")
        if "\x00" in obj or any("\ud800" <= ch <= "\udfff" for ch in obj):
            fail(path, "contains a NUL or lone surrogate character; remove it")
        return obj.strip()

    def mapping(obj: Any, path: list[str | int], keys: tuple[str, ...]) -> dict:
        if not isinstance(obj, dict):
            fail(path, f"expected a mapping with keys {', '.join(keys)}, got {type(obj).__name__}")
        for k in obj:
            if k not in keys:
                fail(path + [k], f"unknown key (expected one of: {', '.join(keys)})")
        return obj

    if data is None:
        fail([], "the file is empty")
    _no_duplicate_keys(root, file)
    top = mapping(data, [], ("name", "description", "styles", "categories"))
    styles_raw = top.get("styles")
    if not isinstance(styles_raw, dict) or not styles_raw:
        fail(["styles"], "expected a mapping of attack style -> one-line description")
    styles = {str(k): text_at(v, ["styles", k]) for k, v in styles_raw.items()}
    cats_raw = top.get("categories")
    if not isinstance(cats_raw, list) or not cats_raw:
        fail(["categories"], "expected a non-empty list of categories")
    categories: list[Category] = []
    first: dict[str, int] = {}
    for i, c in enumerate(cats_raw):
        path: list[str | int] = ["categories", i]
        c = mapping(c, path, ("id", "kind", "description", "seeds"))
        cid = text_at(c.get("id"), path + ["id"])
        if not ID_RE.match(cid):
            fail(path + ["id"], f"id {cid!r} must be lowercase letters, digits, '-' or '_'")
        if cid in first:
            fail(path + ["id"], f"duplicate id {cid!r} (first used at categories[{first[cid]}])")
        first[cid] = i
        kind = text_at(c.get("kind"), path + ["kind"])
        if kind not in KINDS:
            fail(path + ["kind"], f"expected one of {', '.join(KINDS)}, got {kind!r}")
        desc = text_at(c.get("description"), path + ["description"])
        if "\n" in desc:
            fail(path + ["description"], "must be one line (it goes into the few-shot prompt)")
        seeds_raw = c.get("seeds")
        if not isinstance(seeds_raw, list) or len(seeds_raw) < MIN_SEEDS:
            fail(path + ["seeds"], f"expected a list of at least {MIN_SEEDS} seed prompts")
        seeds = []
        for j, s in enumerate(seeds_raw):
            sp = path + ["seeds", j]
            s = mapping(s, sp, ("prompt", "style"))
            prompt = text_at(s.get("prompt"), sp + ["prompt"])
            if "\n" in prompt:
                fail(sp + ["prompt"], "must be one line (the attacker continues a one-line-per-request list)")
            style = text_at(s.get("style"), sp + ["style"])
            if style not in styles:
                fail(sp + ["style"], f"unknown style {style!r} (declared: {', '.join(styles)})")
            seeds.append(Seed(re.sub(r"\s+", " ", prompt), style))
        categories.append(Category(cid, kind, desc, tuple(seeds)))
    return Taxonomy(name=text_at(top.get("name"), ["name"]), description=text_at(top.get("description"),
                    ["description"]), styles=styles, categories=categories, source_text=text, source_path=file)


def find_taxonomy(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.exists():
            return p
        raise TaxonomyError(name_or_path, "no such file")
    bundled = TAXONOMY_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    known = ", ".join(sorted(q.stem for q in TAXONOMY_DIR.glob("*.yaml"))) or "none"
    raise TaxonomyError(name_or_path, f"no such taxonomy (bundled: {known}; or pass a .yaml path)")


def load_taxonomy(name_or_path: str) -> Taxonomy:
    path = find_taxonomy(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaxonomyError(str(path), f"cannot read file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise TaxonomyError(str(path), "not UTF-8 text; save the file as UTF-8", line) from None
    return parse_taxonomy(text, str(path))
