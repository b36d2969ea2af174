"""train.py on several processes (torchrun, gloo, CPU): FSDP2 and DDP against one process,
sharded (DCP) checkpoints that resume exactly, also on another number of processes, and a
checkpoint on SIGTERM.

Every comparison uses the same global batch (1 process x 8 sequences or 2 x 4) and fp32
compute. The recipe's random decisions are drawn per sample, so layer dropout and position
subsampling make the same choices on any number of processes. Tolerance: the per-step
losses agree to 2e-4 (float32 sums taken in a different order on 1 and 2 processes; in
practice they agree to the 5 decimals logged).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import write_python_corpus

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 6
COMMON = [
    "--preset",
    "tiny",
    "--vocab_size",
    "300",
    "--seq_len",
    "32",
    "--warmup_steps",
    "2",
    "--log_every",
    "1",
    "--num_threads",
    "1",
    "--save_every_minutes",
    "0",
    "--bf16",
    "False",
    "--max_tokens",
    str(STEPS * 8 * 32),  # 6 optimizer steps of 8 sequences of 32 tokens (all processes)
]
PLAIN = ["--layer_dropout_p_max", "0", "--early_exit_loss", "False"]
# High dropout so that the two processes' samples skip different layers, and some layer is
# skipped by every sample of one process (its FSDP collectives must still match).
RECIPE = ["--layer_dropout_p_max", "0.6", "--early_exit_position_fraction", "0.25"]
TOLERANCE = 2e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(processes: int, *args: str) -> subprocess.CompletedProcess:
    """train.py on 1 process (python, 8 sequences) or N (torchrun, 8 / N sequences each)."""
    batch = ["--batch_size", str(8 // processes)]
    if processes == 1:
        command = [sys.executable, str(ROOT / "train.py")]
    else:
        command = [str(TORCHRUN), "--nproc_per_node", str(processes), str(ROOT / "train.py")]
    return subprocess.run(
        [*command, *COMMON, *batch, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )


def _records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _assert_same_run(actual: Path, expected: Path) -> None:
    """Same steps, tokens and learning rates; losses and final weights within TOLERANCE."""
    got, want = _records(actual), _records(expected)
    assert [(r["step"], r["tokens"]) for r in got] == [(r["step"], r["tokens"]) for r in want]
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in want], rel=1e-9)
    for mine, theirs in zip(got, want):
        assert mine["exit_losses"].keys() == theirs["exit_losses"].keys()
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=TOLERANCE), (mine, theirs)
        for exit_layer, loss in theirs["exit_losses"].items():
            assert mine["exit_losses"][exit_layer] == pytest.approx(loss, abs=TOLERANCE)
    weights, reference = (
        load_file(actual / "model.safetensors"),
        load_file(expected / "model.safetensors"),
    )
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():  # bf16 export: one bf16 step of slack
        assert torch.allclose(weights[name].float(), tensor.float(), atol=2e-2, rtol=1e-2), name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_python_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def one_process(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The uninterrupted single-process reference runs, plain and with the recipe."""
    runs = {}
    for name, flags in (("plain", PLAIN), ("recipe", RECIPE)):
        output_dir = tmp_path_factory.mktemp("one") / name
        result = _train(1, *flags, "--data", f"{corpus}/*.py", "--output_dir", str(output_dir))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = output_dir
    return runs


@pytest.mark.parametrize("variant", ["plain", "recipe"])
def test_fsdp_two_processes_equal_one_process(
    variant: str, corpus: Path, one_process: dict[str, Path], tmp_path: Path
) -> None:
    flags = PLAIN if variant == "plain" else RECIPE
    result = _train(
        2, *flags, "--fsdp", "True", "--data", f"{corpus}/*.py", "--output_dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2" in result.stderr
    _assert_same_run(tmp_path, one_process[variant])
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert (summary["world_size"], summary["fsdp"]) == (2, True)


def test_ddp_two_processes_equal_one_process(
    corpus: Path, one_process: dict[str, Path], tmp_path: Path
) -> None:
    result = _train(2, *RECIPE, "--data", f"{corpus}/*.py", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP" in result.stderr
    _assert_same_run(tmp_path, one_process["recipe"])


def test_fsdp_checkpoint_resumes_on_two_and_on_one_process(
    corpus: Path, one_process: dict[str, Path], tmp_path: Path
) -> None:
    """Stop a 2-process FSDP run after 3 steps; resume it on 2 processes and on 1."""
    interrupted = tmp_path / "interrupted"
    data = ["--data", f"{corpus}/*.py"]
    fsdp = ["--fsdp", "True"]
    first = _train(
        2, *RECIPE, *data, *fsdp, "--stop_after_steps", "3", "--output_dir", str(interrupted)
    )
    assert first.returncode == 0, first.stderr[-3000:]
    shards = sorted(p.name for p in (interrupted / "checkpoint").glob("*.distcp"))
    assert len(shards) == 2, shards  # one shard file per process: nothing was gathered
    on_one = tmp_path / "on_one"
    shutil.copytree(interrupted, on_one)
    second = _train(
        2, *RECIPE, *data, "--fsdp", "True", "--resume", "True", "--output_dir", str(interrupted)
    )
    assert second.returncode == 0, second.stderr[-3000:]
    _assert_same_run(interrupted, one_process["recipe"])
    third = _train(1, *RECIPE, *data, "--resume", "True", "--output_dir", str(on_one))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "random states start afresh" in third.stderr
    _assert_same_run(on_one, one_process["recipe"])


def _wait_for_step(output_dir: Path, step: int, process: subprocess.Popen) -> None:
    log = output_dir / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


LONG_STEPS = 14  # long enough to be stopped in the middle


def _long_flags(corpus: Path) -> list[str]:
    return [*RECIPE, "--data", f"{corpus}/*.py", "--max_tokens", str(LONG_STEPS * 8 * 32)]


@pytest.fixture(scope="module")
def long_reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run of LONG_STEPS steps with the recipe."""
    output_dir = tmp_path_factory.mktemp("long") / "reference"
    result = _train(1, *_long_flags(corpus), "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_checkpoints_and_resume_reproduces_the_run(
    processes: int, corpus: Path, long_reference: Path, tmp_path: Path
) -> None:
    """SIGTERM in the middle of a run: exit 143 with a checkpoint; resuming it gives the
    losses of the uninterrupted run (2 processes: FSDP2, signal sent to torchrun)."""
    flags = _long_flags(corpus) + (["--fsdp", "True"] if processes == 2 else [])
    launcher = (
        [sys.executable, str(ROOT / "train.py")]
        if processes == 1
        else [str(TORCHRUN), "--nproc_per_node", "2", str(ROOT / "train.py")]
    )
    batch = ["--batch_size", str(8 // processes)]
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*launcher, *COMMON, *flags, *batch, "--output_dir", str(interrupted)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        _wait_for_step(interrupted, 2, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    stopped_at = len(_records(interrupted))
    assert 2 <= stopped_at < LONG_STEPS, stderr[-3000:]
    if processes == 1:
        assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert f"SIGTERM at step {stopped_at}: checkpoint saved" in stderr
    else:
        assert process.returncode != 0  # torchrun reports its workers' exit status 143
    state = torch.load(interrupted / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["progress"]["step"] == stopped_at
    assert not (interrupted / "model.safetensors").exists()

    resumed = _train(processes, *flags, "--resume", "True", "--output_dir", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(interrupted, long_reference)
