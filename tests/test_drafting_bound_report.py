"""benchmarks/drafting_bound.py: rows of the policies that pick the exit each step, its
thread count and its exit layers (hunt 65)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from self_speculation import ConfigError


def _drafting_bound():
    return importlib.import_module("benchmarks.drafting_bound")


@pytest.fixture()
def short_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts that fit the tiny model's 256-token context (HumanEval's do not)."""
    prompts = ["def add(a, b):", "The quick brown fox"]
    monkeypatch.setitem(_drafting_bound().PROMPT_SETS, "human_eval", lambda n: prompts[:n])


def test_multi_exit_policies_name_their_exits_not_exit_zero(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, short_prompts: None
) -> None:
    """adaptive_exit and oracle_exit have no one exit layer: 0 (not an exit) was printed
    and written for both, and oracle_exit's row did not say which exits it chose from."""
    output = tmp_path / "bound.json"
    arguments = ["--model", str(tiny_model_dir), "--num_prompts", "1", "--max_steps", "8",
                 "--exit_layers", "1", "2", "--num_speculations", "2", "--trees", "2,1",
                 "--adaptive_exit_sets", "1,2", "--confidence_thresholds", "0.5",
                 "--output", str(output)]  # fmt: skip
    assert _drafting_bound().main(arguments) == 0
    rows = {row["policy"]: row for row in json.loads(output.read_text())["rows"]}
    assert rows["oracle_exit"]["exit_layer"] is None and rows["oracle_exit"]["exits"] == "1,2"
    assert rows["adaptive_exit"]["exit_layer"] is None
    assert rows["adaptive_exit"]["exits"] == "1,2"
    printed = capsys.readouterr().out
    assert "E=0" not in printed
    assert "best oracle_exit: exits 1,2 k=2" in printed
    assert "best confident: E=" in printed and "t=0.5" in printed.split("best confident")[1]


def test_threads_default_to_one_and_zero_means_torch_default(
    tiny_model_dir: Path, tmp_path: Path, short_prompts: None
) -> None:
    """Nothing is timed, so the replay runs beside other work: one thread by default, as
    the scripts (it took 2); 0 (torch's default, as the other benchmarks) was a
    RuntimeError traceback from torch.set_num_threads."""
    module = _drafting_bound()
    assert module.BoundArguments().threads == 1
    with pytest.raises(ConfigError, match="--threads"):
        module.BoundArguments(threads=-1)
    threads = torch.get_num_threads()
    arguments = ["--model", str(tiny_model_dir), "--num_prompts", "1", "--max_steps", "4",
                 "--exit_layers", "1", "--num_speculations", "1", "--trees", "2",
                 "--adaptive_exit_sets", "1", "--confidence_thresholds", "0.5",
                 "--threads", "0", "--output", str(tmp_path / "bound.json")]  # fmt: skip
    assert module.main(arguments) == 0
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("exit_layer", [0, -1])
def test_exit_layer_below_one_is_refused(exit_layer: int) -> None:
    """Exit 0 read ranks[-1] (the last layer, which always agrees) and printed a bound of
    everything accepted; -1 read layer L - 1."""
    with pytest.raises(ConfigError, match="--exit_layers"):
        _drafting_bound().BoundArguments(exit_layers=[exit_layer, 2])
