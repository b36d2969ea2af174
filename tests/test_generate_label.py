"""generate.py's summary line names the strategy that ran: a self-speculative answer that
ended before its first drafting step (--max_steps 1, an EOS first) was logged as
"autoregressive: 1 tokens ..."."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path


def test_self_speculative_answer_without_drafts_keeps_its_label(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    generate = importlib.import_module("generate")
    caplog.set_level(logging.INFO, logger="generate")
    argv = [
        "--model", str(tiny_model_dir), "--prompt", "def f(x):", "--streamer", "none",
        "--generation_strategy", "self_speculative", "--exit_layer", "2",
        "--num_speculations", "3", "--sample", "False", "--max_steps", "1",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert generate.main(argv) == 0
    lines = [r.getMessage() for r in caplog.records if " in " in r.getMessage()]
    assert any(line.startswith("self-speculative: 1 token in ") for line in lines), lines
    assert not any(line.startswith("autoregressive:") for line in lines), lines


def test_autoregressive_answer_is_labelled_autoregressive(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    generate = importlib.import_module("generate")
    caplog.set_level(logging.INFO, logger="generate")
    argv = [
        "--model", str(tiny_model_dir), "--prompt", "def f(x):", "--streamer", "none",
        "--generation_strategy", "autoregressive", "--sample", "False", "--max_steps", "3",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert generate.main(argv) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("autoregressive: 3 tokens in ") for line in lines), lines
