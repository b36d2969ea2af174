"""The GPU check's exit status and its device errors, on a CPU.

``benchmarks/gpu_check.py`` exits 1 when a part it ran fails or the GPU tests do not finish
(its docstring): the parts list of its document was the list of an earlier run's parts it
keeps, so this run's parts counted as kept ones and every check exited 0. ``--device cuda``
where torch sees no CUDA device passed the GPU tests by skipping them all; engine.py built a
random model and failed with a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from self_speculation import ConfigError

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def _fake_run(outcomes: dict[str, tuple[int | None, bool]]):
    """A stand-in for ``run_part``: (returncode, timed_out) per part key (default: ok)."""

    def run(part, seconds, log):
        returncode, timed_out = outcomes.get(part.key, (0, False))
        if part.output is not None:
            Path(part.output).write_text(json.dumps({"label": part.key}))
        return {
            "key": part.key,
            "name": part.name,
            "returncode": returncode,
            "timed_out": timed_out,
            "seconds": 1.0,
            "last_line": "done",
        }

    return run


@pytest.mark.parametrize(
    ("outcomes", "status"),
    [
        ({}, 0),
        ({"shipped": (2, False)}, 1),  # an engine part that exited non-zero
        ({"tests": (1, False)}, 1),  # a GPU test failed
        ({"tests": (None, True)}, 1),  # the GPU tests did not finish
        ({"big": (None, True)}, 0),  # an engine part stopped by the clock: partial
    ],
)
def test_the_exit_status_follows_the_parts(
    outcomes: dict, status: int, gpu_check, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(gpu_check, "run_part", _fake_run(outcomes))
    monkeypatch.setattr(gpu_check, "markdown_table", lambda document: "")
    assert gpu_check.main(["--device", "cpu", "--output_dir", str(tmp_path)]) == status


def test_a_rerun_is_judged_by_the_parts_it_ran(gpu_check, monkeypatch, tmp_path: Path) -> None:
    """``--parts big`` after a run whose engine part failed: the kept failure is the earlier
    run's; the rerun's own failure counts."""
    folder = ["--device", "cpu", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(gpu_check, "markdown_table", lambda document: "")
    monkeypatch.setattr(gpu_check, "run_part", _fake_run({"shipped": (2, False)}))
    assert gpu_check.main(folder) == 1
    monkeypatch.setattr(gpu_check, "run_part", _fake_run({}))
    assert gpu_check.main([*folder, "--parts", "big"]) == 0
    monkeypatch.setattr(gpu_check, "run_part", _fake_run({"big": (1, False)}))
    assert gpu_check.main([*folder, "--parts", "big"]) == 1
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [part["name"] for part in document["parts"]] == [
        "gpu tests",
        "engine layerskip-stdlib",
        "engine random-llama-tiny",
    ]


@NO_CUDA
def test_the_cuda_check_without_cuda_is_one_line(tmp_path: Path) -> None:
    """The default ``--device cuda`` on a machine where torch sees no GPU: one line, exit
    status 2, no part run (the GPU tests all skipped read as passed)."""
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--output_dir", str(tmp_path / "out")],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--device cuda" in result.stderr and "no CUDA device" in result.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@NO_CUDA
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "cuda:abc"], "unknown device 'cuda:abc'"),
        (["--dtype", "bf16"], "--dtype must be one of"),
    ],
)
def test_engine_refuses_a_bad_device_or_dtype_before_building_a_random_model(
    flags: list[str], message: str, monkeypatch, tmp_path: Path
) -> None:
    """A random model was built (on the CPU: minutes at the 1B shape) and then failed with
    a traceback: ``Torch not compiled with CUDA enabled``, an invalid device string, ``module
    'torch' has no attribute 'bf16'``."""
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "benchmarks"))
    import engine

    monkeypatch.setattr(engine, "random_llama", lambda *args: pytest.fail("model built"))
    argv = ["--model", "random-llama-tiny", "--output", str(tmp_path / "engine.json"), *flags]
    with pytest.raises(ConfigError, match=message):
        engine.main(argv)
