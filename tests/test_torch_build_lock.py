"""The few-row kernel's build lock on torch 2.14 and newer, whose extension build holds a
``filelock`` lock on ``<build directory>/lock`` and keeps the file after every build
(torch <= 2.13 removed it, and a killed build's blocked every later one). cpu_kernels took
the kept file for a killed build's: every ``--compile`` process after the first warned
"removed a build lock ... left by an interrupted build"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from self_speculation.cpu_kernels import build_guard

ROOT = Path(__file__).resolve().parent.parent

# torch 2.14's build as far as the lock goes: the file is made and kept; the op is defined
# in Python (no compiler run) so that load_few_row_kernel goes on as after a real build.
_TORCH_2_14_BUILD = """
import logging, sys
from pathlib import Path
import torch
from torch.utils import cpp_extension
from self_speculation import cpu_kernels

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
if hasattr(cpp_extension, "FileBaton"):
    del cpp_extension.FileBaton  # torch 2.14 builds under a filelock lock instead

def load(name, **kwargs):
    (Path(cpp_extension._get_build_directory(name, False)) / "lock").touch()
    library = torch.library.Library("layerskip", "DEF")
    library.define("few_row_linear(Tensor x, Tensor w) -> Tensor")
    library.impl("few_row_linear", lambda x, w: x @ w.T, "CPU")
    cpu_kernels._library = library

cpp_extension.load = load
print(cpu_kernels.load_few_row_kernel())
"""


def _run(code: str, extensions: Path | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if extensions is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )


def test_a_kept_lock_file_of_a_torch_that_keeps_it_is_no_interrupted_build(
    tmp_path: Path,
) -> None:
    """Any torch (2.14's lock emulated): the second process's load says nothing."""
    for _ in range(2):
        result = _run(_TORCH_2_14_BUILD, tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == "True", result.stderr[-2000:]
        assert "interrupted build" not in result.stderr, result.stderr[-2000:]


def test_a_lock_file_that_blocks_nothing_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """torch 2.14's kept lock file: neither removed (with the flock) nor waited for (where
    no flock can be had: clear_stale_lock waited STALE_LOCK_SECONDS for a fresh file)."""
    from self_speculation import cpu_kernels

    build = tmp_path / "layerskip_few_row_linear_x"
    build.mkdir()
    (build / "lock").touch()
    with build_guard(build, lock_blocks=False):
        pass
    assert (build / "lock").exists()
    assert "interrupted build" not in caplog.text

    def no_waiting(seconds: float) -> None:
        raise AssertionError("waited on a lock file that blocks nothing")

    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith("layerskip-build.flock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels.time, "sleep", no_waiting)
    monkeypatch.setattr(os, "open", refusing_open)
    with build_guard(build, lock_blocks=False):
        pass
    assert (build / "lock").exists()
