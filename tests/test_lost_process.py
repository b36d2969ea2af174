"""A torchrun process whose peer is gone ends in one line, not gloo's traceback.

When one process of a run dies (killed, or stopped by its own one-line error) while another
waits in a collective, gloo raises a plain RuntimeError in the survivor ("Connection closed
by peer"); the survivor printed its traceback, which buried the line that said what went
wrong. It now says in one line that it lost contact with another process, and exits 2.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train
from arguments import run_main

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
GLOO_CLOSED = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
    "closed by peer [127.0.0.1]:14498. This is typically caused by a remote worker crashing. "
    "Check the logs of the remote worker before reporting an error."
)


def _under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)


def test_a_benchmark_whose_peer_died_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _under_torchrun(monkeypatch)

    def main(argv: list[str]) -> int:
        raise RuntimeError(GLOO_CLOSED)

    with pytest.raises(SystemExit) as stopped:
        run_main(main, prog="benchmark.py")
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "benchmark.py: error: lost contact with another process of this run (Connection "
        "closed by peer [127.0.0.1]:14498); that process's own output says why it stopped"
    ]


def test_other_runtime_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a collective's lost peer: a bug elsewhere, a mismatched collective, or gloo's
    error without torchrun's environment still raises."""
    _under_torchrun(monkeypatch)

    def main(argv: list[str]) -> int:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_main(main, prog="benchmark.py")

    def mismatched(argv: list[str]) -> int:  # ranks calling different collectives: a bug
        raise RuntimeError(
            "[enforce fail at ../third_party/gloo/gloo/transport/tcp/pair.cc:446] "
            "op.preamble.length <= op.nbytes. 8 vs 4"
        )

    with pytest.raises(RuntimeError, match="enforce fail"):
        run_main(mismatched, prog="benchmark.py")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    def alone(argv: list[str]) -> int:
        raise RuntimeError(GLOO_CLOSED)

    with pytest.raises(RuntimeError, match="Connection closed"):
        run_main(alone, prog="benchmark.py")


def test_a_training_process_whose_peer_died_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    _under_torchrun(monkeypatch)

    def lost(config: object) -> None:
        raise RuntimeError(GLOO_CLOSED)

    monkeypatch.setattr(train, "train", lost)
    corpus = tmp_path / "corpus.py"
    corpus.write_text("def f(x):\n    return x\n" * 50)
    arguments = ["--preset", "tiny", "--data", str(corpus), "--max_tokens", "1024"]
    arguments += ["--output_dir", str(tmp_path / "run")]
    status = train.main(arguments)
    assert status == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("train.py: error: lost contact with another process of this run")


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_benchmark_rank_waiting_for_a_killed_rank_ends_in_one_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Rank 0 dies before the rows are gathered while rank 1 waits there. Rank 1 ignores
    torchrun's SIGTERM, so that what it prints does not race torchrun's clean-up."""
    data = tmp_path / "prompts.jsonl"
    prompts = ["def add(a, b):", "The quick brown fox", "def sub(a, b):"]
    data.write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in prompts))
    wrapper = tmp_path / "rank0_dies.py"
    wrapper.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(REPOSITORY_ROOT)!r})\n"
        "import benchmark\n"
        "from arguments import run_main\n"
        "from self_speculation import benchmarking\n"
        "if os.environ['RANK'] == '0':\n"
        "    benchmarking.gather = lambda *args: os._exit(3)\n"
        "else:\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "run_main(benchmark.main, prog='benchmark.py')\n"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper),
         "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(data),
         "--max_steps", "4", "--sample", "False", "--compile", "False",
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=REPOSITORY_ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "benchmark.py: error: lost contact with another process of this run" in result.stderr
    assert "[rank1]: Traceback" not in result.stderr, result.stderr[-3000:]
    # What each rank finished is on disk: rank 0's two rows, rank 1's one.
    rows = {
        path.name.split(".")[-2]: len(path.read_text().splitlines())
        for path in (tmp_path / "out").glob("*.rank*.jsonl")
    }
    assert rows == {"rank0": 2, "rank1": 1}
