"""transformers installs output-capturing hooks on the layers at the first forward with
``output_hidden_states`` and keeps them: compiled generations after such a forward run
compiled (they had fallen back to eager: dynamo cannot trace the hooks' ContextVar), and
the hooks are back in their places after, capturing as before."""

from __future__ import annotations

import dataclasses

import torch
from test_compiled_lifetime import CONFIG
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import Generator
from self_speculation.model_surgery import module_state
from self_speculation.precompiled import has_hooks, model_digest

PROMPT = "def add(a, b):"


def _hidden_states(model) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor([[1, 5, 9, 3]]), output_hidden_states=True
        ).hidden_states


def test_compiled_generation_after_a_forward_with_hidden_states(monkeypatch) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    torch.manual_seed(0)
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    tokenizer = make_tiny_tokenizer()
    expected = Generator(model, tokenizer).generate(
        PROMPT, dataclasses.replace(CONFIG, compile=False)
    )
    state, digest = module_state(model), model_digest(model, None)
    hidden = _hidden_states(model)  # installs the hooks
    layer = model.model.layers[0]
    capturing = "transformers.utils.output_capturing"
    assert any(hook.__module__ == capturing for hook in layer._forward_hooks.values())
    # Nothing a compiled pass bakes in changed: no compile again, the same file on disk.
    assert module_state(model) == state
    assert model_digest(model, None) == digest
    assert not has_hooks(model)

    def user_hook(module, args, output):  # registered after the capture hook
        return None

    handle = layer.register_forward_hook(user_hook)
    hooks_before = {
        name: list(module._forward_hooks.items()) for name, module in model.named_modules()
    }
    generator = Generator(model, tokenizer)
    for _ in range(2):
        result = generator.generate(PROMPT, CONFIG)
        assert generator.fast_path_fallback(CONFIG) is None
        assert result.token_ids == expected.token_ids
    hooks_after = {
        name: list(module._forward_hooks.items()) for name, module in model.named_modules()
    }
    assert hooks_after == hooks_before
    handle.remove()
    again = _hidden_states(model)
    assert len(again) == len(hidden) == model.config.num_hidden_layers + 1
    for before, after in zip(hidden, again, strict=True):
        torch.testing.assert_close(after, before)
