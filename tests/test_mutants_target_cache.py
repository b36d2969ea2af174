"""compute_targets names why a target cache does not fit: other weights of the model (a
retrain), another --dtype, or other settings. Only the first two were tested: a cache of
other settings (another top_k, say) told as "other weights ... retrained?" went unnoticed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from self_speculation import ConfigError
from self_speculation.adapter_training import TargetSettings, compute_targets
from self_speculation.model_surgery import LayerwiseModel


def test_a_cache_of_other_settings_is_not_taken_for_other_weights(tmp_path: Path) -> None:
    layerwise = LayerwiseModel(make_tiny_model("llama_mha_untied", dtype=torch.float32))
    blocks = torch.randint(0, 300, (2, 8))
    settings = TargetSettings("m", [2], 8, 4, 2, "f", model_weights="12.5")
    assert compute_targets(layerwise, blocks, settings, tmp_path) == 2
    other_top_k = dataclasses.replace(settings, top_k=8)
    with pytest.raises(ConfigError, match="holds targets for other settings"):
        compute_targets(layerwise, blocks, other_top_k, tmp_path)
    retrained = dataclasses.replace(settings, model_weights="13.5")
    with pytest.raises(ConfigError, match="holds targets computed from other weights"):
        compute_targets(layerwise, blocks, retrained, tmp_path)
