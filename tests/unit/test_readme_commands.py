"""Every `imagepipe ...` command README.md and docs/*.md show names a command and flags the CLI really has:
the synopsis, the examples in code blocks and in `backticks` are checked against the CLI's own parser. And
docs/configuration.md lists exactly the template's parameters."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest
import yaml

from imagepipe_cli.cli import build_parser

from conftest import ROOT, TEMPLATE

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> list[str]:
    """The documents' command lines that start `imagepipe <word>` (in code blocks, or inline code)."""
    found: list[str] = []
    for doc in DOCS:
        found += [f"{doc.name}: {line}" for line in _commands_in(doc.read_text())]
    return found


def _commands_in(text: str) -> list[str]:
    found: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        command = None  # a synopsis goes on over indented lines of [options]
        for line in block.splitlines():
            if re.match(r"\s*(\S*/)?imagepipe [a-z-]", line):
                command = line.strip()
                found.append(command)
            elif command is not None and line.startswith(" ") and line.strip().startswith("["):
                found[-1] = command = f"{command} {line.strip()}"
            else:
                command = None
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
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
    readme = [c.split(": ", 1)[1] for c in COMMANDS if c.startswith("README.md: ")]
    assert len(readme) > 10
    shown = {c.split("imagepipe ", 1)[1].split()[0] for c in readme}
    assert {"run", "up", "submit", "status", "results", "keys", "destroy"} <= shown


def _template_parameters() -> set[str]:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !Ref, !Sub, ...
    return set(yaml.load(TEMPLATE.read_text(), Loader=Loader)["Parameters"])


def test_the_configuration_doc_lists_every_template_parameter_and_no_other():
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Za-z0-9]+)`", row.split("|")[1])}
    parameters = _template_parameters()
    assert parameters - documented == set(), "template parameters missing from docs/configuration.md"
    assert documented - parameters == set(), "docs/configuration.md names parameters the template lacks"


@pytest.mark.parametrize("line", COMMANDS)
def test_each_command_and_flag_in_the_docs_exists(line: str):
    # `imagepipe cancel JOB | retry JOB`: each alternative is a command of its own
    line = line.split(": ", 1)[1]
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


def _anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_link_between_the_docs_leads_somewhere_in_the_repository(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists() and ROOT in linked.parents, f"{doc.name} links to {target}, which is not here"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{doc.name} links to {target}: no such heading"


# What the documents once named that a reader of the repository cannot open.
OUTSIDE = re.compile(r"\bthe brief\b|(?<![\w/-])providers\.md|\bshared/|\bissue \d+|\bnext issue\b", re.I)


def _prose(text: str) -> str:
    """The document without what programs print: code blocks and the table `make bench` wrote."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"^`make bench` on .*?\n\n\|.*?\n\n", "", text, flags=re.S | re.M)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_the_docs_name_nothing_outside_the_repository(doc):
    assert OUTSIDE.findall(_prose(doc.read_text())) == []
