"""Layer dropout: skip whole decoder layers per sample while training.

LayerSkip (Elhoushi et al., ACL 2024, §4.1, Eq. 1-3) drops layer ``l`` (0-based) of ``L`` for a
whole sample with probability

    p(l, t) = S(t) * D(l) * p_max,

where ``D`` is the per-layer shape (exponential in the paper: ``D(l) = exp(l ln2 / (L-1)) - 1``,
0 for the first layer and 1 for the last) and ``S`` the time schedule (1 for continual
pretraining and fine-tuning; an exponential warm-up ``S(t) = exp(t ln2 / (T-1)) - 1`` from
scratch). A skipped sample leaves the layer with exactly the hidden states it came in with.

The model is not copied: :func:`apply_layer_dropout` overrides ``forward`` on each decoder
layer *instance* (parameters and ``state_dict`` keys are untouched) with a wrapper that runs the
model's own layer on the kept samples only and passes the skipped ones through. It is a no-op
in eval mode (``model.eval()``) and is undone by :meth:`LayerDropout.remove`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from self_speculation.errors import ConfigError

# Keyword arguments of a decoder layer that are never batch-major.
_NOT_BATCH_MAJOR = frozenset({"cache_position", "past_key_values", "past_key_value"})


class DropoutShape(str, enum.Enum):
    """Per-layer shape D(l) in [0, 1] of the dropout rate (paper §4.1, Eq. 2)."""

    UNIFORM = "uniform"  # D(l) = 1
    LINEAR = "linear"  # D(l) = l / (L-1)
    EXPONENTIAL = "exponential"  # D(l) = exp(l ln2 / (L-1)) - 1 (the paper's choice)
    LOG = "log"  # D(l) = ln(1 + l) / ln(L)
    SIN = "sin"  # D(l) = sin(pi/2 * l / (L-1))
    SIGMOID = "sigmoid"  # logistic in l, centred on the middle layer, rescaled to [0, 1]
    STEP = "step"  # D(l) = 0 in the first half of the layers, 1 in the second


class DropoutSchedule(str, enum.Enum):
    """Time schedule S(t) in [0, 1] of the dropout rate (paper §4.1, Eq. 3)."""

    CONSTANT = "constant"  # S(t) = 1 (continual pretraining, fine-tuning)
    EXPONENTIAL = "exponential"  # S(t) = exp(t ln2 / (T-1)) - 1 (pretraining from scratch)


def layer_shape(shape: DropoutShape | str, layer: int, num_layers: int) -> float:
    """D(l) for 0-based ``layer`` of ``num_layers`` (paper §4.1, Eq. 2).

    Every shape except ``uniform`` is 0 at the first layer and 1 at the last one.
    """
    shape = DropoutShape(shape)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside [0, {num_layers})")
    if shape is DropoutShape.UNIFORM:
        return 1.0
    if num_layers == 1:
        return 1.0
    x = layer / (num_layers - 1)  # relative depth in [0, 1]
    if shape is DropoutShape.LINEAR:
        return x
    if shape is DropoutShape.EXPONENTIAL:
        return math.exp(x * math.log(2.0)) - 1.0
    if shape is DropoutShape.LOG:
        return math.log1p(layer) / math.log(num_layers)
    if shape is DropoutShape.SIN:
        return math.sin(0.5 * math.pi * x)
    if shape is DropoutShape.SIGMOID:
        steepness = 10.0
        low, high = (1.0 / (1.0 + math.exp(steepness * (0.5 - v))) for v in (0.0, 1.0))
        return (1.0 / (1.0 + math.exp(steepness * (0.5 - x))) - low) / (high - low)
    if shape is DropoutShape.STEP:
        return 1.0 if layer >= num_layers // 2 else 0.0
    raise AssertionError(shape)


def schedule_factor(schedule: DropoutSchedule | str, step: int, total_steps: int) -> float:
    """S(t) for optimizer step ``step`` (0-based) of ``total_steps`` (paper §4.1, Eq. 3)."""
    schedule = DropoutSchedule(schedule)
    if schedule is DropoutSchedule.CONSTANT:
        return 1.0
    if total_steps <= 1:
        return 1.0
    progress = min(max(step, 0), total_steps - 1) / (total_steps - 1)  # in [0, 1]
    return math.exp(progress * math.log(2.0)) - 1.0


def layer_dropout_rates(
    num_layers: int, p_max: float, shape: DropoutShape | str = DropoutShape.EXPONENTIAL
) -> list[float]:
    """Per-layer skip probabilities D(l) * p_max before the time schedule, l = 0..L-1."""
    if not 0.0 <= p_max <= 1.0:
        raise ConfigError(f"layer dropout p_max must be in [0, 1], got {p_max}")
    return [layer_shape(shape, layer, num_layers) * p_max for layer in range(num_layers)]


def _select_batch(value: Any, keep: torch.Tensor, batch: int) -> Any:
    """``value`` restricted to the samples ``keep`` (indices) where it is batch-major."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == batch:
            return value.index_select(0, keep)
        return value  # broadcast over the batch ([1, ...]) or not per sample
    if isinstance(value, tuple | list):
        return type(value)(_select_batch(item, keep, batch) for item in value)
    return value


class LayerDropout:
    """Handle on layer dropout applied to a list of decoder layers.

    Args:
        layers: the model's own decoder layers (e.g. ``model.model.layers``).
        rates: per-layer skip probabilities before the time schedule, one per layer.
        schedule: the time schedule S(t).
        total_steps: T, the number of optimizer steps of the run (for S(t)).
        generator: random source of the skip decisions (default: torch's global one).

    Attributes:
        step: the current optimizer step t (set it with :meth:`set_step`).
        last_kept: per layer, the boolean keep mask [batch] of its last training call
            (None if it has not run in training mode yet); for tests and logging.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        rates: Sequence[float],
        schedule: DropoutSchedule | str = DropoutSchedule.CONSTANT,
        total_steps: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(rates) != len(layers):
            raise ConfigError(f"{len(rates)} dropout rates for {len(layers)} layers")
        self.layers = layers
        self.rates = [float(rate) for rate in rates]
        self.schedule = DropoutSchedule(schedule)
        self.total_steps = max(int(total_steps), 1)
        self.generator = generator
        self.step = 0
        self.last_kept: list[torch.Tensor | None] = [None] * len(layers)
        for index, layer in enumerate(layers):
            if "forward" in vars(layer):
                raise ConfigError(
                    f"decoder layer {index} already has layer dropout (or another forward override)"
                )
            layer.forward = self._wrap(index, layer, layer.forward)

    def set_step(self, step: int, total_steps: int | None = None) -> None:
        """Set t (and optionally T) of the time schedule S(t)."""
        self.step = step
        if total_steps is not None:
            self.total_steps = max(int(total_steps), 1)

    def current_rate(self, layer: int) -> float:
        """p(l, t) = S(t) * D(l) * p_max for 0-based ``layer`` at the current step."""
        return self.rates[layer] * schedule_factor(self.schedule, self.step, self.total_steps)

    def remove(self) -> None:
        """Restore the layers' own ``forward``."""
        for layer in self.layers:
            vars(layer).pop("forward", None)

    def _wrap(
        self, index: int, layer: nn.Module, forward: Callable[..., Any]
    ) -> Callable[..., Any]:
        def forward_with_dropout(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            rate = self.current_rate(index)
            if not layer.training or rate <= 0.0:
                return forward(hidden_states, *args, **kwargs)
            batch = hidden_states.shape[0]
            draws = torch.rand(batch, generator=self.generator, device="cpu")  # [batch]
            kept = draws >= rate  # [batch] True: the sample runs this layer
            self.last_kept[index] = kept
            if bool(kept.all()):
                return forward(hidden_states, *args, **kwargs)
            if not bool(kept.any()):
                return hidden_states  # every sample skips the layer
            keep = kept.nonzero().squeeze(1).to(hidden_states.device)  # [kept]
            args = _select_batch(args, keep, batch)
            kwargs = {
                name: value if name in _NOT_BATCH_MAJOR else _select_batch(value, keep, batch)
                for name, value in kwargs.items()
            }
            output = forward(
                hidden_states.index_select(0, keep), *args, **kwargs
            )  # [kept, seq, hidden]
            rest = None
            if isinstance(output, tuple):  # older layer signatures return (hidden, ...)
                output, rest = output[0], output[1:]
            # Skipped samples keep their input; kept samples take the layer's output.
            merged = hidden_states.index_copy(
                0, keep, output.to(hidden_states.dtype)
            )  # [batch, seq, hidden]
            return merged if rest is None else (merged, *rest)

        return forward_with_dropout


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` and the like)."""
    for name in ("model", "transformer", "base_model"):
        base = getattr(model, name, None)
        layers = getattr(base, "layers", None) if isinstance(base, nn.Module) else None
        if isinstance(layers, nn.ModuleList):
            return layers
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model.layers
    raise ConfigError(
        f"{type(model).__name__} has no decoder layers as a ModuleList at .model.layers"
    )


def apply_layer_dropout(
    model: nn.Module,
    p_max: float,
    shape: DropoutShape | str = DropoutShape.EXPONENTIAL,
    schedule: DropoutSchedule | str = DropoutSchedule.CONSTANT,
    total_steps: int = 1,
    generator: torch.Generator | None = None,
) -> LayerDropout:
    """Add LayerSkip layer dropout (paper §4.1) to a decoder-only transformers model.

    Args:
        model: a causal LM whose decoder layers are a ModuleList (``model.model.layers``).
        p_max: the largest skip probability (that of the last layer for the default shape).
        shape: the per-layer shape D(l).
        schedule: the time schedule S(t).
        total_steps: T, for the time schedule; update with ``set_step(step, total_steps)``.
        generator: random source of the skip decisions (default: torch's global one).

    Returns:
        The handle: call ``set_step(t)`` every optimizer step, ``remove()`` to undo.
    """
    layers = find_decoder_layers(model)
    rates = layer_dropout_rates(len(layers), p_max, shape)
    return LayerDropout(layers, rates, schedule, total_steps, generator)
