"""The README's REST example and its usage walkthrough, run as written, in order, on a fresh
`tessera up` (issue 17): the commands are read from README.md's code blocks, so the test fails
when the README drifts from what the stack does.

What a reader's machine changes is substituted, nothing else: the gateway's port (README: 8080),
`$DEMO_KEY` (the key `tessera up` printed) and the data dir (`$TESSERA_DATA_DIR`). Shown output is
compared token by token, with dates, the tenant id, local addresses and the demo backend's
settings standing for their kind; then the cost is checked against tokens x prices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import BIN, Stack, start_stack, stop_stack

pytestmark = pytest.mark.envoy

README = Path(__file__).resolve().parents[2] / "README.md"
READ_RETRY_SECONDS = 15.0  # a request is in `tessera usage` within about 2 s
VARIABLE = (  # what differs between the README's run and this one, most specific first
    (re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"), "<TIME>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}"), "<DAY>"),
    (re.compile(r"\d{4}-\d{2}"), "<MONTH>"),
    (re.compile(r"ten_[a-z0-9]+"), "<TENANT>"),
    (re.compile(r"127\.0\.0\.1:\d+"), "<ADDRESS>"),
    (re.compile(r"\([a-z-]+, w=\d+, p=\d+[^)]*\)"), "<BACKEND>"),  # how the demo upstream is registered
)


def _section(heading: str) -> str:
    """The README's text under ``heading`` up to the next heading of the same or a higher level
    (a line in a code block is no heading)."""
    level = heading.split(" ", 1)[0]
    lines, fenced, inside = README.read_text().splitlines(), False, False
    section = []
    for line in lines:
        fenced ^= line.startswith("```")
        title = not fenced and re.match(r"#+ ", line)
        if title and inside and len(title.group(0)) <= len(level) + 1:
            break
        inside = inside or line == heading
        if inside:
            section.append(line)
    assert section, f"no {heading!r} in README.md"
    return "\n".join(section)


def _sh_blocks(section: str) -> list[list[str]]:
    return [m.group(1).splitlines() for m in re.finditer(r"```sh\n(.*?)```", section, re.DOTALL)]


def _joined(lines: list[str]) -> Iterator[str]:
    """Lines with their backslash continuations joined."""
    command = ""
    for line in lines:
        command += line
        if command.endswith("\\"):
            command += "\n"  # bash joins them
            continue
        yield command
        command = ""


def _script(block: list[str]) -> list[str]:
    """A plain block's commands (comments dropped)."""
    return [c for c in _joined(block) if c.strip() and not c.lstrip().startswith("#")]


def _session(block: list[str]) -> list[tuple[str, list[str]]]:
    """A ``$ command`` block: each command with the output shown under it."""
    steps: list[tuple[str, list[str]]] = []
    lines = iter(block)
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command += "\n" + next(lines)
            steps.append((command, []))
        else:
            steps[-1][1].append(line)
    return steps


def _tokens(text: str) -> list[list[str]]:
    for pattern, name in VARIABLE:
        text = pattern.sub(name, text)
    return [re.split(r"[\s,]+", line.strip()) for line in text.strip().splitlines()]


class Shell:
    """bash as the reader's: the venv's `tessera` on PATH, this stack's data dir and demo key,
    and the exports of the commands run so far."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")} | {
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "TESSERA_DATA_DIR": str(stack.root),
            "DEMO_KEY": stack.demo_key,
        }
        self.exports: list[str] = []

    def run(self, command: str) -> str:
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{self.stack.port}")
        script = "\n".join(["set -euo pipefail", *self.exports, command])
        done = subprocess.run(
            ["bash", "-c", script], env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        if command.startswith("export "):
            name = command.split()[1].split("=")[0]
            self.exports.append(command)
            assert self.run(f'printf %s "${name}"'), f"{command} set nothing"
        return done.stdout


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Iterator[Stack]:
    """A stack of its own: the walkthrough starts from nothing (no other test's usage or keys)."""
    stack = start_stack(tmp_path_factory.mktemp("readme"))
    yield stack
    stop_stack(stack)


def test_the_rest_example_then_the_usage_walkthrough_as_the_readme_says(fresh: Stack):
    shell = Shell(fresh)
    (rest,) = [
        b for b in _sh_blocks(_section("## Using it: the admin workflow")) if "/admin/v1/" in "".join(b)
    ]
    shown = [c for c in rest if c.startswith("# {")]  # the responses' shape, as comments
    commands = _script(rest)
    assert commands[0] == "export TESSERA_ADMIN_TOKEN=$(tessera admin token)"
    shell.run(commands[0])
    tenants = json.loads(shell.run(commands[1]))
    assert "demo" in [t["name"] for t in tenants["items"]]
    key = json.loads(shell.run(commands[2]))
    assert key["key"].startswith("tsk_")
    assert key["api_key"]["tenant_id"] == next(t["id"] for t in tenants["items"] if t["name"] == "demo")
    assert len(commands) == 3
    for comment, response in zip(shown, (tenants, key), strict=True):
        for field in re.findall(r'"(\w+)":', comment):
            assert f'"{field}"' in json.dumps(response), f"README shows {field!r}: {response}"

    (walkthrough,) = _sh_blocks(_section("### Usage and invoices"))
    steps = _session(walkthrough)
    prices: dict[str, int] = {}
    for command, expected in steps:
        if "models price" in command:
            flags = re.findall(r"--(input|output|cached)-price (\d+)", command)
            prices = {name: int(value) for name, value in flags}
        reads = command.startswith(("tessera usage", "tessera invoices preview"))
        deadline = time.monotonic() + (READ_RETRY_SECONDS if reads else 0)
        while True:
            out = shell.run(command)
            if not expected or _tokens(out) == _tokens("\n".join(expected)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the meter has not read every request yet
        if expected:
            assert _tokens(out) == _tokens("\n".join(expected)), f"$ {command}\n{out}"
    assert set(prices) >= {"input", "output"}, "the walkthrough prices the demo model"
    _the_cost_is_tokens_times_prices(shell, prices)


def _the_cost_is_tokens_times_prices(shell: Shell, prices: dict[str, int]) -> None:
    """What the tables showed, from the JSON: each cost exactly tokens x price per 1M, rounded
    once, the price from this month's start (the --from before the requests)."""
    cached_price = prices.get("cached", prices["input"])
    (row,) = _json(shell, "tessera usage --tenant demo -o json")["rows"]
    prompt, completion, cached = (
        int(row[f]) for f in ("prompt_tokens", "completion_tokens", "cached_tokens")
    )
    picos = (prompt - cached) * prices["input"] + cached * cached_price + completion * prices["output"]
    micros = (picos + 500_000) // 1_000_000
    assert (int(row["requests"]), int(row["unpriced_requests"]), row["currency"]) == (4, 0, "USD")
    assert prompt > 0
    assert completion > 0
    assert int(row["cost_micros"]) == micros
    invoice = _json(shell, "tessera invoices preview --tenant demo -o json")["invoice"]
    (line,) = invoice["lines"]
    now = datetime.now(UTC)
    assert (line["kind"], line["price_from"]) == ("usage", now.strftime("%Y-%m-01T00:00:00Z"))
    assert int(line["amount_micros"]) == int(invoice["total_micros"]) == micros


def _json(shell: Shell, command: str) -> Any:
    return json.loads(shell.run(command))
