"""Every `imagepipe ...` command the README shows names a command and flags the CLI really has: the
synopsis, the examples in code blocks and in `backticks` are checked against the CLI's own parser."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from imagepipe_cli.cli import build_parser

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    """The README's command lines that start `imagepipe <word>` (in code blocks, or inline code)."""
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S):
        command = None  # a synopsis goes on over indented lines of [options]
        for line in block.splitlines():
            if re.match(r"\s*(\S*/)?imagepipe [a-z-]", line):
                command = line.strip()
                found.append(command)
            elif command is not None and line.startswith(" ") and line.strip().startswith("["):
                found[-1] = command = f"{command} {line.strip()}"
            else:
                command = None
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    found += [
        span for span in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(\S*/)?imagepipe [a-z-]", span)
    ]
    return found


def _subcommands(
    parser: argparse.ArgumentParser, required: bool = True
) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions and not required:
        return {}
    (action,) = actions
    return dict(action.choices)


COMMANDS = _commands()
PARSERS = _subcommands(build_parser())


def test_the_readme_shows_commands_of_every_kind():
    assert len(COMMANDS) > 10
    assert {"run", "up", "submit", "status", "results"} <= {c.split()[1] for c in COMMANDS}


@pytest.mark.parametrize("line", COMMANDS)
def test_each_command_and_flag_in_the_readme_exists(line: str):
    # `imagepipe cancel JOB | retry JOB`: each alternative is a command of its own
    words = shlex.split(line.replace("|", " | ").replace("…", ""), comments=True)
    words = words[words.index(next(w for w in words if w.endswith("imagepipe"))) + 1 :]
    pieces, current = [], []
    for word in words:
        if word == "|":
            pieces.append(current)
            current = []
        else:
            current.append(word)
    pieces.append(current)
    first = True
    for piece in pieces:
        name = piece[0]
        if not first and name not in PARSERS:
            continue  # "| retry JOB" continues the synopsis; anything else after a pipe is a shell pipe
        first = False
        assert name in PARSERS, f"README shows `imagepipe {name}`, which is not a command: {line}"
        parser, rest = PARSERS[name], piece[1:]
        while rest and rest[0] in _subcommands(parser, required=False):  # `imagepipe keys set ...`
            parser, rest = _subcommands(parser)[rest[0]], rest[1:]
        options = set(parser._option_string_actions)
        for word in rest:
            flag = re.match(r"\[?(--[a-z][a-z0-9-]*)", word)
            if flag:
                assert flag.group(1) in options, (
                    f"README shows {flag.group(1)} for `imagepipe {name}`: {line}"
                )
