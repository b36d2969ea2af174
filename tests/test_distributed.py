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


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")  # fmt: skip
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
