"""Per-exit quality of a model on held-out tokens (what ``layer_report.py`` measures).

For every exit layer E = 1..L (decoder layers 0..E-1, then the model's own final norm and
LM head; E = L is the full model):

* accuracy: share of positions whose top-1 token is the next token;
* perplexity: exp of the mean next-token cross-entropy;
* agreement: share of positions whose top-1 token equals the last layer's top-1, the
  per-token acceptance of greedy self-speculative drafts from exit E (LayerSkip §5 and the
  cost model: an exit that agrees more often drafts more accepted tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from self_speculation.model_surgery import LayerwiseModel


@dataclass(frozen=True)
class ExitQuality:
    """Held-out quality of one exit layer (1-based)."""

    exit_layer: int
    accuracy: float
    perplexity: float
    agreement: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# Positions whose logits are made at a time: [rows, vocab] float32 logits, 128 MB for a
# 128k vocabulary, whatever batch_size and the sequence length are (all positions at once
# held four [batch, seq, vocab] tensors at the next layer: 4 GB for Llama 3.2's vocabulary
# at the report's defaults).
SCORED_POSITIONS = 256


def _scored(
    layerwise: LayerwiseModel, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """Summed next-token cross-entropy and top-1 tokens [batch, seq-1] of an exit whose
    states are ``hidden`` [batch, seq, hidden], for ``targets`` [batch, seq-1]; the logits
    made ``SCORED_POSITIONS`` positions at a time."""
    states = hidden[:, :-1].reshape(1, -1, hidden.shape[-1])  # [1, batch * (seq-1), hidden]
    labels = targets.reshape(-1)  # [batch * (seq-1)]
    nll, tops = 0.0, []
    for start in range(0, labels.numel(), SCORED_POSITIONS):
        end = start + SCORED_POSITIONS
        logits = layerwise.unembed(states[:, start:end])[0].float()  # [rows, vocab]
        nll += F.cross_entropy(logits, labels[start:end], reduction="sum").item()
        tops.append(logits.argmax(dim=-1))  # [rows]
    return nll, torch.cat(tops).view_as(targets)


@torch.no_grad()
def exit_quality(
    layerwise: LayerwiseModel, blocks: torch.Tensor, batch_size: int = 4
) -> list[ExitQuality]:
    """Accuracy, perplexity and agreement with the last layer for every exit.

    Args:
        layerwise: the model seen layer by layer.
        blocks: held-out token ids [num_blocks, seq]; position i predicts token i + 1.
        batch_size: blocks per forward.

    Returns:
        One :class:`ExitQuality` per exit layer 1..L, in order.
    """
    num_layers = layerwise.num_layers
    correct = torch.zeros(num_layers, dtype=torch.float64)  # [L]
    agree = torch.zeros(num_layers, dtype=torch.float64)  # [L]
    nll = torch.zeros(num_layers, dtype=torch.float64)  # [L]
    count = 0
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start : start + batch_size].to(layerwise.device)  # [batch, seq]
        targets = input_ids[:, 1:]  # [batch, seq-1]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)  # [batch, seq]
        hidden = layerwise.embed(input_ids)  # [batch, seq, hidden]
        predictions = []
        for layer in range(num_layers):
            hidden = layerwise.run_layers(hidden, layer, layer + 1, None, positions)
            layer_nll, top1 = _scored(layerwise, hidden, targets)  # top1 [batch, seq-1]
            nll[layer] += layer_nll
            correct[layer] += (top1 == targets).sum().item()
            predictions.append(top1)
        for layer in range(num_layers):
            agree[layer] += (predictions[layer] == predictions[-1]).sum().item()
        count += targets.numel()
    return [
        ExitQuality(
            exit_layer=layer + 1,
            accuracy=correct[layer].item() / count,
            perplexity=math.exp(nll[layer].item() / count),
            agreement=agree[layer].item() / count,
        )
        for layer in range(num_layers)
    ]


@torch.no_grad()
def draft_exit_quality(
    layerwise: LayerwiseModel, draft, exit_layer: int, blocks: torch.Tensor, batch_size: int = 4
) -> dict[str, float | int | None]:
    """The same figures for a draft exit (an exit adapter and / or a reduced draft
    vocabulary, ``self_speculation.draft.DraftExit``) at ``exit_layer``, plus ``coverage``:
    the share of the last layer's top-1 tokens inside the draft vocabulary (1 without one).
    Perplexity is None when a next token falls outside the draft vocabulary (probability 0).
    """
    full_to_draft = draft.full_to_draft()
    correct = agree = covered = nll = 0.0
    count = 0
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks[start : start + batch_size].to(layerwise.device)  # [batch, seq]
        targets = input_ids[:, 1:]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
        hidden = layerwise.run_layers(layerwise.embed(input_ids), 0, exit_layer, None, positions)
        draft_logits = draft.logits(hidden, None, positions)[:, :-1].float()
        last = layerwise.run_layers(hidden, exit_layer, layerwise.num_layers, None, positions)
        last_top1 = layerwise.unembed(last)[:, :-1].argmax(dim=-1)  # [batch, seq-1]
        top1 = draft_logits.argmax(dim=-1)
        log_probs = torch.log_softmax(draft_logits, dim=-1)
        nll -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        correct += (top1 == targets).sum().item()
        agree += (top1 == last_top1).sum().item()
        covered += (full_to_draft[last_top1] >= 0).sum().item()
        count += targets.numel()
    perplexity = math.exp(nll / count) if math.isfinite(nll) else None
    return {
        "exit_layer": exit_layer,
        "draft_vocab_size": 0 if draft.vocab is None else len(draft.vocab),
        "adapter": draft.adapter is not None,
        "accuracy": correct / count,
        "perplexity": perplexity,
        "agreement": agree / count,
        "coverage": covered / count,
    }
