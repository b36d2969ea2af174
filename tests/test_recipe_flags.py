"""The recipe's flags against what a run does with them: a setting that another one switches
off is refused (not ignored without a word), and the log reports the layer-dropout scale
each step trained at."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from self_speculation.distributed import DistributedContext
from self_speculation.errors import ArgumentsError, ConfigError
from self_speculation.training.config import (
    DataArguments,
    LayerSkipArguments,
    ModelArguments,
    TrainConfig,
    TrainingArguments,
    parse_config,
)
from self_speculation.training.loop import (
    HORIZON_PROBE_STEPS,
    LOG_FILE,
    Trainer,
    _check_resumed_settings,
)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"early_exit_loss": False, "early_exit_curriculum": "gradual"}, "early_exit_curriculum"),
        ({"early_exit_loss": False, "early_exit_scale": "sum"}, "early_exit_scale"),
        ({"early_exit_loss": False, "early_exit_e_scale": 0.5}, "early_exit_e_scale"),
        (
            {"early_exit_loss": False, "early_exit_position_fraction": 0.5},
            "early_exit_position_fraction",
        ),
        ({"layer_dropout_p_max": 0.0, "layer_dropout_shape": "linear"}, "layer_dropout_shape"),
        (
            {"layer_dropout_p_max": 0.0, "layer_dropout_schedule": "exponential"},
            "layer_dropout_schedule",
        ),
        ({"early_exit_curriculum": "gradual", "early_exit_rotation": 3}, "early_exit_rotation"),
    ],
)
def test_a_setting_switched_off_by_another_is_refused(settings: dict, named: str) -> None:
    """A curriculum with the early-exit loss off (say) would train the last layer alone."""
    with pytest.raises(ConfigError, match=f"--{named} .* has no effect"):
        LayerSkipArguments(**settings)


def test_settings_that_take_effect_are_accepted() -> None:
    LayerSkipArguments(layer_dropout_p_max=0.0, early_exit_loss=False)  # plain training
    LayerSkipArguments(early_exit_curriculum="rotational", early_exit_rotation=3)
    LayerSkipArguments(layer_dropout_schedule="exponential", early_exit_curriculum="gradual")


def test_a_recipe_ablated_on_the_command_line_leaves_out_what_it_switches_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A recipe file's curriculum, with the early-exit loss switched off after it (plain
    training as the recipe's control): the curriculum the user never typed is left at its
    default with a log line; typed on the command line, it is refused."""
    recipe = ["--recipe", "configs/recipe-smollm2-135m.json"]
    with caplog.at_level("INFO"):
        config = parse_config([*recipe, "--early_exit_loss", "False", "--data", "x"])
    assert config.layerskip.early_exit_curriculum == "none"
    assert not config.layerskip.early_exit_loss
    assert "recipe's --early_exit_curriculum gradual has no effect" in caplog.text
    with pytest.raises(ConfigError, match="--early_exit_curriculum gradual has no effect"):
        parse_config(
            [*recipe, "--early_exit_loss", "False", "--early_exit_curriculum", "gradual"]
            + ["--data", "x"]
        )


def test_the_log_reports_the_dropout_scale_the_step_trained_at(tmp_path: Path) -> None:
    """A time budget holds S(t) at S(0) = 0 until step 10 has measured the speed; step 10
    trained at 0, and its log line said so (it reported S(9) under the horizon fixed after)."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).train()
    training = TrainingArguments(
        output_dir=str(tmp_path), batch_size=2, max_minutes=60.0, warmup_steps=1, bf16=False,
        save_every_minutes=0, stop_after_steps=HORIZON_PROBE_STEPS,
    )  # fmt: skip
    recipe = LayerSkipArguments(layer_dropout_p_max=0.5, layer_dropout_schedule="exponential")
    config = TrainConfig(ModelArguments(), DataArguments(data=["(random)"]), recipe, training)
    blocks = torch.randint(0, model.config.vocab_size, (32, 8))
    trainer = Trainer(config, model, None, blocks, DistributedContext(), torch.device("cpu"))
    trainer.run()
    assert trainer.progress.total_steps is not None  # the horizon was fixed at step 10
    records = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [record["step"] for record in records] == [HORIZON_PROBE_STEPS]
    assert records[0]["layer_dropout_scale"] == 0.0


@pytest.mark.parametrize("flag", ["--noearly_exit_loss", "--nobf16"])
def test_a_negative_flag_given_a_value_is_an_error_not_a_success(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--nobf16 True`` used to print simple-parsing's complaint and exit with status 0:
    nothing trained, and a script running train.py was told it succeeded."""
    with pytest.raises(ArgumentsError, match="Negative flags cannot be passed a value"):
        parse_config([flag, "True", "--preset", "tiny", "--data", "x", "--max_tokens", "9"])
    train = importlib.import_module("train")
    argv = [flag, "True", "--preset", "tiny", "--data", "x", "--max_tokens", "9"]
    assert train.main([*argv, "--output_dir", str(tmp_path / "run")]) == 2
    assert "error: Negative flags" in capsys.readouterr().err


def test_a_checkpoint_that_set_a_switched_off_setting_still_resumes(tmp_path: Path) -> None:
    """A run from before the refusal (``--early_exit_loss False --early_exit_curriculum
    gradual``) resumes without the curriculum, which never did anything; a setting that
    took effect must still match."""
    now = TrainConfig(
        ModelArguments(preset="tiny"),
        DataArguments(data=["x"]),
        LayerSkipArguments(early_exit_loss=False),
        TrainingArguments(output_dir=str(tmp_path), max_tokens=9),
    )
    before = dataclasses.asdict(now)
    before["layerskip"].update(early_exit_curriculum="gradual", early_exit_rotation=3)
    _check_resumed_settings({"config": before}, now, DistributedContext(), tmp_path)
    before["layerskip"].update(early_exit_loss=True)
    with pytest.raises(ConfigError, match="--early_exit_loss is False"):
        _check_resumed_settings({"config": before}, now, DistributedContext(), tmp_path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "models/layerskip-stdlib", "--vocab_size", "1024"], "--vocab_size 1024 sizes"),
        (["--preset", "tiny", "--dataset_split", "validation"], "without --dataset"),
        (["--preset", "tiny", "--dataset_config", "python"], "without --dataset"),
    ],
)
def test_model_and_data_flags_without_effect_are_refused(flags: list[str], message: str) -> None:
    """--vocab_size with --model (its own tokenizer is kept) and --dataset_config /
    --dataset_split without --dataset were ignored without a word."""
    with pytest.raises(ConfigError, match=message):
        parse_config([*flags, "--data", "x.py", "--max_tokens", "9"])
