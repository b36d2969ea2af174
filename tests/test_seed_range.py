"""generate.py's rows record the seed each answer drew with, so that ``--prompt P --seed S``
draws it again: a session started near ``--seed``'s largest value recorded seeds past it,
which ``--seed`` refuses; they count on from 0 instead."""

from __future__ import annotations

import importlib
import io
import json
import sys
from pathlib import Path

import pytest

from arguments import MAX_SEED

PROMPTS = ["def add(a, b):", "import os"]
SAMPLED = ["--max_steps", "6", "--sample", "True", "--temperature", "1.5", "--top_p", "1.0"]


def _run(generate, model: Path, output: Path, seed: int, *extra: str) -> dict:
    argv = ["--model", str(model), *SAMPLED, "--streamer", "none", "--output_dir", str(output)]
    assert generate.main([*argv, "--seed", str(seed), *extra]) == 0
    (result,) = output.glob("generate_*.json")
    return json.loads(result.read_text())


def test_a_rows_seed_past_the_largest_is_one_seed_accepts(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    generate = importlib.import_module("generate")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS) + "\n"))
    rows = _run(generate, tiny_model_dir, tmp_path / "session", MAX_SEED)["prompts"]
    assert [row["seed"] for row in rows] == [MAX_SEED, 0]
    again = _run(
        generate, tiny_model_dir, tmp_path / "again", rows[1]["seed"], "--prompt", PROMPTS[1]
    )
    assert again["prompts"][0]["text"] == rows[1]["text"]
    capsys.readouterr()
