"""Scripts' ``main`` called in this process: correctness catching a broken verifier,
benchmark options, generate's one-shot mode."""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoTokenizer

import self_speculation.strategies as strategies


def correctness_argv(model: Path, data: Path, output: Path) -> list[str]:
    return [
        "--model", str(model), "--dataset", "custom_jsonl", "--data_path", str(data),
        "--exit_layer", "2", "--num_speculations", "3", "--max_steps", "12",
        "--output_dir", str(output),
    ]  # fmt: skip


def test_correctness_exits_zero_when_outputs_match(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    correctness = importlib.import_module("correctness")
    assert correctness.main(correctness_argv(tiny_model_dir, prompts_file, tmp_path)) == 0
    (result,) = tmp_path.glob("correctness_*.json")
    document = json.loads(result.read_text())
    assert document["num_mismatches"] == 0 and document["passed"]


def test_correctness_runs_in_float32_unless_told_and_warns_in_low_precision(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, caplog
) -> None:
    """Not the GPU default of bfloat16, where near-ties made it fail without a defect."""
    correctness = importlib.import_module("correctness")
    argv = correctness_argv(tiny_model_dir, prompts_file, tmp_path)
    assert correctness.main(argv) == 0
    (result,) = tmp_path.glob("correctness_*.json")
    assert '"dtype": "float32"' in result.read_text()
    with caplog.at_level(logging.WARNING):
        correctness.main([*argv, "--dtype", "bfloat16"])
    assert "--dtype bfloat16: a one-token pass and a pass over k + 1 tokens" in caplog.text


def test_correctness_fails_on_a_broken_verification(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_greedy_accept = strategies.greedy_accept

    def broken_greedy_accept(
        draft_tokens: torch.Tensor, target_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        accepted_counts, next_tokens = real_greedy_accept(draft_tokens, target_tokens)
        return accepted_counts, (next_tokens + 1) % 300  # a wrong correction / bonus token

    monkeypatch.setattr(strategies, "greedy_accept", broken_greedy_accept)
    correctness = importlib.import_module("correctness")
    assert correctness.main(correctness_argv(tiny_model_dir, prompts_file, tmp_path)) == 1
    (result,) = tmp_path.glob("correctness_*.json")
    document = json.loads(result.read_text())
    assert document["num_mismatches"] == 3 and document["mismatch_pct"] == 100.0
    assert not document["passed"]
    assert all(mismatch["first_difference"] >= 1 for mismatch in document["mismatches"])


def test_benchmark_custom_jsonl_with_template_and_shots(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    benchmark = importlib.import_module("benchmark")
    argv = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(prompts_file),
        "--n_shot", "1", "--template", "Q: {message}\nA:", "--max_steps", "6",
        "--random_shuffle", "False", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    (result,) = tmp_path.glob("benchmark_*.json")
    document = json.loads(result.read_text())
    assert set(document["metrics"]) == {"autoregressive"} and "comparison" not in document
    rows = [json.loads(line) for line in Path(document["samples_file"]).read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert rows[0]["prompt"].startswith("Q: ") and rows[0]["prompt"].endswith(
        "\n\ndef add(a, b):\nA:"
    )
    assert rows[0]["reference"] == "\n    return a + b"
    assert all(len(row["token_ids"]) == row["num_generated_tokens"] for row in rows)


def test_benchmark_sampling_is_reproducible(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    benchmark = importlib.import_module("benchmark")
    outputs = []
    for run in range(2):
        output = tmp_path / str(run)
        argv = [
            "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(prompts_file),
            "--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "2",
            "--sample", "True", "--temperature", "1.0", "--max_steps", "8", "--output_dir", str(output),
        ]  # fmt: skip
        assert benchmark.main(argv) == 0
        (samples,) = output.glob("benchmark_*.samples.jsonl")
        outputs.append([json.loads(line)["token_ids"] for line in samples.read_text().splitlines()])
    assert outputs[0] == outputs[1]


def test_generate_one_shot_prints_the_answer(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    generate = importlib.import_module("generate")
    argv = [
        "--model", str(tiny_model_dir), "--prompt", "def fibonacci(n):", "--streamer", "none",
        "--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "3",
        "--sample", "False", "--max_steps", "8",
    ]  # fmt: skip
    assert generate.main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_generate_interactive_reads_the_current_stdin(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    generate = importlib.import_module("generate")  # imported before stdin is replaced
    monkeypatch.setattr(sys, "stdin", io.StringIO("def add(a, b):\nThe quick\\\nbrown fox\n"))
    caplog.set_level(logging.INFO, logger="generate")
    argv = ["--model", str(tiny_model_dir), "--max_steps", "4", "--sample", "False"]
    assert generate.main([*argv, "--streamer", "none"]) == 0
    assert caplog.text.count("tokens/s") == 2  # two prompts answered (one continued a line)
    assert capsys.readouterr().out


def test_generate_interactive_skips_a_bad_prompt_but_exits_non_zero(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    """A prompt longer than the model's context is refused in one line and the session goes
    on; the exit status and the result document say that one failed."""
    generate = importlib.import_module("generate")
    long_line = "x " * 2000
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long_line}\ndef add(a, b):\n"))
    argv = ["--model", str(tiny_model_dir), "--max_steps", "4", "--sample", "False"]
    assert generate.main([*argv, "--streamer", "none", "--output_dir", str(tmp_path)]) == 2
    (result,) = tmp_path.glob("generate_*.json")
    document = json.loads(result.read_text())
    assert document["failed_prompts"] == 1 and len(document["prompts"]) == 1
    assert document["ended_by"] == "end of input"


def test_generate_interactive_ended_by_unreadable_input_says_so(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input that is no prompts (NUL bytes) ends the session in one line; the result
    document keeps the answers before it and says how the session ended (it said null, as
    for a run still going or killed)."""
    generate = importlib.import_module("generate")
    monkeypatch.setattr(sys, "stdin", io.StringIO("def add(a, b):\nbinary\x00data\n"))
    argv = ["--model", str(tiny_model_dir), "--max_steps", "4", "--sample", "False"]
    with pytest.raises(generate.ConfigError, match="NUL bytes"):
        generate.main([*argv, "--streamer", "none", "--output_dir", str(tmp_path)])
    (result,) = tmp_path.glob("generate_*.json")
    document = json.loads(result.read_text())
    assert len(document["prompts"]) == 1
    assert document["ended_by"] == "unreadable input"


def test_generate_chat_template(tiny_model_dir: Path, tmp_path: Path, caplog, capsys) -> None:
    generate = importlib.import_module("generate")
    argv = ["--prompt", "hi", "--max_steps", "4", "--chat_template", "True", "--sample", "False"]
    assert generate.main(["--model", str(tiny_model_dir), *argv]) == 0
    assert "no chat template" in caplog.text  # warns and uses the prompt as it is

    chat_model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}The{% endif %}"
    )
    tokenizer.save_pretrained(chat_model)
    caplog.clear()
    assert generate.main(["--model", str(chat_model), *argv, "--streamer", "none"]) == 0
    assert "no chat template" not in caplog.text
    assert capsys.readouterr().out.strip()


def test_benchmark_human_eval_pass_at_1_opt_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="benchmark")
    model_dir = save_tiny_model(tmp_path / "long", max_position_embeddings=2048)
    benchmark = importlib.import_module("benchmark")
    argv = [
        "--model", str(model_dir), "--dataset", "human_eval", "--num_samples", "2",
        "--max_steps", "4", "--sample", "False", "--execute_code", "True",
        "--output_dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    (result,) = (tmp_path / "logs").glob("benchmark_*.json")
    document = json.loads(result.read_text())
    assert document["metrics"]["autoregressive"]["pass@1"] == 0.0  # a random model passes nothing
    rows = [json.loads(line) for line in Path(document["samples_file"]).read_text().splitlines()]
    assert [row["passed"] for row in rows] == [False, False]
    assert "exact match 0.000, pass@1 0.000" in caplog.text  # the summary line says it too


@pytest.mark.parametrize("break_even, path", [(18, "fast (torch.compile)"), (19, "eager")])
def test_benchmark_compiles_under_compile_auto_from_the_break_even(
    tiny_model_dir: Path,
    prompts_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    break_even: int,
    path: str,
) -> None:
    """3 samples x 6 tokens = 18 expected tokens: compiled from a break-even of 18 on."""
    arguments = importlib.import_module("arguments")
    benchmark = importlib.import_module("benchmark")
    monkeypatch.setattr(arguments, "COMPILE_BREAK_EVEN_TOKENS", break_even)
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")  # traced, not built: seconds
    argv = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path", str(prompts_file),
        "--max_steps", "6", "--sample", "False", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="arguments"):
        assert benchmark.main(argv) == 0
    (result,) = tmp_path.glob("benchmark_*.json")
    document = json.loads(result.read_text())
    assert document["environment"]["decoding_path"] == path
    assert document["generation_configs"][0]["compile"] is (path != "eager")
    said = [r.getMessage() for r in caplog.records if "--compile auto" in r.getMessage()]
    if path == "eager":
        assert not said  # short runs stay eager without a word (debug level)
    else:
        assert said == [
            "--compile auto: fast path on (up to 18 tokens expected in this process; "
            "compiling pays from about 18)"
        ]


@pytest.mark.parametrize("greedy", [True, False])
def test_benchmark_log_says_sampled_outputs_differ_by_design(greedy: bool, caplog) -> None:
    benchmark = importlib.import_module("benchmark")
    comparison = {
        "baseline": "autoregressive", "speedup": {"autoregressive": 1.0}, "num_samples": 4,
        "num_mismatches": 3, "greedy": greedy,
    }  # fmt: skip
    with caplog.at_level(logging.INFO, logger="benchmark"):
        benchmark._log_summary({"metrics": {}, "comparison": comparison})
    (line,) = [record.message for record in caplog.records if "identical" in record.message]
    assert line.startswith("outputs identical on 1/4 samples")
    assert ("draws its own" in line) is not greedy


def test_generate_hints_at_the_chat_template_when_the_answer_ends_at_once(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """An instruct model (SmolLM2-Instruct) given a bare question ends its turn at the first
    token: generate.py printed an empty answer without a word on why."""
    generate = importlib.import_module("generate")
    chat_model = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(chat_model)
    original = generate.Generator.generate

    def ends_at_once(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        return dataclasses.replace(result, token_ids=result.token_ids[:1], stop_reason="eos")

    monkeypatch.setattr(generate.Generator, "generate", ends_at_once)
    argv = ["--prompt", "hi", "--max_steps", "4", "--sample", "False", "--streamer", "none",
            "--output_dir", str(tmp_path / "logs")]  # fmt: skip
    assert generate.main(["--model", str(chat_model), *argv]) == 0
    assert "--chat_template True gives it the prompt as a chat turn" in caplog.text
    caplog.clear()
    assert generate.main(["--model", str(chat_model), *argv, "--chat_template", "True"]) == 0
    assert "--chat_template True gives" not in caplog.text
    caplog.clear()
    assert generate.main(["--model", str(tiny_model_dir), *argv]) == 0  # no template to offer
    assert "--chat_template True gives" not in caplog.text


def test_generate_keeps_the_autoregressive_comparison_in_its_results(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--compare_autoregressive's measurement (plain decoding's speed, the speedup, whether
    the tokens were the same) was only a log line: the result document now has it."""
    generate = importlib.import_module("generate")
    argv = [
        "--model", str(tiny_model_dir), "--prompt", "def fibonacci(n):", "--streamer", "none",
        "--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "3",
        "--sample", "False", "--max_steps", "8", "--compare_autoregressive", "True",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert generate.main(argv) == 0
    (document,) = tmp_path.glob("generate_*.json")
    (row,) = json.loads(document.read_text())["prompts"]
    compared = row["autoregressive"]
    assert compared["same_tokens"] is True  # greedy: token for token
    assert compared["num_generated_tokens"] == row["num_generated_tokens"]
    assert compared["tokens_per_second"] > 0
    expected = row["tokens_per_second"] / compared["tokens_per_second"]
    assert compared["speedup"] == pytest.approx(expected)


@pytest.mark.parametrize("script", ["generate", "benchmark"])
def test_compile_auto_counts_no_more_tokens_than_the_models_context(
    tiny_model_dir: Path,
    prompts_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    script: str,
) -> None:
    """--max_steps far past the context: each prompt still ends within the context, so
    --compile auto counts at most the context per prompt (it counted --max_steps, and
    compiled for a few hundred tokens)."""
    arguments = importlib.import_module("arguments")
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    monkeypatch.setattr(arguments, "COMPILE_BREAK_EVEN_TOKENS", 3 * context + 1)
    common = [
        "--model",
        str(tiny_model_dir),
        "--max_steps",
        str(100 * context),
        "--sample",
        "False",
    ]
    if script == "generate":
        argv = [*common, "--prompt", "def f(x):", "--streamer", "none"]
    else:
        argv = [*common, "--dataset", "custom_jsonl", "--data_path", str(prompts_file)]
    with caplog.at_level(logging.DEBUG, logger="arguments"):
        assert importlib.import_module(script).main([*argv, "--output_dir", str(tmp_path)]) == 0
    (said,) = [r.getMessage() for r in caplog.records if "--compile auto" in r.getMessage()]
    tokens = context * (1 if script == "generate" else 3)  # prompts_file: 3 prompts
    assert said.startswith(f"--compile auto: eager decoding (up to {tokens:,} tokens expected")
