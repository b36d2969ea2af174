"""Layer dropout that skips every routed layer for every sample of a micro-batch leaves a
mixture of experts no router logits: the objective must add no router loss for that
micro-batch instead of failing inside transformers' load_balancing_loss_func."""

from __future__ import annotations

import torch
from tiny_models import make_tiny_model

from self_speculation.training.layer_dropout import apply_layer_dropout
from self_speculation.training.objective import LayerSkipObjective


def test_router_loss_with_every_routed_layer_skipped() -> None:
    model = make_tiny_model("qwen2_moe", output_router_logits=True)
    objective = LayerSkipObjective(model)
    dropout = apply_layer_dropout(model, 1.0, "uniform")
    model.train()
    input_ids = (torch.arange(16).view(2, 8) * 13 + 5) % 300
    layers = objective.num_layers
    # Some layers run: the router loss is the model's own (finite, added).
    dropout.plan(torch.tensor([[True, False, True, True]] * 2))
    some = objective(input_ids, [layers])
    # Every layer skipped by every sample: no router logits; the loss is the plain one.
    dropout.plan(torch.zeros(2, layers, dtype=torch.bool))
    none = objective(input_ids, [layers])
    assert torch.isfinite(some.loss) and torch.isfinite(none.loss)
    assert torch.allclose(none.loss, none.exit_losses[layers].to(none.loss.dtype))
    dropout.remove()
