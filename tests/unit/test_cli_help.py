"""Every command, argument and option of `tessera` says what it is in `--help` (issue 17)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from tessera.cli import build_parser


def _parsers(
    parser: argparse.ArgumentParser, path: str = "tessera"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def _missing_help() -> list[str]:
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                described = {a.dest for a in action._choices_actions if (a.help or "").strip()}
                missing += [f"{path} {name} (command)" for name in action.choices if name not in described]
            elif not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_command_argument_and_option_has_help():
    assert _missing_help() == []


def test_the_walk_sees_every_admin_command_and_its_options():
    """The check above is only as good as its walk: it reaches the nested admin commands, their
    options and the global flags each command inherits."""
    seen = dict(_parsers(build_parser()))
    assert {"tessera models price", "tessera invoices preview", "tessera admin token", "tessera up"} <= set(
        seen
    )
    price = {o for a in seen["tessera models price"]._actions for o in a.option_strings}
    assert {
        "--input-price",
        "--output-price",
        "--cached-price",
        "--from",
        "--output",
        "-o",
        "--token",
    } <= price
    bare = argparse.ArgumentParser()
    bare.add_argument("--undocumented")
    assert [a.dest for a in bare._actions if not a.help] == ["undocumented"]
