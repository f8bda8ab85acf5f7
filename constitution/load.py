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
        super().__init__(_one_line(f"{where}: {message}"))


_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def _one_line(text: str) -> str:
    """Line breaks from the file (in a key, a tag, a path) written as escapes: one error, one line."""
    return _BREAKS.sub(lambda m: ascii(m.group())[1:-1], text)


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str

    @property
    def hash(self) -> str:
        return _short_hash({"id": self.id, "critique": self.critique, "revision": self.revision})


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
    source_text: str = ""
    source_path: str = ""
    _by_id: dict[str, Principle] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {p.id: p for p in self.principles}

    def content(self) -> dict[str, Any]:
        """The parsed content that defines the version (order of principles matters)."""
        return {
            "name": self.name,
            "description": self.description,
            "principles": [{"id": p.id, "critique": p.critique, "revision": p.revision}
                           for p in self.principles],
            "preferences": [{"id": p.id, "question": p.question} for p in self.preferences],
            "few_shot": [
                {"prompt": f.prompt, "response": f.response, "principle": f.principle,
                 "critique": f.critique, "revision": f.revision}
                for f in self.few_shot
            ],
        }

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


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


# --- parsing -------------------------------------------------------------------------------

_SCHEMA: dict[str, Any] = {
    "name": str,
    "description": str,
    "principles": [{"id": str, "critique": str, "revision": str}],
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


def _check(value: Any, schema: Any, path: list[str | int], fail) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            fail(path, f"expected a mapping with keys {', '.join(schema)}, got {type(value).__name__}")
        for key in value:
            if key not in schema:
                fail(path + [key], f"unknown key (expected one of: {', '.join(schema)})")
        for key, sub in schema.items():
            if key not in value or value[key] is None:
                fail(path + [key], "missing")
            _check(value[key], sub, path + [key], fail)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            fail(path, f"expected a list, got {type(value).__name__}")
        if not value:
            fail(path, "empty list (at least one entry is needed)")
        for i, item in enumerate(value):
            _check(item, schema[0], path + [i], fail)
    elif schema is str:
        if not isinstance(value, str):
            fail(path, f"expected text, got {type(value).__name__}")
        if not value.strip():
            fail(path, "empty text")
        # "\ud800" and "\0" escapes: text that cannot be encoded, hashed or stored in PostgreSQL
        if "\x00" in value:
            fail(path, "contains a NUL character (\\0); remove it")
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            fail(path, "contains a lone surrogate escape (\\ud800-\\udfff), which is not text; remove it")


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

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Refused(problem="YAML aliases (*name) are not supported in a constitution; write the "
                           "text out where it is used", problem_mark=self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels (a constitution needs 3)",
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


def _compose(text: str) -> tuple[yaml.Node | None, Any]:
    """(root node, data), composing once: the data is constructed from the checked nodes."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()


def parse_text(text: str, file: str = "<text>") -> Constitution:
    """Parse and validate constitution YAML; raise ConstitutionError naming line or field path."""
    try:
        root, data = _compose(text)
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

    s = lambda v: v.strip()  # noqa: E731 - surrounding whitespace is not content
    return Constitution(
        name=s(data["name"]),
        description=s(data["description"]),
        principles=[Principle(s(p["id"]), s(p["critique"]), s(p["revision"])) for p in data["principles"]],
        preferences=[Preference(s(p["id"]), s(p["question"])) for p in data["preferences"]],
        few_shot=[FewShot(s(f["prompt"]), s(f["response"]), s(f["principle"]), s(f["critique"]),
                          s(f["revision"])) for f in data["few_shot"]],
        source_text=text,
        source_path=file,
    )


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


# --- diff ----------------------------------------------------------------------------------

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
    for section, fields in (("principles", ("critique", "revision")), ("preferences", ("question",))):
        a = {p.id: p for p in getattr(old, section)}
        b = {p.id: p for p in getattr(new, section)}
        for pid in a.keys() - b.keys():
            changes.append(Change(section, pid, "removed", {f: (getattr(a[pid], f), None) for f in fields}))
        for pid in b.keys() - a.keys():
            changes.append(Change(section, pid, "added", {f: (None, getattr(b[pid], f)) for f in fields}))
        for pid in a.keys() & b.keys():
            changed = {f: (getattr(a[pid], f), getattr(b[pid], f)) for f in fields
                       if getattr(a[pid], f) != getattr(b[pid], f)}
            if changed:
                changes.append(Change(section, pid, "changed", changed))
    fa = [repr(f) for f in old.few_shot]
    fb = [repr(f) for f in new.few_shot]
    if fa != fb:
        changes.append(Change("few_shot", "few_shot", "changed",
                              {"count": (str(len(fa)), str(len(fb)))}))
    order = {"meta": 0, "principles": 1, "preferences": 2, "few_shot": 3}
    return sorted(changes, key=lambda c: (order[c.section], c.id))
