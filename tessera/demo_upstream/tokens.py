"""Token and text helpers: one whitespace-separated word is one token.

Everything here is deterministic, so tests can predict counts, texts and vectors exactly.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct


def count_words(text: str) -> int:
    return len(text.split())


def generated_words(count: int) -> list[str]:
    """The text the demo "generates": ``tok0 tok1 ...``, one word per token."""
    return [f"tok{i}" for i in range(count)]


def embedding(key: str, dimensions: int) -> list[float]:
    """A unit-norm vector derived from a hash of ``key`` (same key, same vector)."""
    values: list[float] = []
    block = 0
    while len(values) < dimensions:
        digest = hashlib.blake2b(f"{block}:{key}".encode(), digest_size=64).digest()
        values.extend(word / 0xFFFFFFFF * 2.0 - 1.0 for (word,) in struct.iter_unpack("<I", digest))
        block += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def to_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format="base64"``: little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


VOCABULARY = 32_000


def token_ids(key: str, count: int) -> list[int]:
    """``count`` token ids below ``VOCABULARY``, derived from a hash of ``key``."""
    return [
        int.from_bytes(hashlib.blake2b(f"{i}:{key}".encode(), digest_size=4).digest(), "little") % VOCABULARY
        for i in range(count)
    ]


def relevance(query: str, document: str) -> float:
    """A score in [0, 1] for a pair of texts: the cosine of their embeddings, rescaled."""
    a, b = embedding(f"s:{query}", 8), embedding(f"s:{document}", 8)
    return (1.0 + sum(x * y for x, y in zip(a, b, strict=True))) / 2
