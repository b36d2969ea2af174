"""generate.py's sampled answers can be drawn again from the result document: each prompt of
an interactive session is sampled with a seed of its own (``--seed`` + its place among the
prompts read, a refused prompt included), and each row records it, so that ``--prompt P
--seed S`` with the row's prompt and seed gives the row's text. Without it a session whose
prompt failed left no way to tell which seed an answer after it had drawn with."""

from __future__ import annotations

import importlib
import io
import json
import sys
from pathlib import Path

import pytest

PROMPTS = ["def add(a, b):", "import os", "class A:"]
SAMPLED = ["--max_steps", "8", "--sample", "True", "--temperature", "1.5", "--top_p", "1.0"]


def _document(output: Path) -> dict:
    (result,) = output.glob("generate_*.json")
    return json.loads(result.read_text())


def _run(generate, model: Path, output: Path, *extra: str) -> dict:
    argv = ["--model", str(model), *SAMPLED, "--streamer", "none", "--output_dir", str(output)]
    generate.main([*argv, "--seed", "5", *extra])
    return _document(output)


def test_each_sampled_answer_is_drawn_again_from_its_rows_prompt_and_seed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    generate = importlib.import_module("generate")
    too_long = "x " * 2000  # refused in one line; the session goes on
    lines = [PROMPTS[0], too_long, *PROMPTS[1:]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    session = _run(generate, tiny_model_dir, tmp_path / "session")
    assert session["failed_prompts"] == 1
    rows = session["prompts"]
    assert [row["prompt"] for row in rows] == PROMPTS
    assert [row["seed"] for row in rows] == [5, 7, 8]  # the refused prompt was number 1
    for number, row in enumerate(rows):
        again = _run(
            generate,
            tiny_model_dir,
            tmp_path / f"again{number}",
            "--prompt",
            row["prompt"],
            "--seed",
            str(row["seed"]),
        )
        (answer,) = again["prompts"]
        assert answer["seed"] == row["seed"]
        assert answer["text"] == row["text"], row["prompt"]
    capsys.readouterr()


@pytest.mark.parametrize("sample", [True, False])
def test_the_compared_line_says_sampled_tokens_differ_by_design(sample: bool) -> None:
    """--compare_autoregressive with the default --sample True logged "different tokens"
    alone, which reads as a decoding fault (benchmark.py says sampled outputs differ by
    design); a greedy difference is still a plain "different tokens"."""
    from self_speculation import GenerationResult

    generate = importlib.import_module("generate")

    def result(tokens: list[int], drafted: int) -> GenerationResult:
        return GenerationResult(
            text="", token_ids=tokens, num_prompt_tokens=3, stop_reason="max_steps",
            total_time=1.0, num_steps=2, num_drafted=drafted, num_accepted=drafted // 2,
            exit_layer=2, num_speculations=3 if drafted else 0,
        )  # fmt: skip

    line = generate.summary_line(result([5, 6, 7], 4), result([5, 8, 9], 0), sampled=sample)
    assert line.endswith("different tokens (sampled: each strategy draws its own))") is sample
    assert "different tokens" in line
    same = generate.summary_line(result([5, 6, 7], 4), result([5, 6, 7], 0), sampled=sample)
    assert same.endswith("same tokens)")
