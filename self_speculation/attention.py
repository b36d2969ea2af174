"""Attention for the compiled CPU passes: few queries over a column cache, grouped by KV head.

transformers' ``sdpa`` attention, traced by ``torch.compile``, repeats every key/value head
for each query head it serves (``repeat_kv``: a copy of the whole cache buffer per layer and
call) and then calls the CPU flash kernel, whose fixed costs dominate when a call has one to
k + 1 queries. For those calls the grouped form reads each cache buffer once, with the
query heads of a KV head stacked as rows: ``[batch, kv_heads, groups * queries, head_dim]``
against ``[batch, kv_heads, columns, head_dim]``. Measured on the shipped model's shapes
(24 layers, 1 KV head of 3, 300 columns, compiled): 205 vs 340 us per layer at batch 8 and
one query, 444 vs 700 us at batch 8 and six, 62 vs 85 us at batch 1.

``ForwardPasses`` switches a model that runs ``sdpa`` to this function only for its
compiled calls (``use_few_query_attention``; eager code that runs meanwhile, in another
thread, keeps ``sdpa``); anything the grouped form does not cover
(more queries, training dropout, float masks, soft-capping, attention sinks, other
devices or dtypes) goes to transformers' own ``sdpa_attention_forward``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "layerskip_few_query"
MAX_QUERIES = 16  # verification's k + 1 positions; prefill goes to sdpa
# Keyword arguments that change the attention's math; the grouped form handles none of them.
_UNSUPPORTED = ("softcap", "sinks", "s_aux", "position_bias", "output_attentions")


def _given(value: object) -> bool:
    """Whether a keyword argument asks for something (a tensor such as attention sinks
    always does: its truth value would raise for several values, and read 0 as none)."""
    return isinstance(value, torch.Tensor) or bool(value)


def few_query_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [batch, heads, n, dim], key/value
    [batch, kv_heads, columns, dim], a boolean mask [batch, 1, n, columns] (True: visible).

    Returns:
        The attention output [batch, n, heads, dim] and no weights.
    """
    batch, heads, queries, _ = query.shape
    kv_heads, columns = key.shape[1], key.shape[2]
    if (
        queries > MAX_QUERIES
        or dropout
        or query.device.type != "cpu"
        or query.dtype not in (torch.float32, torch.float64)
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or heads % kv_heads
        or any(_given(kwargs.get(name)) for name in _UNSUPPORTED)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = heads // kv_heads
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # Query head h reads KV head h // groups (repeat_kv's order).
    stacked = query.reshape(batch, kv_heads, groups * queries, -1)
    scores = torch.matmul(stacked, key.transpose(-1, -2)) * scale  # [b, kv, g * n, columns]
    scores = scores.view(batch, kv_heads, groups, queries, columns)
    scores = scores.masked_fill(~attention_mask[:, :, None], float("-inf"))
    probabilities = scores.softmax(dim=-1).view(batch, kv_heads, groups * queries, columns)
    output = torch.matmul(probabilities, value)  # [batch, kv_heads, groups * n, dim]
    output = output.view(batch, heads, queries, -1).transpose(1, 2).contiguous()
    return output, None


def _compiled_calls_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """What a config switched to ``NAME`` calls: ``few_query_attention`` in code that
    torch.compile traces (the compiled passes), transformers' ``sdpa`` elsewhere. The switch
    is on the model's shared config, so an eager forward of the same model in another
    thread during a compiled call reads it too; it keeps the attention it chose."""
    if torch.compiler.is_compiling():
        return few_query_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(NAME, _compiled_calls_attention)
# transformers builds masks by the implementation's name, and none for a name it does not
# know (a model's own forward would then drop its padding): sdpa's masks, as sdpa would get.
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def sdpa_configs(model: torch.nn.Module) -> list:
    """The configs of ``model``'s attention modules that select ``sdpa`` (one per config
    object: a multimodal model's text config, or the model's own)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "layer_idx") and config is not None:
            if getattr(config, "_attn_implementation", None) == "sdpa":
                configs[id(config)] = config
    return list(configs.values())


@contextmanager
def use_few_query_attention(configs: list) -> Iterator[None]:
    """Within the block, attention modules of these configs call ``few_query_attention``
    (those still on ``sdpa``: a model switched to another implementation since keeps it)."""
    switched = [config for config in configs if config._attn_implementation_internal == "sdpa"]
    for config in switched:
        config._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for config in switched:
            config._attn_implementation_internal = "sdpa"
