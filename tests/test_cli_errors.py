"""Bad input to every script: one line on stderr, exit status 2, no traceback.

The scripts' ``main`` runs in this process through ``arguments.run_main`` (what
``python script.py`` does), so each case costs a model load, not an interpreter start.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from arguments import EXIT_ERROR, run_main


def run_in_process(script: str, argv: list[object], monkeypatch, capsys) -> tuple[int, str]:
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, prog=f"{script}.py")
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture()
def data_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "def add(a, b):", "response": " return a + b"}) + "\n")
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    missing_field = tmp_path / "missing_field.jsonl"
    missing_field.write_text(json.dumps({"question": "a", "response": "b"}) + "\n")
    too_long = tmp_path / "too_long.jsonl"
    too_long.write_text(json.dumps({"prompt": "word " * 400, "response": "b"}) + "\n")
    empty_prompt = tmp_path / "empty_prompt.jsonl"
    empty_prompt.write_text(json.dumps({"prompt": "", "response": "b"}) + "\n")
    human_eval_no_tests = tmp_path / "human_eval_no_tests.jsonl"
    human_eval_no_tests.write_text(
        json.dumps({"prompt": "def f():\n", "canonical_solution": "    return 1\n"}) + "\n"
    )
    return {
        "good": good,
        "malformed": malformed,
        "missing_field": missing_field,
        "too_long": too_long,
        "empty_prompt": empty_prompt,
        "human_eval_no_tests": human_eval_no_tests,
        "missing": tmp_path / "absent.jsonl",
    }


CASES = [
    # (script, arguments (MODEL / DATA:<name> substituted), fragment of the message)
    ("benchmark", ["--dataset", "nope"], "unknown dataset 'nope'"),
    (
        "benchmark",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:missing"],
        "data file not found",
    ),
    (
        "sweep",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:malformed"],
        "line 2: not valid JSON",
    ),
    (
        "correctness",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:missing_field", "--exit_layer", 2]
        + ["--num_speculations", 2],
        "no field 'prompt'",
    ),
    ("benchmark", ["--dataset", "custom_jsonl"], "custom_jsonl needs --data_path"),
    ("benchmark", ["--dataset", "cnn_dm_summarization"], "Supply a local copy with --data_path"),
    (
        "benchmark",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:good", "--exit_layer", 7],
        "exit_layer must be in [1, 4]",
    ),
    (
        "correctness",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:good", "--exit_layer", 0],
        "exit_layer must be >= 1",
    ),
    (
        "correctness",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:good"],
        "needs --exit_layer",
    ),
    (
        "sweep",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:good", "--exit_layer_last", 9],
        "outside [1, 4]",
    ),
    (
        "benchmark",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:too_long"],
        "sample 0: the prompt has",
    ),
    (
        "benchmark",
        [
            "--dataset",
            "custom_jsonl",
            "--data_path",
            "DATA:empty_prompt",
            "--template",
            "{message}",
        ],
        "the prompt is empty",
    ),
    ("generate", ["--prompt", ""], "the prompt is empty"),
    ("generate", ["--prompt", "word " * 400], "the model's context is 256 tokens"),
    ("generate", ["--prompt", "hi", "--streamer", "loud"], "unknown streamer 'loud'"),
    (
        "generate",
        ["--prompt", "hi", "--generation_strategy", "fast"],
        "unknown generation_strategy 'fast'",
    ),
    ("generate", ["--prompt", "hi", "--sample", "maybe"], "Boolean value expected"),
    ("benchmark", ["--n_shot", 1, "--bogus", 3], "unrecognized arguments: --bogus 3"),
    ("eval", ["--tasks", "no_such_task_anywhere_xyz"], "unknown lm-eval task"),
    ("eval", ["--tasks", "layerskip_humaneval", "--limit", 1], "--execute_code True"),
    ("eval", ["--tasks", "gsm8k", "--limit", 1], "Hub tasks need the network"),
    ("generate", ["--model", "/nonexistent/model", "--prompt", "hi"], "model directory not found"),
    ("benchmark", ["--dtype", "float8", "--dataset", "human_eval"], "unknown dtype 'float8'"),
    ("benchmark", ["--model_args", "{not json"], "--model_args is not valid JSON"),
    ("benchmark", ["--template", "no placeholder"], "--template must contain '{message}'"),
    (
        "benchmark",
        ["--dataset", "human_eval", "--data_path", "DATA:human_eval_no_tests"]
        + ["--execute_code", True],
        "--execute_code True: sample 0 has no task_id, test, entry_point",
    ),
]


@pytest.mark.parametrize(
    ("script", "argv", "fragment"), CASES, ids=[f"{c[0]}:{c[2][:30]}" for c in CASES]
)
def test_bad_input_is_one_line(
    script: str,
    argv: list,
    fragment: str,
    tiny_model_dir: Path,
    data_files,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    substituted = [
        data_files[item.removeprefix("DATA:")]
        if isinstance(item, str) and item.startswith("DATA:")
        else item
        for item in argv
    ]
    if "--model" not in substituted:
        substituted = ["--model", tiny_model_dir, *substituted]
    code, stderr = run_in_process(
        script, [*substituted, "--output_dir", tmp_path / "logs"], monkeypatch, capsys
    )
    assert code == EXIT_ERROR, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if f"{script}.py: error:" in line]
    assert len(errors) == 1, stderr
    assert fragment in errors[0]
    # a run that failed before its first row leaves no empty samples file behind
    assert not list((tmp_path / "logs").glob("*.jsonl"))


def test_unwritable_output_dir_is_one_line(
    tiny_model_dir: Path, data_files, tmp_path: Path, monkeypatch, capsys
) -> None:
    not_a_directory = tmp_path / "a_file"
    not_a_directory.write_text("")
    argv = [
        "--model", tiny_model_dir, "--dataset", "custom_jsonl", "--data_path", data_files["good"],
        "--max_steps", 2, "--output_dir", not_a_directory / "logs",
    ]  # fmt: skip
    code, stderr = run_in_process("benchmark", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "benchmark.py: error:" in line]
    assert len(errors) == 1 and "is a file, not a directory" in errors[0], stderr


def test_a_model_without_decoder_layers_is_one_line_in_a_subprocess(tmp_path: Path) -> None:
    """GPT-2 keeps its blocks at .transformer.h: refused by name, not with a traceback."""
    import os
    import subprocess

    from tiny_models import make_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        model_dir
    )
    make_tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "def add(a, b):", "response": "x"}) + "\n")
    completed = subprocess.run(
        [
            sys.executable,
            "correctness.py",
            "--model",
            str(model_dir),
            "--dataset",
            "custom_jsonl",
            "--data_path",
            str(data),
            "--exit_layer",
            "1",
            "--num_speculations",
            "2",
            "--output_dir",
            str(tmp_path / "logs"),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == EXIT_ERROR
    lines = [line for line in completed.stderr.splitlines() if "decoder layers" in line]
    assert len(lines) == 1 and "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch_sizes", "4", "0"], "--batch_sizes must be >= 1, got 0"),
        (["--num_prompts", "0"], "--num_prompts must be >= 1, got 0"),
        (["--threads", "-1"], "--threads must be >= 0, got -1"),
    ],
)
def test_engine_benchmark_bad_flags_are_one_line(argv, message, monkeypatch, capsys) -> None:
    """benchmarks/engine.py refuses values it would crash on later (a zero batch size was a
    ``range()`` traceback after minutes of benchmarking), before loading anything."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    code, stderr = run_in_process("engine", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip() == f"engine.py: error: {message}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_speculations", "2", "0"], "--num_speculations must be >= 1, got 0"),
        (["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (
            ["--draft_vocab_sizes", "-5"],
            "--draft_vocab_sizes must be >= 0 (0: whole vocabulary), got -5",
        ),
        (["--prompt_sets", "xsum"], "--prompt_sets must name some of human_eval, chat, got xsum"),
        (["--adapters", "no/such/adapter"], "--adapters: no/such/adapter is not an adapter folder"),
        (
            ["--model", "models/layerskip-stdlib", "--plain_exit_layers", "24"],
            "--plain_exit_layers must be below the model's 24 layers, got 24",
        ),
    ],
)
def test_adapter_benchmark_bad_flags_are_one_line(argv, message, monkeypatch, capsys) -> None:
    """benchmarks/adapter.py refuses values it would crash on minutes later (a zero k, a
    missing adapter folder, an exit at or past the last layer) in one line."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    code, stderr = run_in_process("adapter", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line]  # after log lines
    assert errors == [f"adapter.py: error: {message}"]


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("overhead", ["--num_speculations", "0"], "--num_speculations must be >= 1, got 0"),
        ("overhead", ["--layers", "1"], "--layers must be >= 2, got 1"),
        ("overhead", ["--dtype", "float8"], "unknown dtype 'float8' (choose from "),
        ("overhead", ["--hidden", "320"], "--hidden 320 does not split into 5 heads of 64 with 2"),
        ("overhead", ["--layers", "4", "--exit_layers", "4"], "--exit_layers must be below the"),
        ("train_throughput", ["--steps", "0"], "--steps must be >= 1, got 0"),
        ("train_throughput", ["--preset", "huge"], "unknown preset 'huge' (choose from "),
        ("train_throughput", ["--device", "tpu9"], "unknown device 'tpu9' (valid here: "),
        ("train_throughput", ["--memory_exits", "30"], "--memory_exits must be at most"),
    ],
)
def test_developer_benchmarks_bad_flags_are_one_line(
    script, argv, message, monkeypatch, capsys
) -> None:
    """benchmarks/overhead.py and benchmarks/train_throughput.py refuse bad values in one
    line with exit 2 (they were tracebacks from deep inside a model build or a run)."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    code, stderr = run_in_process(script, argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script}.py: error: {message}")
