"""Load, validate, version and diff constitution files.

    cai constitution validate constitution/harmless.yaml

A version id is the short SHA-256 of the canonical parsed content, so whitespace and comment
edits are not new versions. Each principle has a stable `id` and its own content hash, which
lets the factory redo only the work an edited principle touched.

Whatever the text, the loader returns a Constitution or raises one ConstitutionError naming
file:line: YAML aliases are refused (a few hundred bytes of nested aliases expand to billions of
nodes) and nesting is bounded (the YAML composer recurses once per level).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VERSION_LEN = 8
MAX_DEPTH = 64  # the schema needs 3 levels; far below Python's recursion limit
ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
PACKAGE_DIR = Path(__file__).parent


class ConstitutionError(ValueError):
    """A constitution file is malformed; `str(err)` names the file, line/field and what was expected."""

    def __init__(self, file: str, message: str, line: int | None = None, col: int | None = None):
        self.file, self.line, self.col, self.detail = file, line, col, message
        where = file
        if line is not None:
            where += f":{line}" + (f":{col}" if col is not None else "")
        super().__init__(one_line(f"{where}: {message}"))


_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """Line breaks from the file (in a key, a tag, a path) written as escapes: one error, one line."""
    return _BREAKS.sub(lambda m: ascii(m.group())[1:-1], text)


STANCES = ("refuse", "answer")


@dataclass(frozen=True)
class Governs:
    """Which prompts a principle governs: any prompt carrying one of `tags`, or of one of `categories`."""

    categories: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.categories or self.tags)


@dataclass(frozen=True)
class Principle:
    """A rule of the constitution. `critique`/`revision` drive SL-CAI; a principle with a `stance`
    also declares what the prompts it `governs` should get (refuse or answer) and carries
    `examples` (replies that follow it: what a small model is primed with, and few-shot material
    for a large one) and `counter_examples` (replies that break it, e.g. needless refusals). An
    answer principle may also give `counter_openings`: the first words of a needless refusal ("I
    won't help with"), which the model completes for each prompt, so the refusal it is taught to
    avoid names that prompt's own topic, as a trained small model's over-refusals do."""

    id: str
    critique: str
    revision: str
    stance: str | None = None  # refuse | answer | None (used only in critique/revision rounds)
    governs: Governs = field(default_factory=Governs)
    examples: tuple[str, ...] = ()
    counter_examples: tuple[str, ...] = ()
    counter_openings: tuple[str, ...] = ()

    def content(self) -> dict[str, Any]:
        """What defines this principle; the optional fields only when set, so a file written before
        they existed keeps its version."""
        out: dict[str, Any] = {"id": self.id, "critique": self.critique, "revision": self.revision}
        if self.stance:
            out["stance"] = self.stance
        if self.governs:
            out["governs"] = {k: list(v) for k, v in (("categories", self.governs.categories),
                                                       ("tags", self.governs.tags)) if v}
        if self.examples:
            out["examples"] = list(self.examples)
        if self.counter_examples:
            out["counter_examples"] = list(self.counter_examples)
        if self.counter_openings:
            out["counter_openings"] = list(self.counter_openings)
        return out

    @property
    def hash(self) -> str:
        return _short_hash(self.content())

    @property
    def refuses(self) -> bool:
        return self.stance == "refuse"


@dataclass(frozen=True)
class Preference:
    id: str
    question: str

    @property
    def hash(self) -> str:
        return _short_hash({"id": self.id, "question": self.question})


@dataclass(frozen=True)
class FewShot:
    prompt: str
    response: str
    principle: str  # id of the principle whose requests the example demonstrates
    critique: str
    revision: str


@dataclass
class Constitution:
    name: str
    description: str
    principles: list[Principle]
    preferences: list[Preference]
    few_shot: list[FewShot]
    default_principle: str | None = None  # governs prompts that have no category
    source_text: str = ""
    source_path: str = ""
    _by_id: dict[str, Principle] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {p.id: p for p in self.principles}

    def content(self) -> dict[str, Any]:
        """The parsed content that defines the version (order of principles matters)."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "principles": [p.content() for p in self.principles],
            "preferences": [{"id": p.id, "question": p.question} for p in self.preferences],
            "few_shot": [
                {"prompt": f.prompt, "response": f.response, "principle": f.principle,
                 "critique": f.critique, "revision": f.revision}
                for f in self.few_shot
            ],
        }
        if self.default_principle:
            out["default_principle"] = self.default_principle
        return out

    @property
    def canonical(self) -> str:
        return json.dumps(self.content(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical.encode("utf-8")).hexdigest()

    @property
    def version(self) -> str:
        return self.sha256[:VERSION_LEN]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def principle(self, pid: str) -> Principle:
        return self._by_id[pid]

    def preference(self, pid: str) -> Preference:
        return next(p for p in self.preferences if p.id == pid)

    def principle_hashes(self) -> dict[str, str]:
        return {p.id: p.hash for p in self.principles} | {f"pref:{p.id}": p.hash for p in self.preferences}

    def few_shot_for(self, principle_id: str) -> list[FewShot]:
        """The few-shot examples that demonstrate one principle (a conversation under it carries
        only these, so editing another principle's example redoes none of its rows)."""
        return [f for f in self.few_shot if f.principle == principle_id]

    def taught_texts(self) -> dict[str, list[str]]:
        """Every reply this constitution teaches or names as a refusal: the examples of its refuse
        principles and the counter-examples (needless refusals) of its answer principles."""
        out: dict[str, list[str]] = {}
        for p in self.principles:
            texts = list(p.examples) if p.refuses else list(p.counter_examples) if p.stance == "answer" else []
            if texts:
                out[p.id] = texts
        return out


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


# --- parsing -------------------------------------------------------------------------------

class _Optional:
    """A key that may be left out of the file (the parsed value is then its default)."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema


_SCHEMA: dict[str, Any] = {
    "name": str,
    "description": str,
    "default_principle": _Optional(str),
    "principles": [{"id": str, "critique": str, "revision": str, "stance": _Optional(str),
                    "governs": _Optional({"categories": _Optional([str]), "tags": _Optional([str])}),
                    "examples": _Optional([str]), "counter_examples": _Optional([str]),
                    "counter_openings": _Optional([str])}],
    "preferences": [{"id": str, "question": str}],
    "few_shot": [{"prompt": str, "response": str, "principle": str, "critique": str, "revision": str}],
}


def _node_at(root: yaml.Node | None, path: list[str | int]) -> yaml.Node | None:
    """The YAML node at a field path, for line numbers in schema errors."""
    node = root
    for part in path:
        if node is None:
            return None
        if isinstance(part, int) and isinstance(node, yaml.SequenceNode):
            node = node.value[part] if part < len(node.value) else None
        elif isinstance(part, str) and isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        else:
            return None
    return node


def _fmt_path(path: list[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:  # a key from the file may be any scalar: show an odd one as its repr
            name = part if isinstance(part, str) and re.fullmatch(r"[\w-]+", part) else repr(part)
            out += f".{name}" if out else name
    return out


def text_problem(value: str) -> str | None:
    """Why `value` is not storable text, or None. "\\ud800" and "\\0" escapes (and undecodable
    bytes in a command line) make text that cannot be encoded, hashed or stored in PostgreSQL."""
    if "\x00" in value:
        return "contains a NUL character (\\0); remove it"
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        return "contains a lone surrogate escape (\\ud800-\\udfff), which is not text; remove it"
    return None


def _check(value: Any, schema: Any, path: list[str | int], fail) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            fail(path, f"expected a mapping with keys {', '.join(schema)}, got {type(value).__name__}")
        for key in value:
            if key not in schema:
                fail(path + [key], f"unknown key (expected one of: {', '.join(schema)})")
        for key, sub in schema.items():
            if key not in value or value[key] is None:
                if isinstance(sub, _Optional):
                    continue
                fail(path + [key], "missing")
            _check(value[key], sub.schema if isinstance(sub, _Optional) else sub, path + [key], fail)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            fail(path, f"expected a list, got {type(value).__name__}")
        if not value:
            fail(path, "empty list (at least one entry is needed)")
        for i, item in enumerate(value):
            _check(item, schema[0], path + [i], fail)
    elif schema is str:
        if isinstance(value, dict):
            fail(path, "expected text, got a mapping: in plain YAML text, ': ' starts a key; put the text in "
                 "quotes or after >-")
        if not isinstance(value, str):
            fail(path, f"expected text, got {type(value).__name__}")
        if not value.strip():
            fail(path, "empty text")
        problem = text_problem(value)
        if problem:
            fail(path, problem)


def _no_duplicate_keys(node: yaml.Node | None, file: str) -> None:
    """YAML quietly keeps the last of two equal keys; an edit to the first would be lost.

    Each node is visited once and the recursion is shallow: the loader refuses aliases and
    nesting deeper than MAX_DEPTH.
    """
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            key = getattr(k, "value", None)
            if isinstance(key, str) and key in seen:
                raise ConstitutionError(file, f"duplicate key {key!r} in one mapping",
                                        k.start_mark.line + 1, k.start_mark.column + 1)
            seen.add(key)
            _no_duplicate_keys(v, file)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _no_duplicate_keys(item, file)


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML this loader will not take (an alias, too deep, a value Python cannot build)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and nesting deeper than MAX_DEPTH while composing."""

    what = "a constitution"  # named in the refusals
    needs = 3  # levels the format needs

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Refused(problem=f"YAML aliases (*name) are not supported in {self.what}; write the "
                           "text out where it is used", problem_mark=self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels ({self.what} needs {self.needs})",
                           problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # 2024-13-45, an int of 5 000 digits
            first = (str(exc).splitlines() or [""])[0]
            value = str(node.value)
            shown = repr(value if len(value) <= 40 else value[:40] + "...")
            raise _Refused(problem=f"cannot read the value {shown} ({first})",
                           problem_mark=node.start_mark) from None


def _compose(text: str, loader_class: type[_Loader] = _Loader) -> tuple[yaml.Node | None, Any]:
    """(root node, data), composing once: the data is constructed from the checked nodes."""
    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()


def safe_yaml(text: str, file: str = "<text>", what: str = "a constitution", needs: int = 3,
              ) -> tuple[yaml.Node | None, Any]:
    """(root node, data) of YAML text, read the one safe way (no aliases, bounded depth, values
    Python can build); raise ConstitutionError naming file:line:col. Config files and --set
    values are read with it too (`what` names the kind of text in a refusal)."""
    loader_class = type("_Loader", (_Loader,), {"what": what, "needs": needs})
    try:
        return _compose(text, loader_class)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow; it has a position, not a mark
        line = text[:exc.position].count("\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConstitutionError(file, f"YAML syntax error: character {code:#x} is not allowed in YAML text",
                                line) from None
    except _Refused as exc:
        mark = exc.problem_mark
        raise ConstitutionError(file, exc.problem, mark.line + 1, mark.column + 1) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [""])[0]
        if getattr(exc, "context", None):  # "expected a single document in the stream, but found another"
            problem = f"{exc.context}, {problem}"
        if mark is not None:
            raise ConstitutionError(file, f"YAML syntax error: {problem}", mark.line + 1,
                                    mark.column + 1) from None
        raise ConstitutionError(file, f"YAML syntax error: {problem}") from None


def parse_text(text: str, file: str = "<text>") -> Constitution:
    """Parse and validate constitution YAML; raise ConstitutionError naming line or field path."""
    root, data = safe_yaml(text, file)

    def fail(path: list[str | int], message: str) -> None:
        node = _node_at(root, path) or _node_at(root, path[:-1])
        line = node.start_mark.line + 1 if node is not None else None
        label = _fmt_path(path) or "(top level)"
        raise ConstitutionError(file, f"{label}: {message}", line)

    if data is None:
        fail([], "the file is empty")
    _no_duplicate_keys(root, file)
    _check(data, _SCHEMA, [], fail)

    for section, key in (("principles", "id"), ("preferences", "id")):
        seen: dict[str, int] = {}
        for i, item in enumerate(data[section]):
            pid = item[key]
            if not ID_RE.match(pid):
                fail([section, i, key], f"id {pid!r} must be lowercase letters, digits, '-' or '_'")
            if pid in seen:
                fail([section, i, key], f"duplicate id {pid!r} (first used at {section}[{seen[pid]}])")
            seen[pid] = i
    principle_ids = {p["id"] for p in data["principles"]}
    for i, ex in enumerate(data["few_shot"]):
        if ex["principle"] not in principle_ids:
            fail(["few_shot", i, "principle"], f"unknown principle {ex['principle']!r}")
    _check_governance(data, fail)

    s = lambda v: v.strip()  # noqa: E731 - surrounding whitespace is not content
    texts = lambda p, k: tuple(s(t) for t in p.get(k) or ())  # noqa: E731

    def principle(p: dict[str, Any]) -> Principle:
        g = p.get("governs") or {}
        return Principle(s(p["id"]), s(p["critique"]), s(p["revision"]), stance=p.get("stance"),
                         governs=Governs(texts(g, "categories"), texts(g, "tags")),
                         examples=texts(p, "examples"), counter_examples=texts(p, "counter_examples"),
                         counter_openings=texts(p, "counter_openings"))

    return Constitution(
        name=s(data["name"]),
        description=s(data["description"]),
        principles=[principle(p) for p in data["principles"]],
        preferences=[Preference(s(p["id"]), s(p["question"])) for p in data["preferences"]],
        few_shot=[FewShot(s(f["prompt"]), s(f["response"]), s(f["principle"]), s(f["critique"]),
                          s(f["revision"])) for f in data["few_shot"]],
        default_principle=s(data["default_principle"]) if data.get("default_principle") else None,
        source_text=text,
        source_path=file,
    )


def _check_governance(data: dict[str, Any], fail) -> None:
    """Stances, what each principle governs, and the default: the declarations that decide which
    prompts are refused and which answered. Contradictions inside one file are errors here;
    across files, `cai constitution lint` finds them."""
    claimed: dict[tuple[str, str], tuple[int, str]] = {}  # (kind, name) -> (principle index, stance)
    for i, p in enumerate(data["principles"]):
        stance = p.get("stance")
        if stance is not None and stance not in STANCES:
            fail(["principles", i, "stance"], f"expected refuse or answer, got {stance!r}")
        governs = p.get("governs") or {}
        if governs and stance is None:
            fail(["principles", i, "governs"], "a principle that governs prompts needs `stance: refuse` or "
                 "`stance: answer` (what those prompts should get)")
        for kind in ("categories", "tags"):
            for j, name in enumerate(governs.get(kind) or ()):
                if not ID_RE.match(name.strip()):
                    fail(["principles", i, "governs", kind, j],
                         f"{name!r} must be lowercase letters, digits, '-' or '_' (as prompt categories and tags are)")
                first = claimed.get((kind, name.strip()))
                if first and first[1] != stance:
                    fail(["principles", i, "governs", kind, j],
                         f"{kind[:-1] if kind == 'tags' else 'category'} {name.strip()!r} is also governed by "
                         f"principles[{first[0]}] with stance {first[1]}: one prompt cannot be both refused and "
                         "answered")
                claimed.setdefault((kind, name.strip()), (i, stance))
        for key in ("examples", "counter_examples", "counter_openings"):
            if p.get(key) and stance is None:
                fail(["principles", i, key], f"{key} belong to a principle with a stance (refuse or answer)")
        if p.get("counter_openings") and stance != "answer":
            fail(["principles", i, "counter_openings"], "counter_openings (needless refusals the model completes) "
                 "belong to a principle with stance answer")
    default = data.get("default_principle")
    if default is not None:
        match = [p for p in data["principles"] if p["id"] == default.strip()]
        if not match:
            fail(["default_principle"], f"unknown principle {default!r}")
        if match[0].get("stance") is None:
            fail(["default_principle"], f"principle {default!r} has no stance, so it cannot govern prompts")


def field_lines(c: Constitution) -> dict[str, int]:
    """Field path (`principles[3].examples[1]`) -> 1-based line in the constitution's source text,
    for messages that point at the file (empty when there is no source text)."""
    if not c.source_text:
        return {}
    try:
        root, _ = _compose(c.source_text)
    except (yaml.YAMLError, _Refused):
        return {}
    out: dict[str, int] = {}

    def walk(node: yaml.Node | None, path: str) -> None:
        if node is None:
            return
        if path:
            out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = getattr(k, "value", "")
                walk(v, f"{path}.{key}" if path else str(key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    walk(root, "")
    return out


def load_file(path: str | Path) -> Constitution:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConstitutionError(str(path), f"cannot read file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConstitutionError(str(path), f"not UTF-8 text (byte {exc.object[exc.start]:#x}); "
                                "save the file as UTF-8", line) from None
    return parse_text(text, str(path))


def search_dirs() -> list[Path]:
    """Where constitution names are looked up: $CAI_CONSTITUTION_DIR, ./constitution, the package."""
    dirs = []
    if os.environ.get("CAI_CONSTITUTION_DIR"):
        dirs.append(Path(os.environ["CAI_CONSTITUTION_DIR"]))
    dirs += [Path.cwd() / "constitution", PACKAGE_DIR]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def available() -> dict[str, Path]:
    """name (file stem) -> path, first directory wins."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def find(name_or_path: str) -> Path:
    """Resolve `harmless`, `harmless.yaml` or a path to a file; raise ConstitutionError if unknown."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    files = available()
    stem = p.stem if p.suffix in (".yaml", ".yml") else name_or_path
    if stem in files:
        return files[stem]
    known = ", ".join(sorted(files)) or "none"
    raise ConstitutionError(name_or_path, f"no such constitution (known: {known}; "
                            f"looked in {', '.join(str(d) for d in search_dirs())})")


def split_ref(ref: str) -> tuple[str, str | None]:
    """`harmless@3f2a9c1b` -> ("harmless", "3f2a9c1b"); `harmless` -> ("harmless", None)."""
    name, _, version = ref.partition("@")
    return name, (version or None)


def split_refs(text: str) -> list[tuple[str, str | None]]:
    """`harmless@3f2a, helpful-honest` -> [("harmless", "3f2a"), ("helpful-honest", None)]: a comma-separated
    list of refs (a training filter's `constitution`), blanks skipped."""
    return [split_ref(ref.strip()) for ref in text.split(",") if ref.strip()]


# --- diff ----------------------------------------------------------------------------------

PRINCIPLE_FIELDS = ("critique", "revision", "stance", "governs", "examples", "counter_examples", "counter_openings")


def _text(item: Any, name: str) -> str | None:
    """A field as diff text: lists one entry per line, `governs` as `categories: a, b; tags: c`."""
    value = getattr(item, name)
    if isinstance(value, Governs):
        parts = [f"{k}: {', '.join(v)}" for k, v in (("categories", value.categories), ("tags", value.tags)) if v]
        return "; ".join(parts) or None
    if isinstance(value, tuple):
        return "\n".join(f"- {v}" for v in value) or None
    return value


@dataclass
class Change:
    section: str  # principles | preferences | few_shot | meta
    id: str
    kind: str  # added | removed | changed
    fields: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # field -> (old, new)


def diff(old: Constitution, new: Constitution) -> list[Change]:
    """Principle-level differences, by id, with the old and new text of each changed field."""
    changes: list[Change] = []
    for key in ("name", "description"):
        if getattr(old, key) != getattr(new, key):
            changes.append(Change("meta", key, "changed", {key: (getattr(old, key), getattr(new, key))}))
    if old.default_principle != new.default_principle:
        changes.append(Change("meta", "default_principle", "changed",
                              {"default_principle": (old.default_principle, new.default_principle)}))
    for section, fields in (("principles", PRINCIPLE_FIELDS), ("preferences", ("question",))):
        a = {p.id: p for p in getattr(old, section)}
        b = {p.id: p for p in getattr(new, section)}
        for pid in a.keys() - b.keys():
            changes.append(Change(section, pid, "removed", {f: (_text(a[pid], f), None) for f in fields
                                                           if _text(a[pid], f) is not None}))
        for pid in b.keys() - a.keys():
            changes.append(Change(section, pid, "added", {f: (None, _text(b[pid], f)) for f in fields
                                                         if _text(b[pid], f) is not None}))
        for pid in a.keys() & b.keys():
            changed = {f: (_text(a[pid], f), _text(b[pid], f)) for f in fields
                       if _text(a[pid], f) != _text(b[pid], f)}
            if changed:
                changes.append(Change(section, pid, "changed", changed))
    fa = [repr(f) for f in old.few_shot]
    fb = [repr(f) for f in new.few_shot]
    if fa != fb:
        changes.append(Change("few_shot", "few_shot", "changed",
                              {"count": (str(len(fa)), str(len(fb)))}))
    order = {"meta": 0, "principles": 1, "preferences": 2, "few_shot": 3}
    return sorted(changes, key=lambda c: (order[c.section], c.id))
