"""Every command of README.md runs as written on a fresh clone.

The README's shell blocks are read as a user would paste them. Each ``python SCRIPT.py ...``
(or ``torchrun ... SCRIPT.py ...``) line must name a script of this checkout and pass that
script's own argument parser, dataclass validation included, so a renamed or mistyped flag
fails here; nothing after the parser runs. The set-up and test commands must be the ones
``.ci/run`` runs. The main command and the Python block run for real on the shipped model.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
README = REPOSITORY_ROOT / "README.md"
CI_RUN = REPOSITORY_ROOT / ".ci" / "run"
MAX_README_LINES = 300

SET_UP = [
    "python3 -m venv .venv",
    ". .venv/bin/activate",
]
TEST_COMMAND = "python -m pytest -q -n 2 --dist loadfile tests"
MAIN_COMMAND_PREFIX = 'python generate.py --prompt "def fibonacci(n):"'


def fenced_blocks(text: str, language: str) -> list[str]:
    """The bodies of the ```language fenced blocks of ``text``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def shell_commands(block: str) -> list[str]:
    """One shell block's commands: continuation lines joined, comments and blank lines
    dropped, ``a && b`` split into ``a`` and ``b``."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        if not shlex.split(line, comments=True):
            continue  # blank or a comment
        # No README command has "&&" inside quotes, so a plain split is enough.
        commands += [part.strip() for part in line.split(" && ")]
    return commands


def readme_commands() -> list[str]:
    return [
        command
        for block in fenced_blocks(README.read_text(), "bash")
        for command in shell_commands(block)
    ]


def expand_variables(words: list[str], variables: dict[str, str]) -> list[str]:
    """``$NAME`` / ``${NAME}`` replaced by the README's own assignments (``S=$(...)``)."""
    pattern = re.compile(r"\$\{?(\w+)\}?")

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in variables, f"README uses ${name} before assigning it"
        return variables[name]

    return [pattern.sub(value, word) for word in words]


def shell_assignment(command: str) -> tuple[str, str] | None:
    """``NAME=$(python -c "CODE")`` as (NAME, what CODE prints), else None."""
    match = re.fullmatch(r"(\w+)=\$\(python -c (.+)\)", command)
    if match is None:
        return None
    (code,) = shlex.split(match.group(2))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "<README python -c>", "exec"), {})
    return match.group(1), printed.getvalue().strip()


def script_and_arguments(words: list[str]) -> tuple[str, list[str]] | None:
    """(script path, its arguments) of ``python X.py ...`` or ``torchrun [flags] X.py ...``."""
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    if words[0] == "torchrun":
        for position, word in enumerate(words[1:], start=1):
            if word.endswith(".py"):
                return word, words[position + 1 :]
    return None


class Parsed(BaseException):  # noqa: N818 - a signal, not an error; escapes `except Exception`
    """Raised by the patched parser once a script's command line is parsed and validated."""


@contextlib.contextmanager
def stop_after_parsing() -> Iterator[None]:
    """Every argparse-based parser raises :class:`Parsed` after its outermost parse_args."""
    original = argparse.ArgumentParser.parse_args
    depth = 0

    def parse_args(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        nonlocal depth
        depth += 1
        try:
            namespace = original(self, *args, **kwargs)
        finally:
            depth -= 1
        if depth == 0:
            raise Parsed(namespace)
        return namespace

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


_MODULES: dict[str, ModuleType] = {}


def load_script(path: str) -> ModuleType:
    """The script at ``path`` (relative to the repository root) imported as a module."""
    if path not in _MODULES:
        file = REPOSITORY_ROOT / path
        name = "readme_" + re.sub(r"\W", "_", path.removesuffix(".py"))
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        sys.path.insert(0, str(file.parent))  # benchmarks/ scripts import their neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(file.parent))
        _MODULES[path] = module
    return _MODULES[path]


def check_parses(script: str, arguments: list[str]) -> None:
    """Fail unless ``script``'s main parses and validates ``arguments`` without an error."""
    assert (REPOSITORY_ROOT / script).is_file(), f"README names {script}, which does not exist"
    module = load_script(script)
    errors = io.StringIO()
    try:
        with stop_after_parsing(), contextlib.redirect_stderr(errors):
            status = module.main(arguments)
    except Parsed:
        return
    except SystemExit as stop:  # a plain argparse parser's error
        pytest.fail(f"{script} {shlex.join(arguments)}: exit {stop.code}: {errors.getvalue()}")
    except Exception as error:  # ArgumentsError / ConfigError from the dataclasses
        pytest.fail(f"{script} {shlex.join(arguments)}: {type(error).__name__}: {error}")
    pytest.fail(
        f"{script} {shlex.join(arguments)}: returned {status} before parsing finished:"
        f" {errors.getvalue()}"
    )


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_resolve() -> None:
    for text_file in [README, *sorted((REPOSITORY_ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text_file.read_text()):
            if re.match(r"\w+://", target):
                continue
            assert (text_file.parent / target).exists(), f"{text_file.name} links to {target}"


def test_setup_and_test_commands_are_what_ci_runs() -> None:
    commands = readme_commands()
    ci = CI_RUN.read_text()
    for command in SET_UP:
        assert command in commands, f"README's set-up lacks {command!r}"
    pip_commands = [command for command in commands if command.startswith("pip ")]
    assert pip_commands, "README has no pip command"
    ci_pip = [part.strip() for line in ci.splitlines() for part in line.split("&&")]
    ci_pip = [" ".join(w for w in part.split() if w != "-q") for part in ci_pip]
    for command in pip_commands:
        assert command in ci_pip, f"README's {command!r} is not what .ci/run installs"
    assert TEST_COMMAND in commands
    assert ci.rstrip().splitlines()[-1] == TEST_COMMAND, ".ci/run ends with another command"


def test_docs_setup_block_matches_readme() -> None:
    readme = fenced_blocks(README.read_text(), "bash")[0]
    scripts = fenced_blocks((REPOSITORY_ROOT / "docs" / "scripts.md").read_text(), "bash")[0]
    assert scripts == readme


@pytest.fixture()
def fresh_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that looks like a fresh clone: the repository's tracked top-level
    entries, linked, without the logs/ or runs/ an earlier run left (the scripts refuse to
    write over an earlier run's files, and some check --output_dir while parsing)."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for entry in REPOSITORY_ROOT.iterdir():
        if entry.name not in ("logs", "runs", "checkpoints", ".venv", ".git"):
            (clone / entry.name).symlink_to(entry)
    monkeypatch.chdir(clone)
    return clone


def check_page(page: Path) -> list[str]:
    """Check every command of ``page``'s shell blocks (in order, as a user pastes them);
    return the scripts they run. A file that an earlier command of the page writes
    (``--output F``) may be missing when a later one reads it."""
    variables: dict[str, str] = {}
    written: set[str] = set()
    checked = []
    for block in fenced_blocks(page.read_text(), "bash"):
        for command in shell_commands(block):
            assignment = shell_assignment(command)
            if assignment is not None:
                variables[assignment[0]] = assignment[1]
                continue
            words = expand_variables(shlex.split(command, comments=True), variables)
            if command in SET_UP or words[0] == "pip" or command == TEST_COMMAND:
                continue  # the README's are checked against .ci/run
            if words[0] == "bash":
                assert (REPOSITORY_ROOT / words[1]).is_file(), f"{page.name}: {command}"
                continue
            if words[:3] == ["python", "-m", "pytest"]:
                for path in (word for word in words[3:] if not word.startswith("-")):
                    assert (REPOSITORY_ROOT / path).exists(), f"{page.name}: {command}"
                continue
            target = script_and_arguments(words)
            assert target is not None, f"{page.name}: a command this test does not know: {command}"
            written.update(
                value
                for flag, value in zip(words, words[1:])
                if flag in ("--output", "--output_json")
            )
            try:
                check_parses(*target)
            except pytest.fail.Exception as failure:
                if not any(f"no such file: {path}" in str(failure) for path in written):
                    raise AssertionError(f"{page.name}: {failure}") from None
            checked.append(target[0])
    return checked


@pytest.mark.usefixtures("fresh_clone")
def test_every_readme_command_is_known_and_its_flags_parse() -> None:
    checked = check_page(README)
    for script in ("generate.py", "benchmark.py", "eval.py", "sweep.py", "correctness.py"):
        assert script in checked, f"README shows no example of {script}"
    for script in ("train.py", "train_adapter.py", "layer_report.py"):
        assert script in checked, f"README shows no example of {script}"


@pytest.mark.usefixtures("fresh_clone")
@pytest.mark.parametrize(
    "page", sorted((REPOSITORY_ROOT / "docs").glob("*.md")), ids=lambda page: page.name
)
def test_every_docs_command_is_known_and_its_flags_parse(page: Path) -> None:
    check_page(page)


@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        ("generate.py", ["--prompt", "x", "--max_step", "64"]),  # a prefix is not a flag
        ("generate.py", ["--prompt", "x", "--sample", "maybe"]),
        ("benchmark.py", ["--dataset", "human_eval", "--num_samples", "0"]),
        (
            "train.py",
            ["--preset", "tiny", "--data", "x.py", "--output_dir", "o", "--max_token", "9"],
        ),
        ("train_adapter.py", ["--exit_layer", "16", "--data", "x.py"]),  # no --output_dir
        ("benchmarks/engine.py", ["--batch_size", "8"]),  # --batch_sizes
    ],
)
def test_a_wrong_flag_fails_the_check(script: str, arguments: list[str]) -> None:
    with pytest.raises(pytest.fail.Exception):
        check_parses(script, arguments)


def test_a_right_command_passes_the_check() -> None:
    arguments = ["--preset", "tiny", "--data", "x.py", "--output_dir", "o", "--max_tokens", "9"]
    check_parses("train.py", arguments)


def test_the_main_command_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (main_command,) = [c for c in readme_commands() if c.startswith(MAIN_COMMAND_PREFIX)][:1]
    words = shlex.split(main_command)
    monkeypatch.chdir(tmp_path)  # its log lands in ./logs, here
    with pytest.raises(SystemExit) as stop:
        monkeypatch.setattr(sys, "argv", words[1:])
        load_script(words[1]).run_main(load_script(words[1]).main)
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip(), "the main command printed no answer"
    (log,) = (tmp_path / "logs").glob("generate_*.json")
    assert json.loads(log.read_text())


def test_the_python_block_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    (block,) = fenced_blocks(README.read_text(), "python")
    ast.parse(block)
    exec(compile(block, "<README python block>", "exec"), {})
    assert capsys.readouterr().out.strip()
