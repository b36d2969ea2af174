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
(``position_fraction``): a uniformly random subset of each sample's positions gives an
unbiased estimate of the same mean cross-entropy at a fraction of the head's cost.

Memory: the exits are computed one at a time and the head is rebuilt in the backward pass
(activation checkpointing), so the loss never holds more than one exit's logits; with a
128k vocabulary, [exits, tokens, vocab] fp32 logits would not fit on any device.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> None:
    """ConfigError naming the first exit outside 1..``num_layers`` (exit 0 would read
    ``layers[-1]``: the last layer's output under another name)."""
    outside = [layer for layer in exit_layers if not 1 <= layer <= num_layers]
    if outside:
        raise ConfigError(f"exit layer {outside[0]} is outside 1..{num_layers}")


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
    if not (math.isfinite(e_scale) and e_scale >= 0):  # inf: every weight NaN
        raise ConfigError(f"e_scale must be a finite number >= 0, got {e_scale}")
    check_exit_layers(exit_layers, num_layers)
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


def select_positions(
    valid: torch.Tensor, fraction: float, noise: torch.Tensor | None
) -> torch.Tensor:
    """The supervised positions of one exit, as indices into the flattened [batch * seq].

    With ``fraction`` 1 (or no ``noise``) every valid position. Otherwise, in every row, the
    ``max(1, round(fraction * valid_in_row))`` valid positions with the smallest ``noise``: a
    uniformly random subset per row when ``noise`` is U(0, 1), and a sample's subset depends
    only on its own row of noise (not on which other samples share its batch or process).

    Args:
        valid: [batch, seq] bool, positions that have a target.
        fraction: share of each row's valid positions to keep, in (0, 1].
        noise: U(0, 1) draws [batch, seq], or None.

    Returns:
        [count] int64 indices into the flattened positions, ascending.
    """
    if fraction >= 1.0 or noise is None:
        return valid.reshape(-1).nonzero().squeeze(1)  # [num_valid]
    per_row = valid.sum(1, keepdim=True)  # [batch, 1]
    wanted = (per_row.to(torch.float64) * fraction).round().clamp(min=1).to(per_row.dtype)
    ranked = torch.where(valid, noise.to(valid.device), 2.0)  # invalid positions rank last
    rank = ranked.argsort(dim=1).argsort(dim=1)  # [batch, seq] 0 = smallest noise
    chosen = valid & (rank < wanted)  # [batch, seq]
    return chosen.reshape(-1).nonzero().squeeze(1)  # [count]


def _exit_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, unembed: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mean CE of one exit: hidden [count, hidden], labels [count] -> scalar."""
    logits = unembed(hidden).float()  # [count, vocab]
    return F.cross_entropy(logits, labels)


def _loss_result(
    exit_layers: Sequence[int], losses: Sequence[torch.Tensor], weights: Sequence[float]
) -> EarlyExitLoss:
    total = torch.stack([weight * loss for weight, loss in zip(weights, losses)]).sum()
    return EarlyExitLoss(
        loss=total,
        exit_losses={layer: loss.detach() for layer, loss in zip(exit_layers, losses)},
        weights=dict(zip(exit_layers, weights, strict=True)),
    )


def _check(
    exit_hidden: Sequence[torch.Tensor], exit_layers: Sequence[int], fraction: float
) -> None:
    if len(exit_hidden) != len(exit_layers):
        raise ValueError(f"{len(exit_hidden)} hidden states for {len(exit_layers)} exit layers")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"position_fraction must be in (0, 1], got {fraction}")


def _exit_noise(
    count: int,
    shape: torch.Size,
    position_noise: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """U(0, 1) draws [exits, batch, seq]: the given ones, or fresh ones from ``generator``."""
    if position_noise is not None:
        if tuple(position_noise.shape) != (count, *shape):
            raise ValueError(
                f"position_noise has shape {tuple(position_noise.shape)}, expected {(count, *shape)}"
            )
        return position_noise
    return torch.rand(count, *shape, generator=generator, device="cpu")  # [exits, batch, seq]


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
    position_noise: torch.Tensor | None = None,
) -> EarlyExitLoss:
    """The LayerSkip early-exit loss J (paper §4.2, Eq. 4-6), one exit at a time.

    Each exit's logits are made, reduced to a cross-entropy and dropped before the next
    exit's; with more than one exit the head runs under activation checkpointing, so the
    backward pass rebuilds one exit's logits at a time too. Peak memory is one exit's
    [positions, vocab] logits whatever the number of exits (a stacked computation holds
    [exits, positions, vocab]: :func:`stacked_early_exit_loss`, the reference).

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
        position_fraction: share of each sample's valid positions on which a non-final exit
            is supervised (a uniform subset per exit and sample); 1.0 means all.
        generator: random source of the position subsets when ``position_noise`` is None
            (default: torch's global one).
        position_noise: U(0, 1) draws [exits, batch, seq] choosing the subsets (see
            :func:`select_positions`).

    Returns:
        The weighted loss, the per-exit cross-entropies and the weights.
    """
    _check(exit_hidden, exit_layers, position_fraction)
    weights = exit_loss_weights(exit_layers, num_layers, scale, e_scale)
    valid = targets != IGNORE_INDEX  # [batch, seq]
    flat_targets = targets.reshape(-1)  # [batch * seq]
    sampled = position_fraction < 1.0 and any(layer < num_layers for layer in exit_layers)
    noise = (
        _exit_noise(len(exit_layers), targets.shape, position_noise, generator) if sampled else None
    )  # [exits, batch, seq]
    rebuild = len(exit_layers) > 1  # one exit alone: nothing to gain from recomputing its head
    losses = []
    for slot, (hidden, layer) in enumerate(zip(exit_hidden, exit_layers)):
        exit_noise = noise[slot] if noise is not None and layer < num_layers else None
        positions = select_positions(valid, position_fraction, exit_noise)  # [count]
        picked = hidden.flatten(0, 1).index_select(0, positions)  # [count, hidden]
        labels = flat_targets.index_select(0, positions)  # [count]
        if rebuild:
            loss = checkpoint(_exit_cross_entropy, picked, labels, unembed, use_reentrant=False)
        else:
            loss = _exit_cross_entropy(picked, labels, unembed)
        losses.append(loss)
    return _loss_result(exit_layers, losses, weights)


def stacked_early_exit_loss(
    exit_hidden: Sequence[torch.Tensor],
    exit_layers: Sequence[int],
    targets: torch.Tensor,
    unembed: Callable[[torch.Tensor], torch.Tensor],
    num_layers: int,
    scale: ExitScale | str = ExitScale.LINEAR,
    e_scale: float = 1.0,
    position_fraction: float = 1.0,
    position_noise: torch.Tensor | None = None,
) -> EarlyExitLoss:
    """The same loss as :func:`early_exit_loss` with every exit's logits stacked at once.

    The reference for tests and the memory benchmark: it holds [exits, count, vocab] fp32
    logits (and their softmax for the backward pass), so its memory grows with the number of
    exits. Same arguments; the position subsets come from ``position_noise`` only.
    """
    _check(exit_hidden, exit_layers, position_fraction)
    weights = exit_loss_weights(exit_layers, num_layers, scale, e_scale)
    valid = targets != IGNORE_INDEX  # [batch, seq]
    flat_targets = targets.reshape(-1)  # [batch * seq]
    groups: dict[int, list[int]] = {}  # count of positions -> slots (stackable together)
    chosen = []
    for slot, layer in enumerate(exit_layers):
        noise = position_noise[slot] if position_noise is not None and layer < num_layers else None
        chosen.append(select_positions(valid, position_fraction, noise))  # [count]
        groups.setdefault(chosen[-1].numel(), []).append(slot)
    losses: list[torch.Tensor | None] = [None] * len(exit_layers)
    for slots in groups.values():
        picked = torch.stack(
            [exit_hidden[s].flatten(0, 1).index_select(0, chosen[s]) for s in slots]
        )  # [n, count, hidden]
        labels = torch.stack([flat_targets.index_select(0, chosen[s]) for s in slots])  # [n, count]
        logits = unembed(picked).float()  # [n, count, vocab]
        per_exit = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)  # [n]
        for index, slot in enumerate(slots):
            losses[slot] = per_exit[index]
    return _loss_result(exit_layers, losses, weights)  # type: ignore[arg-type]
