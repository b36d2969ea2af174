"""A forward PRE-hook on the model or its base model is refused as a forward hook is: the
layer-wise engine never calls their forward, so the hook (which may rewrite the input ids)
would never run. Only forward hooks were tested; the pre-hook half of the check could go."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator, UnsupportedModelError

PROMPT = [5, 9, 13, 2, 7]


def _shifted_ids(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Every input id + 1 (the model's own forward reads other tokens)."""
    if kwargs.get("input_ids") is not None:
        kwargs = {**kwargs, "input_ids": kwargs["input_ids"] + 1}
    return args, kwargs


@pytest.mark.parametrize("where", ["model", "base"])
def test_a_pre_hook_the_view_never_runs_is_refused(where: str) -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    hooked = model if where == "model" else model.model
    handle = hooked.register_forward_pre_hook(_shifted_ids, with_kwargs=True)
    with pytest.raises(UnsupportedModelError, match="has a forward hook, which the layer-wise"):
        Generator(model, IdTokenizer())
    handle.remove()
    generator = Generator(model, IdTokenizer())
    hooked.register_forward_pre_hook(_shifted_ids, with_kwargs=True)
    with pytest.raises(ConfigError, match="has a forward hook, which the layer-wise"):
        generator.generate(PROMPT, GenerationConfig(max_steps=4, sample=False))
