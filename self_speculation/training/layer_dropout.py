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
model's own layer on the kept samples only and passes the skipped ones through. Only the
hidden states and the arguments transformers builds per sample (attention mask, position
ids, rotary cos/sin) are restricted to the kept samples; anything else passes untouched.
Every layer is still called for every batch and a layer skipped by every sample still gives
its parameters zero gradients, so FSDP's and DDP's collectives match across processes. A
training loop may fix the decisions per sample (:meth:`LayerDropout.plan`). It is a no-op
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
from self_speculation.model_surgery import find_base_model


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


def schedule_factor(schedule: DropoutSchedule | str, step: int, total_steps: int | None) -> float:
    """S(t) for optimizer step ``step`` (0-based) of ``total_steps`` (paper §4.1, Eq. 3).

    ``total_steps`` None means the horizon T is not known yet (a run with a time budget, before
    it has measured its speed): S is held at its start S(0), never jumped to S(T).
    """
    schedule = DropoutSchedule(schedule)
    if schedule is DropoutSchedule.CONSTANT:
        return 1.0
    if total_steps is None:
        return 0.0  # S(0) of the exponential warm-up
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


# Keyword arguments of a decoder layer that transformers builds per sample: [batch, ...], or
# [1, ...] when shared by every sample. Only these and the hidden states are restricted to
# the kept samples; every other argument (a cache, cache positions, anything unknown) is
# passed through untouched, whatever its shape.
PER_SAMPLE_ARGUMENTS = frozenset({"attention_mask", "position_ids", "position_embeddings"})


def _keep_rows(value: Any, keep: torch.Tensor, batch: int) -> Any:
    """A per-sample argument restricted to the samples ``keep`` (a [1, ...] broadcast stays)."""
    if isinstance(value, torch.Tensor):
        return (
            value.index_select(0, keep) if value.dim() >= 1 and value.shape[0] == batch else value
        )
    if isinstance(value, tuple | list):  # position_embeddings: (cos, sin)
        return type(value)(_keep_rows(item, keep, batch) for item in value)
    return value


def _zero_touch(layer: nn.Module) -> torch.Tensor | None:
    """0 * (one element of every trainable parameter of ``layer``): a scalar with gradient.

    Added to a skipped layer's output so that every parameter gets a (zero) gradient in
    every process: FSDP's reduce-scatter and DDP's all-reduce then run for every layer on
    every rank, whatever each rank's samples skipped.
    """
    touched = [p.reshape(-1)[:1] for p in layer.parameters() if p.requires_grad]
    if not touched or not torch.is_grad_enabled():
        return None
    return torch.cat([t.float() for t in touched]).sum() * 0.0


def keep_from_uniforms(uniforms: torch.Tensor, rates: Sequence[float]) -> torch.Tensor:
    """Skip decisions from uniform draws: True where a sample runs a layer.

    Args:
        uniforms: U(0, 1) draws [batch, num_layers].
        rates: each layer's current skip probability p(l, t), num_layers of them.

    Returns:
        [batch, num_layers] bool: sample b runs layer l when ``uniforms[b, l] >= rates[l]``.
    """
    return uniforms >= torch.tensor(rates, dtype=uniforms.dtype)  # [batch, num_layers]


class LayerDropout:
    """Handle on layer dropout applied to a list of decoder layers.

    Every decoder layer is still *called* for every batch (so FSDP's all-gather and
    reduce-scatter of each layer run on every rank); inside the call, the skipped samples
    pass through and only the kept ones run the layer.

    Args:
        layers: the model's own decoder layers (e.g. ``model.model.layers``).
        rates: per-layer skip probabilities before the time schedule, one per layer.
        schedule: the time schedule S(t).
        total_steps: T, the number of optimizer steps of the run (for S(t)); None while
            unknown (S is then held at its start, S(0)).
        generator: random source of the skip decisions when none are planned
            (default: torch's global one).

    Attributes:
        step: the current optimizer step t (set it with :meth:`set_step`).
        last_kept: per layer, the boolean keep mask [batch] of its last training call
            (None if it has not drawn in training mode yet); for tests and logging.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        rates: Sequence[float],
        schedule: DropoutSchedule | str = DropoutSchedule.CONSTANT,
        total_steps: int | None = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(rates) != len(layers):
            raise ConfigError(f"{len(rates)} dropout rates for {len(layers)} layers")
        self.layers = layers
        self.rates = [float(rate) for rate in rates]
        self.schedule = DropoutSchedule(schedule)
        self.total_steps = None if total_steps is None else max(int(total_steps), 1)
        self.generator = generator
        self.step = 0
        self.last_kept: list[torch.Tensor | None] = [None] * len(layers)
        self._planned: torch.Tensor | None = None  # [batch, num_layers] bool
        self._previous: list[Any] = []  # each layer's own instance ``forward``, if any
        for index, layer in enumerate(layers):
            if getattr(layer.forward, "_layer_dropout", False):
                raise ConfigError(f"decoder layer {index} already has layer dropout")
            self._previous.append(vars(layer).get("forward"))
            layer.forward = self._wrap(index, layer, layer.forward)

    def set_step(self, step: int, total_steps: int | None = None) -> None:
        """Set t (and T, when known) of the time schedule S(t)."""
        self.step = step
        if total_steps is not None:
            self.total_steps = max(int(total_steps), 1)

    def current_rates(self) -> list[float]:
        """p(l, t) = S(t) * D(l) * p_max for every layer at the current step."""
        factor = schedule_factor(self.schedule, self.step, self.total_steps)
        return [rate * factor for rate in self.rates]

    def current_rate(self, layer: int) -> float:
        """p(l, t) for 0-based ``layer`` at the current step."""
        return self.current_rates()[layer]

    def plan(self, keep: torch.Tensor | None) -> None:
        """Fix the skip decisions [batch, num_layers] (bool) of the next forward passes.

        A training loop draws them from per-sample random numbers so that a sample's
        decisions do not depend on which process holds it or on activation recomputation;
        ``None`` returns to drawing from ``generator`` in every layer call.
        """
        self._planned = keep

    def remove(self) -> None:
        """Restore the layers' own ``forward``."""
        for layer, previous in zip(self.layers, self._previous):
            if previous is None:
                vars(layer).pop("forward", None)
            else:
                layer.forward = previous

    def _keep_mask(self, index: int, batch: int, rate: float) -> torch.Tensor:
        if self._planned is not None:
            if self._planned.shape[0] != batch:
                raise ValueError(
                    f"planned skip decisions for {self._planned.shape[0]} samples, batch of {batch}"
                )
            return self._planned[:, index]
        draws = torch.rand(batch, generator=self.generator, device="cpu")  # [batch]
        return draws >= rate  # [batch] True: the sample runs this layer

    def _wrap(
        self, index: int, layer: nn.Module, forward: Callable[..., Any]
    ) -> Callable[..., Any]:
        def forward_with_dropout(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            rate = self.current_rate(index)
            if not layer.training or rate <= 0.0:
                return forward(hidden_states, *args, **kwargs)
            batch = hidden_states.shape[0]
            kept = self._keep_mask(index, batch, rate)  # [batch]
            self.last_kept[index] = kept
            if bool(kept.all()):
                return forward(hidden_states, *args, **kwargs)
            if not bool(kept.any()):  # every sample skips the layer
                touch = _zero_touch(layer)
                return (
                    hidden_states
                    if touch is None
                    else hidden_states + touch.to(hidden_states.dtype)
                )
            keep = kept.nonzero().squeeze(1).to(hidden_states.device)  # [kept]
            kwargs = {
                name: _keep_rows(value, keep, batch) if name in PER_SAMPLE_ARGUMENTS else value
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

        forward_with_dropout._layer_dropout = True  # type: ignore[attr-defined]
        return forward_with_dropout


def apply_layer_dropout(
    model: nn.Module,
    p_max: float,
    shape: DropoutShape | str = DropoutShape.EXPONENTIAL,
    schedule: DropoutSchedule | str = DropoutSchedule.CONSTANT,
    total_steps: int | None = 1,
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
    layers = find_base_model(model).layers
    rates = layer_dropout_rates(len(layers), p_max, shape)
    return LayerDropout(layers, rates, schedule, total_steps, generator)
