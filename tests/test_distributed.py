"""Sharding across torchrun ranks; one process needs no torchrun environment."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from self_speculation import ConfigError
from self_speculation import distributed as dist

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def test_single_process_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = dist.setup()
    assert (context.rank, context.world_size, context.is_main, context.initialized) == (
        0,
        1,
        True,
        False,
    )
    assert dist.gather({"a": 1}, context) == [{"a": 1}]
    assert dist.broadcast("x", context) == "x"
    assert dist.shard([0, 1, 2], context) == [0, 1, 2]
    with pytest.raises(ConfigError, match="needs torchrun"):
        dist.setup(requested=True)


def test_refuses_several_processes_when_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--distributed False"):
        dist.setup(requested=False)


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' must be an integer >= 0"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be an integer >= 1"),
        ({"RANK": "0", "WORLD_SIZE": "x"}, "WORLD_SIZE='x' must be an integer >= 1"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be an"),
        # no other process has this rank: the rendezvous would wait for two hours
        ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 must be below WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 must be below"),
        # env:// needs both; init_process_group raised a ValueError traceback
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not set"),
    ],
)
def test_torchrun_variables_are_checked_before_joining(
    environment: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hand-set (or inherited) torchrun variables: one ConfigError, never a traceback from
    the process group or a rendezvous that cannot complete."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        dist.setup()
    assert not torch.distributed.is_initialized()


def test_shards_cover_every_item_once() -> None:
    items = list(range(7))
    shards = [dist.shard(items, dist.DistributedContext(rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == items


def _rows(output: Path) -> list[dict]:
    (samples,) = output.glob("benchmark_*.samples.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", script, *args],
        capture_output=True, text=True, env=env, cwd=REPOSITORY_ROOT, timeout=300,
    )  # fmt: skip


@needs_torchrun
def test_a_prompt_too_long_in_another_ranks_share_stops_every_rank_first(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Every prompt is checked before the samples are sharded: rank 0 does not generate its
    share (and leave its rows file) while rank 1 refuses the run."""
    data = tmp_path / "prompts.jsonl"
    prompts = ["def add(a, b):", "The quick", "def sub(a, b):", "word " * 400]
    data.write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in prompts))
    output = tmp_path / "out"
    result = _torchrun(
        str(REPOSITORY_ROOT / "benchmark.py"),
        *("--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(data)),
        *("--random_shuffle", "False", "--max_steps", "4", "--sample", "False"),
        *("--output_dir", str(output)),
    )
    assert result.returncode != 0
    assert "sample 3 (row 4 of the data): the prompt has" in result.stderr
    assert not output.exists() or not list(output.iterdir())


@needs_torchrun
def test_a_resumed_sweep_measures_what_the_main_process_has_not(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The main process's CSV decides which grid points are left, on every rank: a rank
    on another machine, which sees no CSV (here: a rank 1 told the CSV is empty), measures
    the same points, and the rows are the ones a single process writes. A run with
    another number of processes measures again."""
    data = tmp_path / "prompts.jsonl"
    prompts = ["def add(a, b):", "The quick brown fox", "def sub(a, b):"]
    data.write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in prompts))
    common = [
        *("--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(data)),
        *("--max_steps", "6", "--sample", "False", "--compile", "False"),
        *("--exit_layer_first", "1", "--num_speculations_first", "2"),
        *("--num_speculations_last", "2", "--output_dir", str(tmp_path)),
    ]
    first = _torchrun(str(REPOSITORY_ROOT / "sweep.py"), *common, "--exit_layer_last", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    wrapper = tmp_path / "rank1_sees_no_csv.py"
    wrapper.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPOSITORY_ROOT)!r})\n"
        "import sweep\n"
        "from arguments import run_main\n"
        "if os.environ['RANK'] == '1':\n"
        "    finished = sweep._finished\n"
        "    sweep._finished = lambda *args, **kwargs: finished(*args, **kwargs).iloc[0:0]\n"
        "run_main(sweep.main, prog='sweep.py')\n"
    )
    resumed = _torchrun(str(wrapper), *common, "--exit_layer_last", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    alone = subprocess.run(
        [sys.executable, str(REPOSITORY_ROOT / "sweep.py"), *common, "--exit_layer_last", "2",
         "--output_dir", str(tmp_path / "alone")],
        capture_output=True, text=True, cwd=REPOSITORY_ROOT, timeout=300,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]

    def measured(csv_path: Path) -> list[tuple]:
        lines = csv_path.read_text().splitlines()
        header = lines[0].split(",")
        fields = ("generation_strategy", "exit_layer", "num_speculations", "acceptance_rate")
        rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
        return [tuple(row[field] for field in fields) for row in rows]

    assert measured(tmp_path / "sweep.csv") == measured(tmp_path / "alone" / "sweep.csv")

    # A plain run does not reuse the two-process rows: each process timed half the samples.
    plain = subprocess.run(
        [sys.executable, str(REPOSITORY_ROOT / "sweep.py"), *common, "--exit_layer_last", "1"],
        capture_output=True, text=True, cwd=REPOSITORY_ROOT, timeout=300,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    rows = measured(tmp_path / "sweep.csv")
    assert [row[:3] for row in rows[3:]] == [
        ("autoregressive", "4", "0"),
        ("self_speculative", "1", "2"),
    ]


@needs_torchrun
def test_torchrun_two_processes_match_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    prompts = ["def add(a, b):", "The quick brown fox", "def sub(a, b):", "over the lazy dog"]
    data.write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in prompts))
    common = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(data),
        "--generation_strategy", "autoregressive,self_speculative", "--exit_layer", "2",
        "--num_speculations", "2", "--sample", "True", "--temperature", "1.0", "--max_steps", "8",
    ]  # fmt: skip
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    script = str(REPOSITORY_ROOT / "benchmark.py")
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", script, *common, "--output_dir", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, cwd=REPOSITORY_ROOT, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, script, *common, "--output_dir", str(tmp_path / "one")],
        capture_output=True, text=True, env=env, cwd=REPOSITORY_ROOT, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    def key(row: dict) -> tuple:
        return row["index"], row["generation_strategy"], tuple(row["token_ids"]), row["prediction"]

    two_rows, one_rows = _rows(tmp_path / "two"), _rows(tmp_path / "one")
    assert len(two_rows) == len(one_rows) == 8
    assert [key(row) for row in two_rows] == [key(row) for row in one_rows]
    assert not list((tmp_path / "two").glob("*.rank*.jsonl"))  # merged into one file
    (result,) = (tmp_path / "two").glob("benchmark_*.json")
    document = json.loads(result.read_text())
    assert document["environment"]["world_size"] == 2 and document["num_samples"] == 4
