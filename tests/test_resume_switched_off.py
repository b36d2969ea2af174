"""A checkpoint of a run that set a flag train.py now refuses as without effect (--vocab_size
with --model, --dataset_split / --dataset_config without --dataset) still resumes: the flag
cannot be given again, and without it the resume check saw a changed setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from self_speculation.distributed import DistributedContext
from self_speculation.errors import ConfigError
from self_speculation.training.config import (
    DataArguments,
    LayerSkipArguments,
    ModelArguments,
    TrainConfig,
    TrainingArguments,
)
from self_speculation.training.loop import _check_resumed_settings


def _config(tmp_path: Path, model: ModelArguments, data: DataArguments) -> TrainConfig:
    training = TrainingArguments(output_dir=str(tmp_path), max_tokens=9)
    return TrainConfig(model, data, LayerSkipArguments(), training)


@pytest.mark.parametrize(
    ("group", "then"),
    [
        ("model", {"vocab_size": 2048}),
        ("data", {"dataset_split": "validation"}),
        ("data", {"dataset_config": "python"}),
    ],
    ids=["vocab_size", "dataset_split", "dataset_config"],
)
def test_a_checkpoint_that_set_a_refused_model_or_data_flag_still_resumes(
    tmp_path: Path, group: str, then: dict
) -> None:
    now = _config(tmp_path, ModelArguments(model="models/layerskip-stdlib"), DataArguments(["x"]))
    before = dataclasses.asdict(now)
    before[group].update(then)
    _check_resumed_settings({"config": before}, now, DistributedContext(), tmp_path)


def test_a_model_or_data_flag_that_took_effect_must_still_match(tmp_path: Path) -> None:
    """From scratch the vocabulary size is the tokenizer's; with --dataset its split is read."""
    now = _config(tmp_path, ModelArguments(preset="tiny"), DataArguments(["x"]))
    before = dataclasses.asdict(now)
    before["model"]["vocab_size"] = 2048
    with pytest.raises(ConfigError, match="--vocab_size is 4096"):
        _check_resumed_settings({"config": before}, now, DistributedContext(), tmp_path)
    now = _config(tmp_path, ModelArguments(preset="tiny"), DataArguments(dataset="corpus"))
    before = dataclasses.asdict(now)
    before["data"]["dataset_split"] = "validation"
    with pytest.raises(ConfigError, match="--dataset_split is 'train'"):
        _check_resumed_settings({"config": before}, now, DistributedContext(), tmp_path)
