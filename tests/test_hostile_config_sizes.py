"""A model folder whose config.json holds absurd sizes is refused in one line, before the
model is built.

``num_hidden_layers`` of 20000 (or 10**9) on a 4-layer model's weights built layer after
layer for minutes (hours) before the loaded weights could be found missing, and train.py's
``--config_file`` built them until the kernel killed it; a ``num_attention_heads`` of 0
ended in a ZeroDivisionError traceback from the config class's own check. A FIFO in place
of config.json, the weights, tokenizer.json or generation_config.json blocked the run
forever on opening it (no output at all); a config.json that is a loop of links was called
missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from self_speculation.errors import ConfigError, ModelLoadError
from self_speculation.loading import inspect_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _edited(model_dir: Path, tmp_path: Path, **values: object) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    for entry in model_dir.iterdir():
        (directory / entry.name).symlink_to(entry)
    config = json.loads((model_dir / "config.json").read_text())
    (directory / "config.json").unlink()
    (directory / "config.json").write_text(json.dumps({**config, **values}))
    return directory


@pytest.mark.parametrize("layers", [41, 20_000, 10**9])
def test_more_layers_than_the_weights_hold_tensors_is_refused_before_building(
    model_dir: Path, tmp_path: Path, layers: int
) -> None:
    directory = _edited(model_dir, tmp_path, num_hidden_layers=layers)
    with pytest.raises(ModelLoadError, match=f"declares {layers} decoder layers, more than"):
        inspect_model(str(directory))


def test_the_model_s_own_layer_count_passes(model_dir: Path) -> None:
    facts = inspect_model(str(model_dir))
    assert facts is not None and facts.num_layers == 4


def test_zero_attention_heads_is_one_line(model_dir: Path, tmp_path: Path) -> None:
    directory = _edited(model_dir, tmp_path, num_attention_heads=0)
    with pytest.raises(ModelLoadError, match="config.json: .*by zero"):
        inspect_model(str(directory))


def test_generate_refuses_a_billion_layers_in_one_line(model_dir: Path, tmp_path: Path) -> None:
    directory = _edited(model_dir, tmp_path, num_hidden_layers=10**9)
    result = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), "--model", str(directory),
         "--prompt", "def f", "--max_steps", "4", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "declares 1000000000 decoder layers" in result.stderr.strip().splitlines()[-1]


def _timeout(number: int, frame: object) -> None:
    raise TimeoutError("blocked opening a file")


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]
)
def test_a_fifo_in_a_model_folder_is_refused_not_waited_on(
    model_dir: Path, tmp_path: Path, name: str
) -> None:
    directory = _edited(model_dir, tmp_path)
    (directory / name).unlink()
    os.mkfifo(directory / name)
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(20)
    try:
        with pytest.raises(ModelLoadError, match=f"{name} is not a regular file"):
            inspect_model(str(directory))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_config_json_that_is_a_loop_of_links_says_so(model_dir: Path, tmp_path: Path) -> None:
    directory = _edited(model_dir, tmp_path)
    (directory / "config.json").unlink()
    (directory / "config.json").symlink_to("config.json")
    with pytest.raises(ModelLoadError, match="config.json is a broken link"):
        inspect_model(str(directory))


def test_train_refuses_an_architecture_larger_than_memory_before_building_it() -> None:
    from self_speculation.training import presets

    values = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=None)
    with pytest.raises(ConfigError, match="more than this machine's .* GiB of memory"):
        presets._check_sizes({**values, "num_hidden_layers": 10**9, "vocab_size": 300}, "x")
    config = presets.architecture_config("tiny", None, 300, 32, special)
    assert config.num_hidden_layers == presets.PRESETS["tiny"]["num_hidden_layers"]


def test_a_nan_rope_theta_is_named(model_dir: Path, tmp_path: Path) -> None:
    """NaN made every rotary table NaN, refused by the load-time probe as "its rotary
    embedding gives a position different tables", which named neither the field nor NaN."""
    rope = {"rope_theta": float("nan"), "rope_type": "default"}
    directory = _edited(model_dir, tmp_path, rope_parameters=rope)
    with pytest.raises(ModelLoadError, match=r"config.json: rope_parameters\.rope_theta is NaN"):
        inspect_model(str(directory))
