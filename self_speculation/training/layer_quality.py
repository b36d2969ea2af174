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
            logits = layerwise.unembed(hidden)[:, :-1].float()  # [batch, seq-1, vocab]
            log_probs = torch.log_softmax(logits, dim=-1)  # [batch, seq-1, vocab]
            nll[layer] -= log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
            top1 = logits.argmax(dim=-1)  # [batch, seq-1]
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
