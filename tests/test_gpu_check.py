"""benchmarks/gpu_check.sh runs every part on a CPU (so that it cannot rot before a GPU runs
it), and its CUDA plan passes engine.py only flags that engine.py has."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import simple_parsing

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("quick", [False, True])
def test_every_engine_flag_of_the_plan_exists(device: str, quick: bool, gpu_check) -> None:
    """engine.py refuses an unknown flag; the plan's flags all parse (the old script passed
    ``--memory False`` and stopped there), and the CUDA plan times batches 1, 8 and 32."""
    import engine

    args = gpu_check.CheckArguments(device=device, quick=quick)
    runs = gpu_check.engine_runs(args)
    for _, argv in runs:
        parsed = simple_parsing.parse(
            engine.EngineArguments,
            args=argv,
            add_option_string_dash_variants=False,
            allow_abbrev=False,
        )
        assert parsed.device == device
    if device == "cuda":
        (_, big), _ = runs
        big_args = simple_parsing.parse(engine.EngineArguments, args=big)
        assert big_args.model == "random-llama-1b" and big_args.dtype == "bfloat16"
        assert big_args.batch_sizes == [1, 8] and big_args.batch_paths == ["eager", "fast"]
        assert args.budget <= 480  # 8 minutes on one GPU, every part included


def test_gpu_check_runs_every_part_on_cpu(tmp_path: Path) -> None:
    """The whole check at tiny sizes (compiled paths traced, not built): one JSON, one
    markdown table, both engine runs with their paths, batches and weight floor."""
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick", "True"]
        + ["--output_dir", str(tmp_path)],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"device", "compile_backend", "environment", "parts", "engine"} <= document.keys()
    assert [part["name"] for part in document["parts"]] == [
        "gpu tests",
        "engine random-llama-tiny",
        "engine layerskip-stdlib",
    ]
    assert all(part["returncode"] == 0 and not part["timed_out"] for part in document["parts"])
    tiny, shipped = document["engine"]["random-llama-tiny"], document["engine"]["layerskip-stdlib"]
    for engine in (tiny, shipped):
        assert engine["floor_ms_per_token"] > 0
        assert len(engine["bandwidth_measurements_bytes_per_second"]) >= 2
        assert all(path["identical_to_first_path"] for path in engine["paths"])
    assert {path["name"] for path in tiny["paths"]} == {
        "ours eager autoregressive",
        "ours eager self_speculative",
        "ours fast autoregressive",
        "ours fast self_speculative",
        "transformers generate (dynamic cache)",
        "transformers generate (static cache + compile)",
        "transformers assistant_early_exit=2",
    }
    assert {(row["batch_size"], row["decoding"], row["path"]) for row in tiny["batch"]} == {
        (size, decoding, strategy)
        for size in (1, 2)
        for decoding in ("eager", "fast")
        for strategy in ("autoregressive", "self_speculative")
    }
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## random-llama-tiny" in table and "## layerskip-stdlib" in table
    assert "| ours fast self_speculative |" in table and "| 2 | fast | self_speculative |" in table
