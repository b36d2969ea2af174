"""The scripts where torch's compile cache folder cannot be made: TORCHINDUCTOR_CACHE_DIR
under a file, on a read-only mount, or in a folder of another user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_an_unusable_compile_cache_folder_is_one_line(tmp_path: Path) -> None:
    """transformers imports torch._dynamo, which makes inductor's cache folder on import:
    every script, even with --compile False, ended in a traceback before reading a flag."""
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "inductor"  # cannot be created: its parent is a file
    environment = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--prompt", "x", "--compile", "False"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    (line,) = completed.stderr.splitlines()
    assert line.startswith("generate.py: error: torch's compile cache folder cannot be created")
    assert str(cache) in line and "TORCHINDUCTOR_CACHE_DIR" in line
    assert not list(tmp_path.glob("logs"))
