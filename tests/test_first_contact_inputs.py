"""A researcher's next steps after the README: a JSON array file as --data_path (what
datasets' to_json(lines=False) and most hand-made .json data are); a bad prompt named by the
data row it came from, not only by its place after shuffling; and the folders train.py and
train_adapter.py write that are not models, given as --model, refused with what to pass."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_model, make_tiny_tokenizer

from arguments import BenchmarkArguments
from data import DataError, load_examples
from self_speculation import ConfigError, Generator, ModelLoadError, load_model_and_tokenizer
from self_speculation.benchmarking import check_prompts
from self_speculation.draft import AdapterConfig, ExitAdapter, save_adapter
from self_speculation.training.checkpointing import CHECKPOINT_DIR, TRAINER_STATE_FILE

ROWS = [
    {"prompt": "def add(a, b):", "response": "\n    return a + b\n"},
    {"prompt": "def sub(a, b):", "response": "\n    return a - b\n"},
    {"prompt": "class Foo:", "response": "\n    pass\n"},
]


def _examples(path: Path, **overrides) -> list:
    args = BenchmarkArguments(dataset="custom_jsonl", data_path=str(path), **overrides)
    return load_examples(args, seed=0)


@pytest.mark.parametrize("indent", [None, 2], ids=["one_line", "pretty_printed"])
def test_a_json_array_file_gives_the_rows_its_jsonl_twin_gives(
    tmp_path: Path, indent: int | None
) -> None:
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS, indent=indent))
    expected, got = _examples(lines), _examples(array)
    assert [(e.input, e.output, e.source_row) for e in got] == [
        (e.input, e.output, e.source_row) for e in expected
    ]
    assert len(got) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"prompt": "a", "response": "b"}, 3]', "record 2: expected a JSON object"),
        ("[]", "holds no rows"),
        ('[{"prompt": "a", "response": "b"}\n', "is not one JSON array of objects"),
        ('["a"]\n["b"]\n', "is not one JSON array of objects"),
    ],
)
def test_a_broken_json_array_file_is_one_clear_error(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        _examples(path)


def test_an_empty_prompt_names_its_row_of_the_data(tmp_path: Path) -> None:
    """Shuffled (the default), sample 0 can be any row: the message names the file's row."""
    path = tmp_path / "rows.jsonl"
    rows = [*ROWS, {"prompt": " ", "response": "x"}, *ROWS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = _examples(path)
    blank = next(example for example in examples if not example.input.strip())
    assert blank.source_row == 3 and blank.index != 3  # the seed moved it
    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    with pytest.raises(ConfigError, match=rf"sample {blank.index} \(row 4 of the data\)"):
        check_prompts(generator, examples)


REPOSITORY = Path(__file__).resolve().parents[1]


def _exit_adapter(folder: Path, base: Path) -> Path:
    generator = Generator(*load_model_and_tokenizer(str(base)))
    layerwise = generator.layerwise
    config = AdapterConfig(
        exit_layer=2,
        num_layers=layerwise.num_layers,
        hidden_size=layerwise.config.hidden_size,
        init_layer=1,
        base_model=str(base),
    )
    save_adapter(folder, ExitAdapter(layerwise, 2, 1), config, None)
    return folder


def test_an_exit_adapter_as_model_says_to_pass_it_as_draft_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """It was called a PEFT adapter, to be merged with peft's merge_and_unload."""
    adapter = _exit_adapter(tmp_path / "adapter", tiny_model_dir)
    with pytest.raises(ModelLoadError) as caught:
        load_model_and_tokenizer(str(adapter))
    message = str(caught.value)
    assert "exit adapter" in message and "PEFT" not in message
    assert f"--model {tiny_model_dir} --draft_adapter {adapter}" in message
    done = subprocess.run(
        [sys.executable, "generate.py", "--model", str(adapter), "--prompt", "def"]
        + ["--output_dir", str(tmp_path / "logs")],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f"generate.py: error: {adapter} is an exit adapter")
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_a_training_checkpoint_as_model_points_to_the_runs_folder(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """train.py's checkpoint holds a config.json, DCP shards and its trainer state, no
    weights file and no tokenizer: it was told to save a tokenizer there."""
    checkpoint = tmp_path / "run" / CHECKPOINT_DIR
    checkpoint.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", checkpoint / "config.json")
    (checkpoint / "__0_0.distcp").write_bytes(b"shard")
    (checkpoint / TRAINER_STATE_FILE).write_bytes(b"state")
    with pytest.raises(ModelLoadError) as caught:
        load_model_and_tokenizer(str(checkpoint))
    message = str(caught.value)
    assert "train.py checkpoint" in message and "tokenizer" not in message
    assert f"pass the run's folder, {checkpoint.parent}" in message
