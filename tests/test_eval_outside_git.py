"""eval.py run outside a git checkout prints nothing of lm-eval's commit probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_cli_scripts import OFFLINE_ENV, REPOSITORY_ROOT


def test_eval_outside_a_checkout_prints_no_git_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    # git looks no higher than tmp_path, so work is outside any checkout wherever tmp is.
    env.update(OFFLINE_ENV, GIT_CEILING_DIRECTORIES=str(tmp_path))
    process = subprocess.run(
        [
            sys.executable, str(REPOSITORY_ROOT / "eval.py"), "--model", str(tiny_model_dir),
            "--tasks", "layerskip_mc", "--limit", "2", "--output_dir", "out",
        ],
        capture_output=True, text=True, env=env, cwd=work, timeout=240,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "fatal" not in process.stderr and "not a git repository" not in process.stderr
    (result,) = (work / "out").glob("eval_*.json")
    assert "layerskip_mc" in json.loads(result.read_text())["results"]
