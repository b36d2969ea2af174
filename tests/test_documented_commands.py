"""The commands documented outside README.md and docs/*.md's shell blocks parse as written.

tests/test_readme.py checks the shell blocks of README.md and docs/*.md. The same promise
holds for the other places a user copies a command from: the scripts' own docstrings (their
usage examples), the model cards' shell blocks, DOCKER.md's commands run inside the image,
and commands quoted inline (in backticks) in any of these pages. Each must name a script of
this checkout and pass that script's parser and validation; nothing after parsing runs.
"""

from __future__ import annotations

import ast
import re
import shlex
import sysconfig
from pathlib import Path

import pytest
import torch
from test_readme import (  # noqa: F401 - fresh_clone is a fixture used by name
    REPOSITORY_ROOT,
    check_parses,
    fenced_blocks,
    fresh_clone,
    script_and_arguments,
    shell_commands,
)

STDLIB = sysconfig.get_paths()["stdlib"]
SCRIPTS = sorted(
    path.relative_to(REPOSITORY_ROOT).as_posix()
    for path in [*REPOSITORY_ROOT.glob("*.py"), *REPOSITORY_ROOT.glob("benchmarks/*.py")]
)
MODEL_CARDS = sorted(REPOSITORY_ROOT.glob("models/*/MODEL_CARD.md"))
PAGES = [
    REPOSITORY_ROOT / "README.md",
    REPOSITORY_ROOT / "DOCKER.md",
    *sorted((REPOSITORY_ROOT / "docs").glob("*.md")),
    *MODEL_CARDS,
]


def check_command(command: str, where: str) -> None:
    """``command`` (one line, ``$S`` the standard library, ``M`` a model) parses as written.
    Only what this machine lacks may fail: CUDA, or a file an earlier documented run writes
    under logs/ or runs/."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"\w+=\S*", words[0]):  # MAX_TOKENS=... bash ...
        words = words[1:]
    words = [
        "models/layerskip-stdlib" if word == "M" else word.replace("$S", STDLIB) for word in words
    ]
    if words[0] == "bash":
        assert (REPOSITORY_ROOT / words[1]).is_file(), f"{where}: {command}"
        return
    target = script_and_arguments(words)
    assert target is not None, f"{where}: a command this test does not know: {command}"
    try:
        check_parses(*target)
    except pytest.fail.Exception as failure:
        message = str(failure)
        if "CUDA is not available" in message and not torch.cuda.is_available():
            return
        if re.search(r"no such file: (logs|runs)/", message):
            return
        raise AssertionError(f"{where}: {message}") from None


def docstring_commands(script: str) -> list[str]:
    """The ``python ...`` / ``torchrun ...`` lines of ``script``'s module docstring, with
    continuation lines (a backslash, or deeper indentation) joined."""
    docstring = ast.get_docstring(ast.parse((REPOSITORY_ROOT / script).read_text())) or ""
    joined = re.sub(r"\\\n\s*", " ", docstring)
    commands = []
    for block in re.split(r"\n(?! {5,})", joined):  # a line indented past 4 continues one
        line = " ".join(block.split())
        if re.match(r"(python|torchrun) ", line) and "..." not in line:
            commands.append(line)
    return commands


@pytest.mark.usefixtures("fresh_clone")
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_docstring_example_parses(script: str) -> None:
    for command in docstring_commands(script):
        check_command(command, f"{script}'s docstring")


def test_the_docstring_reader_finds_the_examples() -> None:
    commands = docstring_commands("train_adapter.py")
    assert len(commands) == 1 and "--output_dir" in commands[0]
    assert any("--exit_layer 4" in command for command in docstring_commands("correctness.py"))


@pytest.mark.usefixtures("fresh_clone")
@pytest.mark.parametrize("card", MODEL_CARDS, ids=lambda card: card.parent.name)
def test_every_model_card_command_parses(card: Path) -> None:
    commands = [
        command
        for block in fenced_blocks(card.read_text(), "bash")
        for command in shell_commands(block)
        if not command.startswith("S=$(")
    ]
    assert commands
    for command in commands:
        check_command(command, card.parent.name)


@pytest.mark.usefixtures("fresh_clone")
def test_docker_md_commands_parse_inside_the_image() -> None:
    checked = 0
    for block in fenced_blocks((REPOSITORY_ROOT / "DOCKER.md").read_text(), "bash"):
        for command in shell_commands(block):
            start = command.find(" python ")
            if command.startswith("docker run") and start >= 0 and " -m pytest" not in command:
                check_command(command[start + 1 :], "DOCKER.md")
                checked += 1
    assert checked >= 3


@pytest.mark.usefixtures("fresh_clone")
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.parent.name + "/" + page.name)
def test_inline_commands_parse(page: Path) -> None:
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    for match in re.finditer(r"`((?:python|torchrun) [^`]+)`", prose):
        command = " ".join(match.group(1).split())
        if "..." in command or "SCRIPT.py" in command or re.search(r"\bN$", command):
            continue  # a pattern, not a command
        check_command(command, page.name)


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives ``page``'s headings: lower case, punctuation but hyphens
    dropped, spaces as hyphens; a repeated heading gets -1, -2 ..."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    anchors: set[str] = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", prose, re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        repeat = 0
        while (anchor if not repeat else f"{anchor}-{repeat}") in anchors:
            repeat += 1
        anchors.add(anchor if not repeat else f"{anchor}-{repeat}")
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.parent.name + "/" + page.name)
def test_links_and_their_anchors_resolve(page: Path) -> None:
    """Every relative link of the page (README, DOCKER.md, docs, model cards) names a file of
    the checkout, and a ``#anchor`` a heading of the page it points at."""
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"\w+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{page.name} links to {target}"
    unlinked = re.sub(r"\]\([^)\s]+\)", "]", page.read_text())
    for target in re.findall(r"((?:docs/)?[\w-]+\.md)#([\w-]+)", unlinked):
        name, anchor = target  # a link written in a shell comment, as README's
        candidates = [REPOSITORY_ROOT / name, REPOSITORY_ROOT / "docs" / name]
        linked = next((path for path in candidates if path.exists()), None)
        assert linked is not None, f"{page.name} names {name}#{anchor}"
        assert anchor in heading_anchors(linked), f"{page.name} names {name}#{anchor}"
