"""layer_report.py and train_adapter.py run as one process. Under torchrun with two
processes, each took the output folder's lock: the second said the folder was "in use by
another run" (misleading), torchrun killed the first, and nothing was written. They now say
at once, as generate.py and eval.py do, that they run as one process."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from arguments import EXIT_ERROR, run_main


def _run(script: str, argv: list[object], monkeypatch, capsys) -> tuple[int, str]:
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, prog=f"{script}.py")
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("script", ["layer_report", "train_adapter"])
def test_one_process_script_refuses_several_torchrun_processes(
    script: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    data = tmp_path / "a.py"
    data.write_text("def add(a, b):\n    return a + b\n" * 50)
    out = tmp_path / "out"
    argv = ["--model", tiny_model_dir, "--data", data, "--output_dir", out]
    if script == "train_adapter":
        argv += ["--exit_layer", "1"]
    code, stderr = _run(script, argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"{script}.py: error: {script}.py runs as one process: use python or torchrun "
        "--nproc_per_node 1"
    )
    assert not out.exists()
