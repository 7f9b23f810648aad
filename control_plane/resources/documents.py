"""Files of YAML (or JSON) documents → validated :class:`Document` s, or one error naming every
problem (file, document number, field). Nothing is applied from a set with any problem.

Hostile input, and where it is stopped:
- size: at most 2 MiB and 10,000 documents a set; at most 200,000 YAML events and a nesting
  depth of 64, counted by libyaml's C parser before anything is built;
- YAML aliases (a few lines of anchors expand to gigabytes) and duplicate keys in a mapping (a
  reviewer sees one value, a parser keeps another) are errors;
- error messages carry positions and field names, never a value from the file (a value can be
  a secret pasted by mistake).
Parsing is CPU work: callers on the event loop run it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf.message import Message

from tessera import resources
from tessera.errors import InvalidArgumentError
from tessera.resources import API_VERSION, Kind, SpecError

MAX_BYTES = 2 * 1024 * 1024
MAX_DOCUMENTS = 10_000
MAX_EVENTS = 200_000
MAX_DEPTH = 64
# A document's name: printable, no spaces, no control or bidirectional-override characters.
_NAME = re.compile(r"[^\s\x00-\x1f\x7f\u200e\u200f\u202a-\u202e\u2066-\u2069]{1,128}")
# A limit has no name of its own in the API: its document name is a plain identifier.
_LIMIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True, slots=True)
class Document:
    kind: Kind
    name: str
    spec: Message
    source: str  # "file.yaml#2": where errors point

    @property
    def ref(self) -> str:
        return f"{self.kind.name}/{self.name}"


class _Loader(yaml.CSafeLoader):
    """libyaml's parser with the safe constructor, refusing duplicate keys."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key in seen:
                line = key_node.start_mark.line + 1
                msg = f"line {line}: a duplicate or non-scalar mapping key"
                raise yaml.constructor.ConstructorError(None, None, msg, None)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _line(event: Any) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}" if mark is not None else "a line"


def _check_events(content: str) -> None:
    """Aliases, size and depth, from the C parser's events (fast; builds nothing)."""
    depth = 0
    for count, event in enumerate(yaml.parse(content, Loader=yaml.CSafeLoader), 1):
        if isinstance(event, yaml.AliasEvent):
            raise SpecError(f"{_line(event)}: YAML aliases (*name) are not accepted")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"{_line(event)}: nested deeper than {MAX_DEPTH}")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        if count > MAX_EVENTS:
            raise SpecError(f"more than {MAX_EVENTS} YAML nodes")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The problem and its position, without the file's text (which may hold a secret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "not valid YAML"
    return f"not YAML: {problem}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")


def _load(name: str, content: str) -> list[tuple[str, Any]]:
    _check_events(content)
    docs = yaml.load_all(content, Loader=_Loader)
    return [(f"{name}#{i}", d) for i, d in enumerate(docs, 1) if d is not None]


def document_of(source: str, raw: Any) -> Document:
    """One document's mapping → a :class:`Document` (raises ``SpecError`` naming the field)."""
    if not isinstance(raw, dict):
        raise SpecError("a document must be a mapping with apiVersion, kind, metadata and spec")
    unknown = set(raw) - {"apiVersion", "kind", "metadata", "spec", "status"}
    if unknown:
        raise SpecError(f"unknown top-level field(s): {', '.join(sorted(map(str, unknown)))}")
    if raw.get("apiVersion") != API_VERSION:
        raise SpecError(f"apiVersion: must be {API_VERSION}")
    kind = resources.BY_NAME.get(str(raw.get("kind")))
    if kind is None:
        raise SpecError(f"kind: must be one of {', '.join(resources.BY_NAME)}")
    meta = raw.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    pattern = _LIMIT_NAME if kind.name == "Limit" else _NAME
    if not isinstance(name, str) or not pattern.fullmatch(name):
        what = "letters, digits, '.', '_' and '-'" if kind.name == "Limit" else "printable, no spaces"
        raise SpecError(f"metadata.name: 1 to {resources.MAX_NAME} characters, {what}, is required")
    return Document(kind, name, resources.parse_spec(kind, raw.get("spec")), source)


def _load_or_report(label: str, content: str, problems: list[str]) -> list[tuple[str, Any]]:
    try:
        return _load(label, content)
    except SpecError as exc:
        problems.append(f"{label}: {exc}")
    except yaml.YAMLError as exc:
        problems.append(f"{label}: {_yaml_problem(exc)}")
    except RecursionError:
        problems.append(f"{label}: nested too deeply")
    return []


def parse_files(files: Sequence[tuple[str, str]]) -> list[Document]:
    """``(file name, content)`` pairs → the documents, in the order given."""
    if sum(len(c) for _, c in files) > MAX_BYTES:
        raise InvalidArgumentError("files", f"at most {MAX_BYTES // (1024 * 1024)} MiB of documents")
    problems: list[str] = []
    docs: list[Document] = []
    seen: dict[tuple[str, str], str] = {}
    for name, content in files:
        label = name or "-"
        loaded = _load_or_report(label, content, problems)
        for source, raw in loaded:
            if len(docs) + len(problems) >= MAX_DOCUMENTS:
                raise InvalidArgumentError("files", f"at most {MAX_DOCUMENTS} documents")
            try:
                doc = document_of(source, raw)
            except SpecError as exc:
                problems.append(f"{source}: {exc}")
                continue
            if (first := seen.get((doc.kind.name, doc.name))) is not None:
                problems.append(f"{source}: {doc.ref} is also declared in {first}")
                continue
            seen[(doc.kind.name, doc.name)] = source
            docs.append(doc)
    if problems:
        raise InvalidArgumentError("documents", "; ".join(problems))
    return docs
