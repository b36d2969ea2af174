"""An exit adapter built after a forward with ``output_hidden_states`` (which installs
transformers' output-capturing hooks on the layers) decodes on the fast path: its copy of
the layer leaves those hooks behind (they came with the copy, and dynamo failed on them:
every compiled generation with the adapter ran eager)."""

from __future__ import annotations

import dataclasses

import torch
from test_capture_threads import PROMPT
from test_compiled_lifetime import CONFIG as LIFETIME_CONFIG
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import Generator
from self_speculation.draft import DraftExit, ExitAdapter
from self_speculation.model_surgery import is_capture_hook

CONFIG = dataclasses.replace(LIFETIME_CONFIG, exit_layer=3)


def test_adapter_built_after_a_forward_with_hidden_states_decodes_compiled(monkeypatch) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    monkeypatch.setenv("LAYERSKIP_PRECOMPILE", "0")
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    with torch.no_grad():  # installs the hooks
        model(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    layer = model.model.layers[3]
    assert any(map(is_capture_hook, layer._forward_hooks.values()))
    adapter = ExitAdapter(generator.layerwise, 3).requires_grad_(False)
    generator.draft = DraftExit(generator.layerwise, adapter)
    expected = generator.generate(PROMPT, dataclasses.replace(CONFIG, compile=False))
    result = generator.generate(PROMPT, CONFIG)
    assert generator.fast_path_fallback(CONFIG) is None
    assert result.token_ids == expected.token_ids
    assert not any(
        is_capture_hook(hook)
        for module in adapter.modules()
        for hook in module._forward_hooks.values()
    )
    assert any(map(is_capture_hook, layer._forward_hooks.values()))  # the model keeps its own
