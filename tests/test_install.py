"""First contact: the package installs, and a mistyped model path fails at once."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from self_speculation import DEFAULT_MODEL
from self_speculation.errors import ModelLoadError
from self_speculation.loading import check_model_source, load_model_and_tokenizer

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_model_resolves_inside_the_checkout() -> None:
    assert Path(DEFAULT_MODEL) == REPOSITORY_ROOT / "models" / "layerskip-stdlib"
    assert (Path(DEFAULT_MODEL) / "config.json").is_file()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("models/layerskip-stdlb", "did you mean models/layerskip-stdlib"),  # a typo
        ("./foo", "model directory not found: ./foo"),
        ("foo/bar/baz", "model directory not found"),  # too many parts for a hub id
        ("bad..name", "model directory not found"),  # not a valid hub id
        ("README.md", "is a file, not a model directory"),
        ("someone/some-model", "HF_HUB_OFFLINE is set"),  # a hub id, offline, not cached
    ],
)
def test_a_model_that_cannot_be_found_fails_at_once(
    name: str, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPOSITORY_ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    # Failing at once means never reaching for the network (no hub retries).
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ModelLoadError, match=fragment.replace(".", r"\.")):
        load_model_and_tokenizer(name, device="cpu")


def test_an_existing_directory_passes_the_source_check() -> None:
    check_model_source(DEFAULT_MODEL)
    check_model_source(str(REPOSITORY_ROOT / "models"))  # loading decides what is inside


def test_wheel_holds_the_package_and_imports_from_anywhere(tmp_path: Path) -> None:
    """``pip install .`` builds this wheel: the package and its subpackages, not the
    repository's scripts or tests; installed alone, it imports from any directory."""
    source = tmp_path / "source"  # building writes build/ and *.egg-info beside the sources
    shutil.copytree(
        REPOSITORY_ROOT / "self_speculation",
        source / "self_speculation",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY_ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if build.returncode != 0 and "No module named" in build.stderr + build.stdout:
        pytest.skip(f"cannot build offline without setuptools: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("layerskip-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    tops = {name.split("/")[0] for name in names if not name.startswith("layerskip-")}
    assert tops == {"self_speculation"}, tops
    assert "self_speculation/training/__init__.py" in names
    check = subprocess.run(
        [sys.executable, "-c", "import self_speculation, sys; print(self_speculation.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(tmp_path / "site"))
