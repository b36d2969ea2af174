"""Nothing written before is changed unless the user asks (--overwrite True), two runs never
write one folder at once, damaged model files are one line naming the file, and a check
that cannot pass honestly is refused (issue 24)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import run_in_process

from arguments import EXIT_ERROR, setup_logging
from self_speculation.errors import ConfigError
from self_speculation.output_safety import (
    check_output_dir,
    hold_output_dir,
    output_dir_lock,
    release_output_dirs,
)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPOSITORY_ROOT / "models" / "layerskip-stdlib"


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def one_error(code: int, stderr: str, script: str, fragment: str) -> None:
    assert code == EXIT_ERROR, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if f"{script}: error:" in line]
    assert len(errors) == 1, stderr
    assert fragment in errors[0], errors[0]


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "def add(a, b):", "response": " return a"}) + "\n")
    return path


def script_argv(script: str, model: Path, data: Path) -> list[object]:
    """A cheap, valid command line of ``script`` (its --output_dir added by the caller)."""
    jsonl = ["--dataset", "custom_jsonl", "--data_path", data, "--max_steps", 2]
    return {
        "generate": ["--model", model, "--prompt", "hi", "--max_steps", 2],
        "benchmark": ["--model", model, *jsonl],
        "correctness": ["--model", model, *jsonl],
        "sweep": ["--model", model, *jsonl, "--exit_layer_last", 1, "--num_speculations_last", 1],
        "eval": ["--model", model, "--tasks", "layerskip_mc", "--limit", 1],
        "layer_report": ["--model", model, "--data", data, "--max_tokens", 16, "--seq_len", 8],
        "train_adapter": ["--model", model, "--exit_layer", 1, "--data", data],
    }[script]


SCRIPTS = [
    "generate", "benchmark", "correctness", "sweep", "eval", "layer_report", "train_adapter",
]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_model_folder_is_refused_as_output_dir(
    script: str, model_copy: Path, data_file: Path, monkeypatch, capsys
) -> None:
    before = snapshot(model_copy)
    argv = [*script_argv(script, model_copy, data_file), "--output_dir", model_copy]
    code, stderr = run_in_process(script, argv, monkeypatch, capsys)
    one_error(code, stderr, f"{script}.py", f"{model_copy} holds a model (config.json and")
    assert "--overwrite True" in stderr
    assert snapshot(model_copy) == before


def run_train(argv: list[object], capsys) -> tuple[int, str]:
    setup_logging()  # to this test's stderr (an earlier test's handler writes to a closed one)
    train = importlib.import_module("train")
    code = train.main([str(item) for item in argv])
    return code, capsys.readouterr().err


TRAIN = ["--preset", "tiny", "--batch_size", 1, "--seq_len", 16, "--max_tokens", 64]


def test_train_refuses_a_model_folder_and_the_shipped_model(
    model_copy: Path, data_file: Path, capsys
) -> None:
    before = snapshot(model_copy)
    code, stderr = run_train([*TRAIN, "--data", data_file, "--output_dir", model_copy], capsys)
    one_error(code, stderr, "train.py", "holds a model (config.json and model.safetensors)")
    assert snapshot(model_copy) == before
    if SHIPPED_MODEL.is_dir():
        shipped = snapshot(SHIPPED_MODEL)
        for resume in ("False", "True"):
            argv = [*TRAIN, "--data", data_file, "--output_dir", SHIPPED_MODEL, "--resume", resume]
            code, stderr = run_train(argv, capsys)
            one_error(code, stderr, "train.py", "is a folder shipped with the project")
        assert snapshot(SHIPPED_MODEL) == shipped


def test_train_refuses_an_earlier_runs_files_and_overwrite_starts_over(
    data_file: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1}\n')
    code, stderr = run_train([*TRAIN, "--data", data_file, "--output_dir", run], capsys)
    one_error(code, stderr, "train.py", "already holds train_log.jsonl from an earlier run")
    assert (run / "train_log.jsonl").read_text() == '{"step": 1}\n'


def test_an_exit_adapter_folder_is_refused(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    argv = ["--model", tiny_model_dir, "--prompt", "hi", "--output_dir", adapter]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    one_error(code, stderr, "generate.py", "holds an exit adapter (adapter_config.json)")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json"]


@pytest.mark.skipif(not SHIPPED_MODEL.is_dir(), reason="no shipped model in this install")
@pytest.mark.parametrize("script", ["generate", "layer_report"])
def test_shipped_folders_are_refused_by_default(
    script: str, tiny_model_dir: Path, data_file: Path, monkeypatch, capsys
) -> None:
    before = snapshot(SHIPPED_MODEL)
    argv = [*script_argv(script, tiny_model_dir, data_file), "--output_dir", SHIPPED_MODEL]
    code, stderr = run_in_process(script, argv, monkeypatch, capsys)
    one_error(code, stderr, f"{script}.py", "is a folder shipped with the project")
    assert snapshot(SHIPPED_MODEL) == before


def test_overwrite_true_writes_beside_a_model(model_copy: Path, monkeypatch, capsys) -> None:
    argv = ["--model", model_copy, "--prompt", "hi", "--max_steps", 2, "--output_dir", model_copy]
    code, stderr = run_in_process("generate", [*argv, "--overwrite", "True"], monkeypatch, capsys)
    assert code == 0, stderr
    assert len(list(model_copy.glob("generate_*.json"))) == 1
    release_output_dirs()


def test_layer_report_keeps_an_earlier_report(
    tiny_model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    output = tmp_path / "report"
    output.mkdir()
    (output / "layer_report.json").write_text('{"earlier": true}')
    argv = [*script_argv("layer_report", tiny_model_dir, data_file), "--output_dir", output]
    code, stderr = run_in_process("layer_report", argv, monkeypatch, capsys)
    one_error(code, stderr, "layer_report.py", "already holds layer_report.json")
    assert (output / "layer_report.json").read_text() == '{"earlier": true}'


def test_output_dir_expands_home(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["--model", tiny_model_dir, "--prompt", "hi", "--max_steps", 2, "--output_dir", "~/x"]
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    assert code == 0, stderr
    assert len(list((tmp_path / "x").glob("generate_*.json"))) == 1
    assert not Path("~").exists()
    release_output_dirs()


@pytest.mark.parametrize("script", ["sweep", "generate"])
def test_a_second_run_into_a_folder_in_use_is_refused(
    script: str, held_folder: Path, tiny_model_dir: Path, data_file: Path, monkeypatch, capsys
) -> None:
    argv = [*script_argv(script, tiny_model_dir, data_file), "--output_dir", held_folder]
    code, stderr = run_in_process(script, argv, monkeypatch, capsys)
    one_error(code, stderr, f"{script}.py", "is in use by another run writing there")
    assert os.listdir(held_folder) == []


def test_a_second_training_run_into_a_folder_in_use_is_refused(
    held_folder: Path, data_file: Path, capsys
) -> None:
    code, stderr = run_train([*TRAIN, "--data", data_file, "--output_dir", held_folder], capsys)
    one_error(code, stderr, "train.py", "is in use by another run writing there")
    assert os.listdir(held_folder) == []


def test_locks_shared_and_exclusive(tmp_path: Path) -> None:
    """Runs adding timestamped files share a folder; one writing fixed names has it alone."""
    code = (
        "import sys\n"
        "from self_speculation.output_safety import output_dir_lock\n"
        "with output_dir_lock(sys.argv[1], exclusive=sys.argv[2] == 'x'):\n"
        "    pass\n"
    )

    def other(kind: str) -> int:
        command = [sys.executable, "-c", code, str(tmp_path), kind]
        return subprocess.run(command, cwd=REPOSITORY_ROOT, capture_output=True).returncode

    hold_output_dir(tmp_path)
    try:
        assert other("s") == 0  # shared with shared
        assert other("x") != 0  # exclusive refused
    finally:
        release_output_dirs()
    assert other("x") == 0
    with output_dir_lock(tmp_path):
        assert other("s") != 0
    assert other("x") == 0  # released when the block ends


def test_check_output_dir_rules(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    check_output_dir(str(fresh))  # a new folder: fine
    fresh.mkdir()
    (fresh / "model.safetensors").write_bytes(b"")
    check_output_dir(str(fresh))  # weights without config.json: not a model
    (fresh / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a model"):
        check_output_dir(str(fresh))
    check_output_dir(str(fresh), overwrite=True)
    check_output_dir(str(fresh), allow=("holds a model",))
    with pytest.raises(ConfigError, match="already holds notes.txt"):
        (tmp_path / "notes.txt").write_text("x")
        check_output_dir(str(tmp_path), own_files=("notes.txt",))


def test_correctness_refuses_sampling(
    tiny_model_dir: Path, data_file: Path, tmp_path, monkeypatch, capsys
) -> None:
    """--sample True reported "100% differ" with "passed": false and exited 0."""
    argv = [*script_argv("correctness", tiny_model_dir, data_file), "--sample", "True"]
    code, stderr = run_in_process(
        "correctness", [*argv, "--output_dir", tmp_path / "logs"], monkeypatch, capsys
    )
    one_error(code, stderr, "correctness.py", "checks greedy decoding only")


def truncated_gguf(tmp_path: Path) -> Path:
    from self_speculation.loading import smollm2_gguf_path

    try:
        source = Path(smollm2_gguf_path())
    except Exception:
        source = None
    path = tmp_path / "t.gguf"
    if source is not None and source.is_file():
        with open(source, "rb") as stream:
            path.write_bytes(stream.read(1_000_000))  # head -c 1000000
    else:  # a header promising metadata the file does not have
        path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") * 2)
    return path


@pytest.mark.parametrize("script", ["generate", "layer_report", "train"])
def test_a_truncated_gguf_is_one_line(
    script: str, data_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    model = truncated_gguf(tmp_path)
    output = tmp_path / "out"
    if script == "train":
        argv = ["--model", model, "--data", data_file, "--max_tokens", 64, "--output_dir", output]
        code, stderr = run_train(argv, capsys)
    else:
        argv = [*script_argv(script, model, data_file), "--output_dir", output]
        code, stderr = run_in_process(script, argv, monkeypatch, capsys)
    one_error(code, stderr, f"{script}.py", f"{model} is not a valid GGUF file")


def test_damaged_safetensors_and_tokenizer_name_the_file(
    model_copy: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    argv = ["--model", model_copy, "--prompt", "hi", "--output_dir", tmp_path / "logs"]
    tokenizer = model_copy / "tokenizer.json"
    tokenizer.write_text('{"version": "1.0", "model": {"type": "BPE"}}')  # JSON, not a tokenizer
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    one_error(code, stderr, "generate.py", f"{tokenizer} is not a tokenizer")
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, stderr = run_in_process("generate", argv, monkeypatch, capsys)
    one_error(code, stderr, "generate.py", f"{weights} is not a valid safetensors file")


def test_train_adapter_continues_its_own_folder_but_not_a_copied_adapter(
    tiny_model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    argv = [*script_argv("train_adapter", tiny_model_dir, data_file), "--output_dir", adapter]
    code, stderr = run_in_process("train_adapter", argv, monkeypatch, capsys)
    one_error(code, stderr, "train_adapter.py", "holds an exit adapter (adapter_config.json)")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json"]
    from train_adapter import CHECKPOINT_NAME, AdapterTrainArguments

    (adapter / CHECKPOINT_NAME).write_bytes(b"")  # its own run: continued, not refused
    AdapterTrainArguments(output_dir=str(adapter), exit_layer=1, data=[str(data_file)])
