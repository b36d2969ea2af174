"""generate.py's comparison() (what --compare_autoregressive keeps in the result rows): the
only test decodes greedily, where the tokens are the same, so a "same_tokens" that was always
True went unnoticed; and a plain run of 0 tokens/s has no speedup (None, not a division)."""

from __future__ import annotations

import importlib
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace


def _result(token_ids: list[int], tokens_per_second: float) -> SimpleNamespace:
    return SimpleNamespace(
        token_ids=token_ids,
        tokens_per_second=tokens_per_second,
        total_time=1.0,
        num_generated_tokens=len(token_ids),
    )


def test_comparison_says_when_the_tokens_differ() -> None:
    generate = importlib.import_module("generate")
    compared = generate.comparison(_result([1, 2, 3], 30.0), _result([1, 2, 4], 10.0))
    assert compared["same_tokens"] is False
    assert compared["speedup"] == 3.0
    assert generate.comparison(_result([1, 2], 30.0), _result([1, 2], 10.0))["same_tokens"]
    assert generate.comparison(_result([1], 30.0), _result([1], 0.0))["speedup"] is None


def test_every_answer_of_a_session_keeps_its_comparison(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Prompts from standard input: each answer's row has plain decoding's measurement, not
    only the first's (the shipped test gives one --prompt)."""
    generate = importlib.import_module("generate")  # imported before stdin is replaced
    monkeypatch.setattr(sys, "stdin", io.StringIO("def add(a, b):\nThe quick brown\n"))
    argv = [
        "--model", str(tiny_model_dir), "--streamer", "none", "--sample", "False",
        "--generation_strategy", "self_speculative", "--exit_layer", "2",
        "--num_speculations", "3", "--max_steps", "4", "--compare_autoregressive", "True",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert generate.main(argv) == 0
    (document,) = tmp_path.glob("generate_*.json")
    rows = json.loads(document.read_text())["prompts"]
    assert len(rows) == 2
    assert all(row["autoregressive"]["same_tokens"] is True for row in rows)
