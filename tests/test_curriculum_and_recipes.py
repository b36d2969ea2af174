"""The gradual curriculum against the paper's schedule, and recipe files' hostile keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from self_speculation.errors import ConfigError
from self_speculation.training.config import parse_config
from self_speculation.training.curriculum import active_exits


def _first_step_on(exit_layer: int, total: int, num_layers: int) -> int:
    return next(
        t for t in range(total) if exit_layer in active_exits("gradual", t, total, num_layers)
    )


@pytest.mark.parametrize(
    ("num_layers", "total"), [(4, 8), (4, 10), (16, 100), (16, 3815), (30, 1000)]
)
def test_gradual_switches_each_layer_on_every_T_over_2L_steps(num_layers: int, total: int) -> None:
    # REFERENCE.md 1: 0-based layer i is on once t / T >= 0.5 * (L - i) / L; the first layer
    # (exit 1) at half-way, the last exit from the start.
    for layer in range(num_layers - 1):  # 0-based, the non-final ones
        expected = math.ceil(total * (num_layers - layer) / (2 * num_layers))
        assert _first_step_on(layer + 1, total, num_layers) == expected, layer
    assert _first_step_on(num_layers, total, num_layers) == 0
    assert _first_step_on(1, total, num_layers) == math.ceil(total / 2)


def test_gradual_hand_computed_L4_T8() -> None:
    # t/T >= 0.5*(4-2)/4 = 0.25 -> layer 2 (exit 3) from t=2; layer 1 at 0.375 -> t=3;
    # layer 0 at 0.5 -> t=4.
    steps = [active_exits("gradual", t, 8, 4) for t in range(6)]
    assert steps == [[4], [4], [3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]


@pytest.mark.parametrize(
    "document",
    [
        {"flags": {"max_tokens": 9}, "layer_dropout_p_max": 0.2},  # a flag beside "flags"
        {"flag": {"max_tokens": 9}, "flags": {"max_tokens": 9}},  # a typo
        {"flags": {"max_tokens": 9, "model": None}},  # null became the string 'None'
        {"flags": {"max_tokens": 9, "layer_dropout_p_max": {"value": 0.2}}},
        {"flags": {"max_tokens": 9, "data": [["a"]]}},
    ],
)
def test_recipe_refuses_what_it_would_ignore_or_misread(document: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as error:
        parse_config(["--recipe", str(recipe), "--preset", "tiny", "--data", "x"])
    assert "\n" not in str(error.value) and str(recipe) in str(error.value)


def test_shipped_recipes_still_parse() -> None:
    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "configs").glob("recipe-*.json")):
        config = parse_config(["--recipe", str(path), "--data", "x"])
        assert config.layerskip.early_exit_curriculum == "gradual"
