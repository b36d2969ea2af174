"""The compiled CPU passes switch a model's shared config to the grouped few-query attention
for the length of each call (``attention.use_few_query_attention``). Eager code that runs
the same model meanwhile (a generation in another thread, or a plain forward) must keep
transformers' ``sdpa``, to the bit: greedy self-speculation's equality with autoregressive
decoding rests on both paths rounding alike."""

from __future__ import annotations

import threading

import torch
from tiny_models import make_tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from self_speculation.attention import (
    NAME,
    few_query_attention,
    sdpa_configs,
    use_few_query_attention,
)


def _inputs(seed: int = 0) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    query = torch.randn(2, 6, 4, 16, generator=generator)
    key, value = (torch.randn(2, 2, 40, 16, generator=generator) for _ in "kv")
    slots = torch.arange(40)
    at = 30 + torch.arange(4)[None, None, :, None]
    mask = (slots <= at) & (slots >= torch.tensor([0, 5])[:, None, None, None])
    return module, query, key, value, mask


def test_the_switched_attention_is_sdpa_outside_compiled_code() -> None:
    module, query, key, value, mask = _inputs()
    switched = AttentionInterface()[NAME]
    sdpa, _ = sdpa_attention_forward(module, query, key, value, mask)
    grouped, _ = few_query_attention(module, query, key, value, mask)
    assert not torch.equal(grouped, sdpa)  # they round apart: the check below can fail
    assert torch.equal(switched(module, query, key, value, mask)[0], sdpa)
    compiled = torch.compile(switched, backend="eager", fullgraph=True)
    assert torch.equal(compiled(module, query, key, value, mask)[0], grouped)


def test_an_eager_forward_while_the_switch_is_on_keeps_sdpa() -> None:
    """A forward of a left-padded batch (a boolean mask, the grouped form's case) in another
    thread while a compiled call holds the switch: the logits of a forward without it
    (transformers builds no mask for an attention name it does not know: the first row's
    padding was attended, its logits off by 0.2-0.4)."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    ids = torch.tensor([[0, 0, 5, 7, 9, 11], [3, 4, 8, 8, 9, 10]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention).logits
    seen = {}

    def other_thread() -> None:
        with torch.no_grad():
            seen["logits"] = model(input_ids=ids, attention_mask=attention).logits

    with use_few_query_attention(sdpa_configs(model)):
        assert model.config._attn_implementation == NAME
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert torch.equal(seen["logits"], expected)
