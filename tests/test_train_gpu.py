"""train.py on a GPU: bf16, FSDP2 on one device, activation checkpointing, resume.

``pytest -m gpu`` runs these where torch sees a CUDA device; elsewhere they are skipped. The
multi-process comparisons (FSDP2 / DDP == one process) are covered on CPU with gloo in
test_train_distributed.py; here the same code path runs with nccl and bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

COMMON = [
    "--preset",
    "small",
    "--vocab_size",
    "512",
    "--seq_len",
    "128",
    "--batch_size",
    "8",
    "--warmup_steps",
    "2",
    "--log_every",
    "1",
    "--save_every_minutes",
    "0",
    "--device",
    "cuda",
    "--layer_dropout_p_max",
    "0.2",
    "--max_tokens",
    str(8 * 8 * 128),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("corpus")
    for index in range(3):
        lines = [f"def f_{index}_{n}(x, y={n}):\n    return x * {n} + y\n" for n in range(400)]
        (directory / f"m{index}.py").write_text("".join(lines))
    return directory


def _run(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, str(ROOT / "train.py")]
        if processes == 1
        else [str(TORCHRUN), "--nproc_per_node", str(processes), str(ROOT / "train.py")]
    )
    return subprocess.run(
        [*launcher, *COMMON, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "flags",
    [
        [],  # bf16 autocast, one GPU
        ["--fsdp", "True"],  # FSDP2 on one GPU (a process group of one)
        ["--fsdp", "True", "--activation_checkpointing", "True"],
        ["--fsdp", "True", "--fsdp_cpu_offload", "True"],
    ],
)
def test_trains_on_one_gpu(flags: list[str], corpus: Path, tmp_path: Path) -> None:
    result = _run(*flags, "--data", f"{corpus}/*.py", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    records = _records(tmp_path)
    assert len(records) == 8
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["peak_memory_gib"] > 0
    assert json.loads((tmp_path / "train_summary.json").read_text())["device"].startswith("cuda")
    assert (tmp_path / "model.safetensors").is_file()


def test_fsdp_resume_on_gpu_reproduces_the_run(corpus: Path, tmp_path: Path) -> None:
    data = ["--data", f"{corpus}/*.py", "--fsdp", "True"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _run(*data, "--output_dir", str(whole)).returncode == 0
    first = _run(*data, "--stop_after_steps", "4", "--output_dir", str(split))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(*data, "--resume", "True", "--output_dir", str(split))
    assert second.returncode == 0, second.stderr[-3000:]
    expected, actual = _records(whole), _records(split)
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    # bf16 kernels need not be bitwise deterministic on a GPU: a loose tolerance.
    for mine, theirs in zip(actual, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fsdp_on_two_gpus(corpus: Path, tmp_path: Path) -> None:
    result = _run(
        "--fsdp",
        "True",
        "--batch_size",
        "4",
        "--data",
        f"{corpus}/*.py",
        "--output_dir",
        str(tmp_path),
        processes=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "train_summary.json").read_text())["world_size"] == 2
