"""Files of YAML (or JSON) documents → validated :class:`Document` s, or one error naming every
problem (file, document number, field). Nothing is applied from a set with any problem.

Hostile input: YAML aliases are refused (a few lines of anchors expand to gigabytes), and a
set is bounded in bytes and documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf.message import Message

from tessera import resources
from tessera.errors import InvalidArgumentError
from tessera.resources import API_VERSION, Kind, SpecError

MAX_BYTES = 4 * 1024 * 1024
MAX_DOCUMENTS = 10_000


@dataclass(frozen=True, slots=True)
class Document:
    kind: Kind
    name: str
    spec: Message
    source: str  # "file.yaml#2": where errors point

    @property
    def ref(self) -> str:
        return f"{self.kind.name}/{self.name}"


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


def _load(name: str, content: str) -> list[tuple[str, Any]]:
    docs = yaml.load_all(content, Loader=_Loader)
    return [(f"{name}#{i}", d) for i, d in enumerate(docs, 1) if d is not None]


def _document(source: str, raw: Any) -> Document:
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
    if not isinstance(name, str) or not name or len(name) > resources.MAX_NAME:
        raise SpecError(f"metadata.name: a name of 1 to {resources.MAX_NAME} characters is required")
    return Document(kind, name, resources.parse_spec(kind, raw.get("spec")), source)


def parse_files(files: Sequence[tuple[str, str]]) -> list[Document]:
    """``(file name, content)`` pairs → the documents, in the order given."""
    if sum(len(c) for _, c in files) > MAX_BYTES:
        raise InvalidArgumentError("files", f"at most {MAX_BYTES // (1024 * 1024)} MiB of documents")
    problems: list[str] = []
    docs: list[Document] = []
    seen: dict[tuple[str, str], str] = {}
    for name, content in files:
        try:
            loaded = _load(name or "-", content)
        except yaml.YAMLError as exc:
            problems.append(f"{name or '-'}: not YAML: {' '.join(str(exc).split())}")
            continue
        for source, raw in loaded:
            if len(docs) + len(problems) >= MAX_DOCUMENTS:
                raise InvalidArgumentError("files", f"at most {MAX_DOCUMENTS} documents")
            try:
                doc = _document(source, raw)
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
