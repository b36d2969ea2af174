"""The LayerSkip training objective as one module (what FSDP or DDP wraps).

:class:`LayerSkipObjective` runs the model's own base model forward (so embeddings, masks,
rotary embeddings and family scalars are the model's), records the raw outputs of the
decoder layers whose exits are supervised, and applies :func:`early_exit_loss` with the
model's own head, one exit at a time. With only the last exit supervised it is the plain
next-token loss.

Under FSDP the objective is the root module: the embeddings, final norm and LM head (the
parameters outside the decoder layers) are gathered for its whole forward, loss included.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from self_speculation.errors import UnsupportedModelError
from self_speculation.model_surgery import LayerwiseModel
from self_speculation.training.early_exit_loss import (
    IGNORE_INDEX,
    EarlyExitLoss,
    ExitScale,
    check_exit_layers,
    early_exit_loss,
)


def router_loss(model: nn.Module) -> Callable[[Any], torch.Tensor] | None:
    """The weighted load-balancing loss that ``model``'s own ``labels=`` loss adds when its
    config sets ``output_router_logits`` (mixtures of experts), as a function of the base
    model's ``router_logits``; None when the config does not ask for it or the family's own
    loss adds none.

    Raises:
        UnsupportedModelError: the config asks for it and the family's module has the loss,
            but the model lacks the coefficient or expert counts it takes.
    """
    # A multimodal MoE (Qwen3-VL-MoE) keeps the flag, coefficient and expert counts in its
    # text_config, where its own loss reads them.
    config = model.config.get_text_config(decoder=True)
    if not getattr(config, "output_router_logits", False):
        return None
    function = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    if function is None:  # the family's own loss adds none (DeepSeek-V2, GLM-4 MoE...)
        return None
    owner = model if config is model.config else config
    coefficient = getattr(owner, "router_aux_loss_coef", getattr(owner, "aux_loss_coef", None))
    experts = getattr(owner, "num_experts", None)
    top_k = getattr(owner, "num_experts_per_tok", None)
    if coefficient is None or experts is None or top_k is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: its config sets output_router_logits, but LayerSkip "
            "cannot add this family's router loss; set output_router_logits to false"
        )
    return lambda router_logits: coefficient * function(router_logits, experts, top_k, None)


class LayerSkipObjective(nn.Module):
    """Early-exit loss over a causal LM (paper §4.2), as an ``nn.Module``.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral, Gemma, Granite...).
        scale: depth scale e(l) of the exit weights.
        e_scale: multiplier of the non-final exits' weights.
        position_fraction: share of positions supervised at each non-final exit.
        generator: random source of the position subsets.
    """

    def __init__(
        self,
        model: nn.Module,
        scale: ExitScale | str = ExitScale.LINEAR,
        e_scale: float = 1.0,
        position_fraction: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # Checks that norm + head reproduce the model's own logits before training on them.
        # A plain object, not a submodule: the parameters stay registered once, under .model.
        self._layerwise = LayerwiseModel(model, verify=True)
        self.num_layers = self._layerwise.num_layers
        self._router_loss = router_loss(model)
        self.scale = ExitScale(scale)
        self.e_scale = e_scale
        self.position_fraction = position_fraction
        self.generator = generator

    def forward(
        self,
        input_ids: torch.Tensor,
        exit_layers: Sequence[int],
        position_noise: torch.Tensor | None = None,
    ) -> EarlyExitLoss:
        """Loss of next-token prediction on ``input_ids`` [batch, seq] at ``exit_layers``.

        Position i predicts token i + 1; the last position has no target.

        Args:
            input_ids: [batch, seq] token ids.
            exit_layers: the 1-based exits to supervise.
            position_noise: optional U(0, 1) draws [num_layers, batch, seq], row ``E - 1``
                choosing the positions supervised at exit ``E`` (``position_fraction`` < 1);
                None: drawn from ``generator``.
        """
        wanted = sorted(set(exit_layers))
        check_exit_layers(wanted, self.num_layers)  # before a hook goes on layers[exit - 1]
        captured: dict[int, torch.Tensor] = {}

        def recorder(exit_layer: int):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                captured[exit_layer] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [
            self._layerwise.layers[layer - 1].register_forward_hook(recorder(layer))
            for layer in wanted
        ]
        extra = {"output_router_logits": True} if self._router_loss is not None else {}
        try:
            outputs = self._layerwise.base(input_ids=input_ids, use_cache=False, **extra)
        finally:
            for handle in handles:
                handle.remove()
        targets = torch.full_like(input_ids, IGNORE_INDEX)  # [batch, seq]
        targets[:, :-1] = input_ids[:, 1:]
        result = early_exit_loss(
            [captured[layer] for layer in wanted],
            wanted,
            targets,
            self._layerwise.unembed,
            self.num_layers,
            scale=self.scale,
            e_scale=self.e_scale,
            position_fraction=self.position_fraction,
            generator=self.generator,
            position_noise=None
            if position_noise is None
            else position_noise[[layer - 1 for layer in wanted]].to(input_ids.device),
        )
        # The model's own labels= loss adds it; layer dropout may leave no routed layer
        # at all (every sample skipped every layer with experts): no routing to balance.
        if self._router_loss is not None and outputs.router_logits:
            result.loss = result.loss + self._router_loss(outputs.router_logits)
        return result
