"""What a verdict tells the client, whichever API carried it (admission stream or Envoy RLS):
OpenAI's ``x-ratelimit-*`` headers from the most restrictive enforced limit of each kind, and
the refusal's code (a rate, or a quota). Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

from ratelimit.limiter import LimitOutcome, Verdict
from ratelimit.limits import REQUESTS, TOKENS

_HEADER_KIND: Final = {REQUESTS: "requests", TOKENS: "tokens"}


def most_restrictive(outcomes: Iterable[LimitOutcome]) -> LimitOutcome | None:
    """The enforced limit with the least room (refusing ones first); shadow limits stay invisible."""
    best: LimitOutcome | None = None
    for o in outcomes:
        if o.limit.shadow:
            continue
        if best is None or _rank(o) < _rank(best):
            best = o
    return best


def _rank(o: LimitOutcome) -> tuple[bool, int, int]:
    return (not o.refuses, o.remaining if o.remaining is not None else o.limit.limit, o.limit.limit)


def go_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's): ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


def limit_headers(verdict: Verdict) -> list[tuple[str, str]]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (none for an unknown count)."""
    every = [o for per in verdict.outcomes for o in per]
    headers: list[tuple[str, str]] = []
    for kind, name in _HEADER_KIND.items():
        top = most_restrictive(o for o in every if o.limit.kind == kind)
        if top is not None and top.remaining is not None:
            headers.append((f"x-ratelimit-limit-{name}", str(top.limit.limit)))
            headers.append((f"x-ratelimit-remaining-{name}", str(top.remaining)))
            headers.append((f"x-ratelimit-reset-{name}", go_duration(top.reset_after)))
    return headers


def refusal_code(verdict: Verdict) -> str:
    """``insufficient_quota`` when the refusing limit is a quota (spend, a calendar month), else
    ``rate_limit_exceeded``."""
    refusing = most_restrictive(o for per in verdict.outcomes for o in per if o.refuses)
    return "insufficient_quota" if refusing is not None and refusing.limit.is_quota else "rate_limit_exceeded"


def retry_after_seconds(verdict: Verdict) -> int:
    return max(1, math.ceil(verdict.retry_after))
