"""Early-exit loss: the shared final norm + LM head supervises every chosen exit.

LayerSkip (Elhoushi et al., ACL 2024, §4.2, Eq. 4-6) trains every exit with the model's own
head (no extra modules):

    J(X, Y, t) = sum_l e~(t, l) * CE(head(norm(h_l)), Y),

    e~(t, l) = C(t, l) * e(l) / sum_i C(t, i) * e(i),

where ``h_l`` is the output of decoder layer ``l`` (1-based exit layer: ``h_l`` leaves layers
0..l-1), ``C`` the curriculum (see :mod:`curriculum`) and ``e(l)`` a scale that grows with depth;
``e_scale`` multiplies the non-final exits (``e(l) = e_scale * scale(l)`` for ``l < L``).

Convention used here: the exit hidden states are the *raw* outputs of the decoder layers, and
the head is the model's own final norm + LM head with its family scalars (``unembed`` of
:class:`self_speculation.model_surgery.LayerwiseModel`: Granite's ``logits_scaling``, Gemma's
``final_logit_softcapping``). Note that transformers' ``output_hidden_states`` is *not* this:
its tuple has L + 1 entries (embeddings first) and its last entry already went through the
final norm (checked with transformers 5.23), so applying the head to it would norm twice.

Non-final exits may be supervised on a random subset of the positions only
(``position_fraction``): a uniformly random subset gives an unbiased estimate of the same
mean cross-entropy at a fraction of the head's cost.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from self_speculation.errors import ConfigError

IGNORE_INDEX = -100  # target value excluded from the loss (padding), as in transformers


class ExitScale(str, enum.Enum):
    """Depth scale e(l) of an exit's loss weight, l = 1..L (paper §4.2, Eq. 5)."""

    UNIFORM = "uniform"  # 1
    LINEAR = "linear"  # l
    SUM = "sum"  # sum_{i<=l} i = l (l + 1) / 2
    SQRT = "sqrt"  # sqrt(l)
    INVERSE = "inverse"  # 1 / l


def exit_scale(scale: ExitScale | str, exit_layer: int) -> float:
    """e(l) for 1-based ``exit_layer`` before ``e_scale`` and normalisation."""
    scale = ExitScale(scale)
    if exit_layer < 1:
        raise ValueError(f"exit layers count from 1, got {exit_layer}")
    if scale is ExitScale.UNIFORM:
        return 1.0
    if scale is ExitScale.LINEAR:
        return float(exit_layer)
    if scale is ExitScale.SUM:
        return exit_layer * (exit_layer + 1) / 2.0
    if scale is ExitScale.SQRT:
        return math.sqrt(exit_layer)
    if scale is ExitScale.INVERSE:
        return 1.0 / exit_layer
    raise AssertionError(scale)


def exit_loss_weights(
    exit_layers: Sequence[int],
    num_layers: int,
    scale: ExitScale | str = ExitScale.LINEAR,
    e_scale: float = 1.0,
) -> list[float]:
    """Normalised weights e~(l) of the supervised ``exit_layers`` (1-based), summing to 1.

    ``e_scale`` multiplies every exit below ``num_layers`` (paper §4.2, Eq. 6).
    """
    if not exit_layers:
        raise ConfigError("at least one exit layer must be supervised")
    if e_scale < 0:
        raise ConfigError(f"e_scale must be >= 0, got {e_scale}")
    raw = [
        exit_scale(scale, layer) * (e_scale if layer < num_layers else 1.0) for layer in exit_layers
    ]
    total = sum(raw)
    if total <= 0:
        raise ConfigError("early-exit loss weights sum to zero (e_scale 0 and no final exit?)")
    return [weight / total for weight in raw]


@dataclass
class EarlyExitLoss:
    """Result of :func:`early_exit_loss`.

    Attributes:
        loss: the weighted total J, a scalar with gradient.
        exit_losses: per 1-based exit layer, its (detached) mean cross-entropy.
        weights: per 1-based exit layer, its normalised weight e~(l).
    """

    loss: torch.Tensor
    exit_losses: dict[int, torch.Tensor]
    weights: dict[int, float]


def _sample_positions(
    num_exits: int, valid: torch.Tensor, fraction: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Per exit, a uniformly random subset (no repeats) of the ``valid`` flat positions.

    Returns indices [num_exits, count] into the flattened [batch * seq] positions.
    """
    candidates = valid.nonzero().squeeze(1)  # [num_valid]
    count = max(1, round(fraction * candidates.numel()))
    noise = torch.rand(
        num_exits, candidates.numel(), generator=generator, device="cpu"
    )  # [exits, num_valid]
    picks = noise.topk(count, dim=1).indices.to(candidates.device)  # [exits, count]
    return candidates[picks]  # [exits, count]


def early_exit_loss(
    exit_hidden: Sequence[torch.Tensor],
    exit_layers: Sequence[int],
    targets: torch.Tensor,
    unembed: Callable[[torch.Tensor], torch.Tensor],
    num_layers: int,
    scale: ExitScale | str = ExitScale.LINEAR,
    e_scale: float = 1.0,
    position_fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> EarlyExitLoss:
    """The LayerSkip early-exit loss J (paper §4.2, Eq. 4-6), vectorised over exits.

    Args:
        exit_hidden: per supervised exit, the raw output of its last decoder layer,
            each [batch, seq, hidden].
        exit_layers: the 1-based exit layer of each entry of ``exit_hidden``.
        targets: next-token ids [batch, seq] aligned with the positions (``targets[:, i]``
            is the token after position i); ``IGNORE_INDEX`` marks positions without one.
        unembed: the model's final norm + LM head (+ family scaling): [..., hidden] ->
            [..., vocab], shared by all exits.
        num_layers: L; exit ``L`` is the full model and is never subsampled.
        scale: depth scale e(l).
        e_scale: multiplier of the non-final exits' weights.
        position_fraction: share of the valid positions on which each non-final exit is
            supervised (a fresh uniform subset per exit and call); 1.0 means all.
        generator: random source of the position subsets (default: torch's global one).

    Returns:
        The weighted loss, the per-exit cross-entropies and the weights.
    """
    if len(exit_hidden) != len(exit_layers):
        raise ValueError(f"{len(exit_hidden)} hidden states for {len(exit_layers)} exit layers")
    if not 0.0 < position_fraction <= 1.0:
        raise ConfigError(f"position_fraction must be in (0, 1], got {position_fraction}")
    weights = exit_loss_weights(exit_layers, num_layers, scale, e_scale)
    flat_targets = targets.reshape(-1)  # [batch * seq]
    valid = flat_targets != IGNORE_INDEX  # [batch * seq]
    exit_losses: dict[int, torch.Tensor] = {}
    total = torch.zeros((), device=targets.device)

    # The final exit (and any exit when not subsampling) is supervised on all positions.
    full = [
        i for i, layer in enumerate(exit_layers) if layer >= num_layers or position_fraction >= 1.0
    ]
    sampled = [i for i in range(len(exit_layers)) if i not in full]
    if full:
        hidden = torch.stack([exit_hidden[i] for i in full])  # [n_full, batch, seq, hidden]
        hidden = hidden.flatten(1, 2)[:, valid]  # [n_full, num_valid, hidden]
        logits = unembed(hidden).float()  # [n_full, num_valid, vocab]
        labels = flat_targets[valid].expand(len(full), -1)  # [n_full, num_valid]
        losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(
            1
        )  # [n_full]
        for slot, i in enumerate(full):
            exit_losses[exit_layers[i]] = losses[slot]
    if sampled:
        positions = _sample_positions(
            len(sampled), valid, position_fraction, generator
        )  # [n_s, count]
        hidden = torch.stack([exit_hidden[i] for i in sampled]).flatten(
            1, 2
        )  # [n_s, batch * seq, hidden]
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [n_s, count, hidden]
        picked = hidden.gather(1, index)  # [n_s, count, hidden]
        logits = unembed(picked).float()  # [n_s, count, vocab]
        labels = flat_targets[positions]  # [n_s, count]
        losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)  # [n_s]
        for slot, i in enumerate(sampled):
            exit_losses[exit_layers[i]] = losses[slot]
    for i, layer in enumerate(exit_layers):
        total = total + weights[i] * exit_losses[layer]
    return EarlyExitLoss(
        loss=total,
        exit_losses={layer: loss.detach() for layer, loss in exit_losses.items()},
        weights=dict(zip(exit_layers, weights, strict=True)),
    )
