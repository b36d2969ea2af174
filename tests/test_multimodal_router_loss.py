"""A multimodal mixture of experts (Qwen3-VL-MoE) whose text_config asks for its router
loss: its own labels= loss adds the load-balancing loss, and so must the training objective.
It read output_router_logits from the top-level config, which a multimodal config does not
hold, and trained without the router loss, without a word."""

from __future__ import annotations

import pytest
import torch
from tiny_models import _multimodal_config
from transformers import AutoModelForImageTextToText

from self_speculation.training.objective import LayerSkipObjective


def test_a_multimodal_moe_asking_for_its_router_loss_gets_it() -> None:
    config = _multimodal_config(
        "qwen3_vl_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        output_router_logits=True, router_aux_loss_coef=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    assert not getattr(model.config, "output_router_logits", False)  # text_config's only
    input_ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=input_ids, labels=input_ids)
    assert expected.aux_loss is not None
    result = LayerSkipObjective(model)(input_ids, [4])
    assert result.loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
