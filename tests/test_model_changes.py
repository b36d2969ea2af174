"""A model changed after its Generator was made: compiled passes follow what they bake in
(hooks, module settings, swapped submodules) by compiling again, and a replaced head,
embedding or layer, which the layer-wise view itself holds, is one error.

Compiled passes do not re-check the model's modules at each call (that cost 0.75 ms per
call), so without these checks a hook added, or an adapter merged or switched off, after
the first compiled generation was silently ignored (wrong tokens). Traced with dynamo's
eager backend: what is checked is which code runs, not inductor's kernels.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator
from self_speculation.model_surgery import module_state
from self_speculation.passes import COMPILE_BACKEND_VARIABLE

PROMPT = [5, 7, 9, 11, 13]


class Scaled(torch.nn.Module):
    """A wrapper with a plain setting its forward reads (as PEFT's merged / disabled flags)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.factor = 1.0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden) * self.factor


@pytest.fixture()
def generator(monkeypatch: pytest.MonkeyPatch) -> Generator:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.model.layers[1].mlp = Scaled(model.model.layers[1].mlp)
    return Generator(model, IdTokenizer())


def tokens(generator: Generator, strategy: str, compile: bool) -> list[int]:
    settings = dict(max_steps=12, sample=False, generation_strategy=strategy, compile=compile)
    if strategy == "self_speculative":
        settings.update(exit_layer=2, num_speculations=3)
    return generator.generate(PROMPT, GenerationConfig(**settings)).token_ids


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_compiled_passes_follow_hooks_settings_and_swapped_modules(
    generator: Generator, strategy: str
) -> None:
    model = generator.model
    tokens_before = tokens(generator, strategy, False)
    assert tokens(generator, strategy, True) == tokens_before
    compiled = generator._forward_passes[True]
    assert tokens(generator, strategy, True) == tokens(generator, strategy, False)
    assert generator._forward_passes[True] is compiled  # nothing changed: nothing compiled

    handle = model.model.layers[2].register_forward_hook(lambda module, args, out: -out)
    hooked = tokens(generator, strategy, False)
    assert hooked != tokens_before
    assert tokens(generator, strategy, True) == hooked
    handle.remove()

    model.model.layers[1].mlp.factor = -20.0
    scaled = tokens(generator, strategy, False)
    assert scaled != hooked
    assert tokens(generator, strategy, True) == scaled

    model.model.layers[0].mlp.act_fn = torch.nn.Tanh()
    swapped = tokens(generator, strategy, False)
    assert swapped != scaled
    assert tokens(generator, strategy, True) == swapped
    assert generator._forward_passes[True] is not compiled


def test_a_generation_changes_no_module_state(generator: Generator) -> None:
    """What the comparison reads is left as it was by the engine's own generations (else
    every compiled generation would compile again)."""
    before = module_state(generator.model)
    for strategy in ("autoregressive", "self_speculative"):
        for compile in (False, True):
            tokens(generator, strategy, compile)
    assert module_state(generator.model) == before


def test_a_replaced_head_or_layer_is_one_error(generator: Generator) -> None:
    model = generator.model
    tokens(generator, "autoregressive", False)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    with pytest.raises(ConfigError, match="lm_head was replaced since this Generator"):
        tokens(generator, "autoregressive", False)
    fresh = Generator(model, IdTokenizer())
    assert len(tokens(fresh, "self_speculative", False)) == 12
    model.model.layers[3] = make_tiny_model("llama_mha_untied", dtype=torch.float32).model.layers[3]
    with pytest.raises(ConfigError, match="a decoder layer was replaced"):
        tokens(fresh, "autoregressive", True)


@pytest.mark.parametrize(
    "family",
    [
        "llama_dynamic_rope",
        "phi3_longrope",
        "gemma3_text",
        "gpt_oss_sinks_sliding",
        "deepseek_v2_mla",
        "qwen3_moe",
    ],
)
def test_a_generation_changes_no_module_state_in_families_with_moving_parts(family) -> None:
    """Rotary tables that update, routers, sinks, latent attention: a generation of any
    strategy leaves what the comparison reads as it was (one state per generation is read,
    at its start, and kept as what the passes saw)."""
    model = make_tiny_model(family, dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    before = module_state(model)
    for strategy in ("autoregressive", "self_speculative"):
        tokens(generator, strategy, False)
    longest = min(57, (generator.layerwise.context_length or 100) - 8)
    generator.generate(list(range(3, 3 + longest)), GenerationConfig(max_steps=8, sample=False))
    assert module_state(model) == before
