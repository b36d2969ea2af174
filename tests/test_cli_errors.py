"""Bad input to every script: one line on stderr, exit status 2, no traceback.

The scripts' ``main`` runs in this process through ``arguments.run_main`` (what
``python script.py`` does), so each case costs a model load, not an interpreter start.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
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
    fifo = tmp_path / "fifo.jsonl"  # as from <(...): was "data file not found"
    os.mkfifo(fifo)
    blank_prompt = tmp_path / "blank_prompt.jsonl"  # ran from BOS alone, exit 0
    blank_prompt.write_text(json.dumps({"prompt": " \n\t ", "response": "b"}) + "\n")
    human_eval_no_tests = tmp_path / "human_eval_no_tests.jsonl"
    human_eval_no_tests.write_text(
        json.dumps({"prompt": "def f():\n", "canonical_solution": "    return 1\n"}) + "\n"
    )
    deep_nesting = tmp_path / "deep_nesting.jsonl"  # json.loads: RecursionError
    deep_nesting.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    huge_number = tmp_path / "huge_number.jsonl"  # json.loads: int digit limit (ValueError)
    huge_number.write_text('{"prompt": "a", "response": "b", "n": ' + "9" * 5000 + "}\n")
    truncated_gz = tmp_path / "truncated.jsonl.gz"  # gzip: EOFError
    compressed = gzip.compress(good.read_bytes() * 20)
    truncated_gz.write_bytes(compressed[: len(compressed) // 2])
    return {
        "deep_nesting": deep_nesting,
        "huge_number": huge_number,
        "truncated_gz": truncated_gz,
        "good": good,
        "malformed": malformed,
        "missing_field": missing_field,
        "too_long": too_long,
        "empty_prompt": empty_prompt,
        "blank_prompt": blank_prompt,
        "fifo": fifo,
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
        "sample 0 (row 1 of the data): the prompt has",
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
    (
        "benchmark",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:fifo"],
        "is not a regular file (a pipe or a device)",
    ),
    (
        "benchmark",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:blank_prompt"]
        + ["--template", "{message}"],
        "sample 0 (row 1 of the data): the prompt is empty (whitespace only)",
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
    # JSON that json.loads refuses with a RecursionError or a plain ValueError, and a .gz
    # file cut short (EOFError): tracebacks before, not a JSONDecodeError
    (
        "benchmark",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:deep_nesting"],
        "deep_nesting.jsonl: starts with '[' but is not one JSON array of objects, nor JSON "
        "Lines (nested too deeply)",
    ),
    (
        "sweep",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:huge_number"],
        "huge_number.jsonl, line 1: not valid JSON (a huge number)",
    ),
    (
        "benchmark",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:truncated_gz"],
        "Compressed file ended before the end-of-stream marker was reached",
    ),
    (
        "layer_report",
        ["--data", "DATA:deep_nesting", "--seq_len", 16],
        "not JSON (nested too deeply)",
    ),
    # empty strings: "" was the current directory ("data file not found: ", ". has no
    # config.json") or, for --output_file, silently the default
    ("benchmark", ["--dataset", "custom_jsonl", "--data_path", " "], "--data_path is empty"),
    ("generate", ["--model", "", "--prompt", "hi"], "--model is empty"),
    (
        "sweep",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:good", "--output_file", ""],
        "--output_file is empty",
    ),  # fmt: skip
    # the sweep's plot and summary (<stem>.png, <stem>.json) overwrote such a CSV
    (
        "sweep",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:good", "--output_file", "grid.json"],
        "--output_file grid.json: the plot and summary are written to <stem>.png and "
        "<stem>.json beside the CSV and would overwrite it",
    ),
    ("sweep", ["--output_file", "grid.png"], "would overwrite it"),
    # correctness.py ignored the strategy it was given
    (
        "correctness",
        ["--dataset", "custom_jsonl", "--data_path", "DATA:good", "--exit_layer", 2]
        + ["--num_speculations", 2, "--generation_strategy", "autoregressive"],
        "compares autoregressive decoding with one of self_speculative, tree or adaptive",
    ),
    # layer_report.py scored positions past the model's context without a word
    (
        "layer_report",
        ["--data", "DATA:good", "--seq_len", 300, "--max_tokens", 300],
        "--seq_len 300 is longer than the context of",
    ),
    # --exit_layer without a draft (vocabulary or adapter) added no row and said nothing
    (
        "layer_report",
        ["--data", "DATA:good", "--exit_layer", 2],
        "--exit_layer 2 names the exit of a draft row, and there is none",
    ),
    # a thread count torch cannot start: a segfault, an abort or an overflow traceback
    (
        "layer_report",
        ["--data", "DATA:good", "--num_threads", 10**6],
        "--num_threads must be in [0, 1024] (0: torch's default), got 1000000",
    ),
    (
        "train_adapter",
        ["--exit_layer", 2, "--data", "DATA:good", "--num_threads", 2**31],
        "--num_threads must be in [0, 1024]",
    ),
    # more than the vocabulary: a topk traceback after the targets, or a broken adapter
    (
        "train_adapter",
        ["--exit_layer", 2, "--data", "DATA:good", "--top_k", 1000],
        "--top_k must be at most the model's vocabulary (320 tokens), got 1000",
    ),
    (
        "train_adapter",
        ["--exit_layer", 2, "--data", "DATA:good", "--draft_vocab_size", 10**9],
        "--draft_vocab_size must be at most the model's vocabulary (320 tokens)",
    ),
    # a negative context was reported as "num_speculations must be below the model's
    # context (-1 tokens), got -1", for an autoregressive run
    (
        "generate",
        ["--prompt", "hi", "--model_args", "max_position_embeddings=-1"],
        "max_position_embeddings must be >= 1, got -1",
    ),
    # 0 meant no context limit at all: decoding ran past every position the model was
    # trained on, without a word
    (
        "generate",
        ["--prompt", "hi", "--model_args", "max_position_embeddings=0"],
        "max_position_embeddings must be >= 1, got 0",
    ),
    # a file as the target cache was "<path>: File exists" after the model had loaded
    (
        "train_adapter",
        ["--exit_layer", 2, "--data", "DATA:good", "--cache_dir", "DATA:good"],
        "good.jsonl is a file, not a directory (choose another --cache_dir)",
    ),
    # distillation targets computed past the model's context, without a word
    (
        "train_adapter",
        ["--exit_layer", 2, "--data", "DATA:good", "--seq_len", 300],
        "--seq_len 300 is longer than the model's context (256 tokens)",
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
            "--draft_vocab_sizes must be >= 0 (0: whole vocabulary) or -1 (an adapter's own N), "
            "got -5",
        ),
        (["--prompt_sets", "xsum"], "--prompt_sets must name some of human_eval, chat, got xsum"),
        (["--adapters", "no/such/adapter"], "--adapters: no/such/adapter is not an adapter folder"),
        (
            ["--model", "models/layerskip-stdlib", "--plain_exit_layers", "16"],
            "--plain_exit_layers must be below the model's 16 layers, got 16",
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
        ("batch_bound", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        ("batch_bound", ["--engine_json", "no/such.json"], "--engine_json: no such file"),
        ("batch_bound", ["--engine_json", "README.md"], "--engine_json: "),
        (
            "batch_bound",
            ["--engine_json", "models/layerskip-stdlib/config.json"],
            "--engine_json has no",
        ),
        (
            "batch_bound",
            ["--exit_layer", "16", "--repeats", "1"],
            "--exit_layer must be in [1, 16)",
        ),
        ("batch_bound", ["--threads", "5000"], "--threads must be in [0, 1024]"),
        ("batch_bound", ["--num_speculations", "1000"], "--num_speculations must be at most 64"),
        ("batch_bound", ["--columns", "100000000"], "--columns must be at most the model's"),
        ("batch_bound", ["--model", "tests"], "tests has no config.json"),
    ],
)
def test_developer_benchmarks_bad_flags_are_one_line(
    script, argv, message, monkeypatch, capsys
) -> None:
    """benchmarks/overhead.py, train_throughput.py and batch_bound.py refuse bad values in
    one line with exit 2 (not tracebacks from deep inside a model build or a run)."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    code, stderr = run_in_process(script, argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script}.py: error: {message}")


def test_empty_output_dir_is_one_line(tiny_model_dir: Path, monkeypatch, capsys) -> None:
    """--output_dir "" was the current directory: files landed wherever the run started."""
    argv = ["--model", tiny_model_dir, "--prompt", "hi", "--output_dir", ""]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip() == (
        "generate.py: error: --output_dir is empty (give a folder; '.' for the current one)"
    )


def test_config_json_nested_too_deeply_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A config.json json.loads refuses with a RecursionError, not a JSONDecodeError."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    argv = ["--model", model, "--prompt", "hi", "--output_dir", tmp_path / "logs"]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip() == (
        f"generate.py: error: {model / 'config.json'} is not valid JSON (nested too deeply)"
    )


def test_adapter_checkpoint_that_is_not_one_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A checkpoint.pt cut short or overwritten was an UnpicklingError traceback on resume."""
    corpus = tmp_path / "corpus.py"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 40)
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "checkpoint.pt").write_bytes(b"not a checkpoint")
    argv = [
        "--model", tiny_model_dir, "--exit_layer", 2, "--data", corpus, "--seq_len", 16,
        "--max_target_tokens", 256, "--held_out_blocks", 2, "--batch_size", 2, "--epochs", 1,
        "--top_k", 4, "--output_dir", output,
    ]  # fmt: skip
    code, stderr = run_in_process("train_adapter", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "train_adapter.py: error:" in line]
    assert errors == [
        f"train_adapter.py: error: {output / 'checkpoint.pt'} is not a checkpoint of this "
        "adapter training: delete it to start over, or choose another --output_dir"
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # a NaN loss from the first step, the model still written
        (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),
        (["--weight_decay", "nan"], "--weight_decay must be a finite number >= 0, got nan"),
        (["--early_exit_e_scale", "inf"], "--early_exit_e_scale must be a finite number >= 0"),
        # nan turned gradient clipping or the time budget off without a word
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number >= 0, got nan"),
        (["--max_minutes", "nan"], "--max_minutes must be a finite number >= 0, got nan"),
        # torch's AdamW: a ValueError traceback
        (["--adam_beta1", "2"], "--adam_beta1 must be in [0, 1), got 2.0"),
        (["--adam_beta2", "nan"], "--adam_beta2 must be in [0, 1), got nan"),
        # torch.manual_seed: an overflow traceback
        (["--seed", str(2**60)], "--seed must be in [0, 4294967295], got 1152921504606846976"),
        # the tokenizer trainer aborted the process reserving memory for it
        (["--vocab_size", str(10**12)], "--vocab_size must be in [300, 1048576]"),
        (["--num_threads", str(10**6)], "--num_threads must be in [0, 1024]"),
        # a NotADirectoryError traceback (train.py did not turn OSError into a line)
        (["--output_dir", "FILE/run"], "is a file, not a directory (choose another --output_dir)"),
        # the model, tokenizer and checkpoints were written to the current directory
        (["--output_dir", ""], "--output_dir is empty"),
    ],
)
def test_train_bad_values_are_one_line(argv, message, tmp_path: Path, monkeypatch, capsys) -> None:
    """train.py refuses values that crashed it or trained a NaN model, before any data."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [str(a_file) + item[4:] if item.startswith("FILE/") else item for item in argv]
    base = ["--preset", "tiny", "--data", str(tmp_path / "*.py"), "--max_tokens", "64"]
    base += ["--output_dir", str(tmp_path / "run")]
    code, stderr = run_in_process("train", [*base, *argv], monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ({"max_position_embeddings": "abc"}, "max_position_embeddings must be an integer >= 1"),
        ({"max_position_embeddings": None}, "max_position_embeddings must be an integer >= 1"),
        ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
        ({"hidden_size": -64}, "hidden_size must be an integer >= 1, got -64"),
        ({"num_key_value_heads": 3}, "num_attention_heads (4) must be a multiple of"),
        ({"hidden_size": 66}, "hidden_size (66) must be a multiple of num_attention_heads (4)"),
        ({"hidden_act": "nosuchact"}, "transformers cannot build a causal LM from it"),
        ({"rms_norm_eps": "x"}, "invalid architecture (llama)"),
        ({"intermediate_size": None}, "intermediate_size must be an integer >= 1"),
    ],
)
def test_train_bad_architecture_values_are_one_line(
    architecture, message, tmp_path: Path, monkeypatch, capsys
) -> None:
    """--config_file sizes that raised ValueError, TypeError, ZeroDivisionError or a
    negative-dimension RuntimeError from inside the model's constructor."""
    values = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    values |= dict(num_attention_heads=4, num_key_value_heads=2)
    values |= architecture
    if architecture == {"intermediate_size": None}:  # left out: not transformers' default
        del values["intermediate_size"]
        message = "must give the model's sizes: intermediate_size missing"
    config_file = tmp_path / "architecture.json"
    config_file.write_text(json.dumps(values))
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n" * 200)
    argv = ["--config_file", config_file, "--data", tmp_path / "*.py", "--vocab_size", "300"]
    argv += ["--seq_len", "16", "--max_tokens", "64", "--output_dir", tmp_path / "run"]
    code, stderr = run_in_process("train", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # a list of 10^12 block indices a step: memory grew, SIGTERM waited for the step
        (["--batch_size", str(10**12)], "needs that many blocks a micro-step, but the data"),
        # written into generation_config.json, which generate.py then refused
        (["--exit_layer", "100"], "--exit_layer must be at most the model's 4 layers, got 100"),
        (["--num_speculations", str(10**11)], "--num_speculations must be at most 64"),
    ],
)
def test_train_settings_the_model_or_data_cannot_serve_are_one_line(
    argv, message, tmp_path: Path, monkeypatch, capsys
) -> None:
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n" * 200)
    base = ["--preset", "tiny", "--data", tmp_path / "*.py", "--vocab_size", "300"]
    base += ["--seq_len", "16", "--max_tokens", "64", "--output_dir", tmp_path / "run"]
    code, stderr = run_in_process("train", [*base, *argv], monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr
    assert not (tmp_path / "run" / "generation_config.json").exists()


def test_one_process_scripts_refuse_torchrun_variables_before_joining(
    tiny_model_dir: Path, monkeypatch, capsys
) -> None:
    """generate.py with RANK/WORLD_SIZE of two processes (and a rendezvous address) waited
    for a second process that never came; it runs as one process, so it says so at once."""
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", "29581")
    argv = ["--model", tiny_model_dir, "--prompt", "hi", "--max_steps", "2"]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "generate.py: error: generate.py runs as one process: use python or torchrun "
        "--nproc_per_node 1"
    )


def test_sweep_refuses_to_write_over_files_beside_its_csv(
    tiny_model_dir: Path, data_files: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    """--output_file model/config.csv replaced the model's config.json with the sweep's
    summary (and config.png, tokenizer.json the same way)."""
    folder = tmp_path / "model_copy"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "plot.png").write_bytes(b"not ours")
    for output, kept, message in (
        (folder / "config.csv", folder / "config.json", "is not a sweep summary"),
        (tmp_path / "plot.csv", tmp_path / "plot.png", "no sweep summary beside it"),
    ):
        before = kept.read_bytes()
        argv = ["--model", tiny_model_dir, "--dataset", "custom_jsonl"]
        argv += ["--data_path", data_files["good"], "--num_samples", "1", "--max_steps", "2"]
        argv += ["--exit_layer_first", "1", "--exit_layer_last", "1"]
        argv += ["--num_speculations_last", "1", "--output_file", output]
        argv += ["--output_dir", tmp_path / "logs"]
        code, stderr = run_in_process("sweep", argv, monkeypatch, capsys)
        assert code == EXIT_ERROR and "Traceback" not in stderr
        assert message in stderr.strip().splitlines()[-1]
        assert kept.read_bytes() == before and not output.exists()


def test_empty_saved_dataset_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A save_to_disk folder without rows was an IndexError from inside datasets."""
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"prompt": [], "response": []}).save_to_disk(str(folder))
    argv = ["--model", tiny_model_dir, "--dataset", "custom_jsonl", "--data_path", folder]
    code, stderr = run_in_process(
        "benchmark", [*argv, "--output_dir", tmp_path / "logs"], monkeypatch, capsys
    )
    assert code == EXIT_ERROR and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "benchmark.py: error:" in line]
    assert errors == [f"benchmark.py: error: {folder} holds no rows"]


def test_prompt_continued_at_end_of_input_is_answered() -> None:
    """A last line ending in a backslash (continued, then EOF) was dropped without a word."""
    import io

    from generate import read_prompts

    assert list(read_prompts(io.StringIO("a\nb \\\nc\\\n"))) == ["a", "b \nc"]
    assert list(read_prompts(io.StringIO("first\ndef f():\\"))) == ["first", "def f():"]
    assert list(read_prompts(io.StringIO("first\n \\\n"))) == ["first"]  # nothing left


def test_prompts_from_windows_line_ends_are_the_same_prompts() -> None:
    """CRLF input gave every prompt a trailing carriage return and broke continuations."""
    import io

    from generate import read_prompts

    windows = io.StringIO("def add(a, b):\r\nThe quick\\\r\nbrown fox\r\n", newline="")
    assert list(read_prompts(windows)) == ["def add(a, b):", "The quick\nbrown fox"]


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ("\0" * (2 << 20), "longer than"),  # /dev/zero: no newline, ever
        ("prompt\n\0\1\2\n", "NUL bytes"),
    ],
    ids=["endless line", "binary"],
)
def test_binary_standard_input_is_refused_not_read_into_memory(stream: str, message: str) -> None:
    import io

    from generate import read_prompts
    from self_speculation import ConfigError

    with pytest.raises(ConfigError, match=message):
        list(read_prompts(io.StringIO(stream)))


def test_build_strategy_names_an_argument_of_another_type() -> None:
    from self_speculation import build_strategy

    with pytest.raises(TypeError, match="passes must be a ForwardPasses"):
        build_strategy(object(), object(), object())


@pytest.mark.parametrize(
    ("flag", "content", "message"),
    [
        ("--recipe", b'{"flags": {"seq_len": "\xff"}}', "cannot read recipe"),
        ("--recipe", b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        ("--config_file", b'{"hidden_size": 64, "name": "caf\xe9"}', "cannot read architecture"),
        ("--config_file", b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    ],
    ids=["recipe latin-1", "recipe nested", "architecture latin-1", "architecture nested"],
)
def test_train_unreadable_json_file_is_one_line(
    flag, content, message, tmp_path, monkeypatch, capsys
) -> None:
    """A recipe or architecture file that is not UTF-8, or nested past Python's recursion
    limit, was a UnicodeDecodeError / RecursionError traceback."""
    path = tmp_path / "file.json"
    path.write_bytes(content)
    (tmp_path / "corpus.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    argv = ["--data", str(tmp_path / "*.py"), "--max_tokens", "64", "--vocab_size", "300"]
    argv += [flag, str(path)]
    argv += ["--output_dir", str(tmp_path / "run")]
    code, stderr = run_in_process("train", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR
    errors = [line for line in stderr.splitlines() if "train.py: error:" in line]
    assert "Traceback" not in stderr and len(errors) == 1 and message in errors[0], stderr


def test_adapter_config_nested_too_deeply_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """--draft_adapter with an adapter_config.json json.loads refuses with a RecursionError."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    argv = ["--prompt", "hi", "--draft_adapter", tmp_path / "adapter"]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip() == (
        f"generate.py: error: --draft_adapter: {tmp_path / 'adapter' / 'adapter_config.json'} "
        "is malformed (JSON nested too deeply)"
    )


def test_batch_bound_refuses_an_engine_run_of_other_settings(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Bounding a run measured with another k (or exit layer, or model) would print a
    bound that belongs to neither: refused in one line, before any timing."""
    row = dict(row_steps=10, tokens=100, seconds=1.0, tokens_per_second=100.0)
    rows = [
        dict(row, batch_size=size, path=path)
        for size, path in ((1, "self_speculative"), (8, "autoregressive"), (8, "self_speculative"))
    ]
    engine = tmp_path / "engine.json"
    engine.write_text(json.dumps({"arguments": {"num_speculations": 3}, "batch": rows}))
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    code, stderr = run_in_process(
        "batch_bound", ["--engine_json", str(engine)], monkeypatch, capsys
    )
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "batch_bound.py: error: --engine_json measured num_speculations = 3; pass "
        "--num_speculations 3 to bound that run (got 5)"
    )
    # Its step count sets the columns attention reads: a hostile one is refused too.
    engine.write_text(json.dumps({"arguments": {"max_steps": "many"}, "batch": rows}))
    code, stderr = run_in_process(
        "batch_bound", ["--engine_json", str(engine)], monkeypatch, capsys
    )
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "batch_bound.py: error: --engine_json: max_steps must be a positive integer, got 'many'"
    )


@pytest.mark.parametrize(
    "script", ["engine", "adapter", "drafting_bound", "batch_bound", "heldout_accuracy", "sampled"]
)
def test_benchmark_output_replaces_only_its_own_earlier_result(
    script, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A benchmark's --output that names another file (README.md, a config) or lies in a
    model folder is one line before any work, and the file is left as it was; an earlier
    result of the same benchmark may be replaced (a rerun)."""
    from self_speculation.errors import ConfigError
    from self_speculation.output_safety import check_output_file

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    code, stderr = run_in_process(script, ["--output", notes], monkeypatch, capsys)
    assert code == EXIT_ERROR and "Traceback" not in stderr
    assert "exists and is not an earlier" in stderr and len(stderr.strip().splitlines()) == 1
    assert notes.read_text() == '{"mine": 1}\n'
    shipped = root / "models" / "layerskip-stdlib" / "result.json"
    code, stderr = run_in_process(script, ["--output", shipped], monkeypatch, capsys)
    assert code == EXIT_ERROR and "shipped with the project" in stderr
    kind = {"adapter": "adapter_benchmark"}.get(script, script)
    notes.write_text(json.dumps({"benchmark": kind}))
    assert check_output_file(str(notes), kind, ()) == notes
    # An unmarked result written before documents were marked: its keys say what it is.
    notes.write_text(json.dumps({"arguments": {}, "rows": []}))
    assert check_output_file(str(notes), "drafting_bound", ("arguments", "rows")) == notes
    with pytest.raises(ConfigError, match="not an earlier engine result"):
        check_output_file(str(notes), "engine", ("arguments", "environment"))
