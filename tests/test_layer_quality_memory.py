"""layer_report.py's per-exit table makes its logits a bounded number of positions at a
time: all of a batch's positions at once held [batch, seq, vocab] logits and their log-softmax
for two layers (4 GB at the defaults for Llama 3.2's 128k vocabulary), with the same
figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_tiny_model

from self_speculation import LayerwiseModel
from self_speculation.training.layer_quality import exit_quality

MOST_POSITIONS = 256  # positions whose logits one head call may make


def test_exit_logits_are_made_a_bounded_number_of_positions_at_a_time(monkeypatch) -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    layerwise = LayerwiseModel(model)
    blocks = torch.randint(3, 300, (3, 200), generator=torch.Generator().manual_seed(0))
    made = []
    unembed = layerwise.unembed

    def counted(hidden: torch.Tensor) -> torch.Tensor:
        made.append(hidden.shape[0] * hidden.shape[1])
        return unembed(hidden)

    monkeypatch.setattr(layerwise, "unembed", counted)
    rows = exit_quality(layerwise, blocks, batch_size=3)
    assert made and max(made) <= MOST_POSITIONS
    assert sum(made) == 4 * 3 * 199  # every predicting position of every exit, once

    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]  # [3, 199, vocab]
    targets = blocks[:, 1:]
    assert rows[-1].agreement == 1.0
    assert rows[-1].accuracy == (logits.argmax(-1) == targets).sum().item() / targets.numel()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert rows[-1].perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)
