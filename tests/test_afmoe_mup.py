"""AFMoE with muP input scaling (mup_enabled: its base model multiplies the embeddings by
sqrt(hidden_size)) decodes as transformers does, and every exit reads the scaled
embeddings, instead of being refused as a family that 'needs an adapter'."""

from __future__ import annotations

import copy

import torch
from tiny_models import make_tiny_model
from torch import nn

from self_speculation.model_surgery import LayerwiseModel


def test_afmoe_mup_exits_match_its_own_forward_cut_there() -> None:
    model = make_tiny_model("afmoe", mup_enabled=True)
    layerwise = LayerwiseModel(model)  # the load-time probe compares the full model
    ids = (torch.arange(20).view(2, 10) * 13 + 5) % 300
    for exit_layer in range(1, layerwise.num_layers + 1):
        cut = copy.deepcopy(model)
        cut.model.layers = nn.ModuleList(list(cut.model.layers)[:exit_layer])
        cut.config.num_hidden_layers = exit_layer
        cut.config.layer_types = list(cut.config.layer_types)[:exit_layer]
        with torch.no_grad():
            expected = cut(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(layerwise.logits(ids, exit_layer), expected)
