"""Models as users hold them: inside torch.compile or PEFT wrappers, with generation settings
this engine does not apply (set before or after the Generator), invalid ones, weights left on
the meta device, int8 dynamic quantization."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.errors import ModelLoadError, UnsupportedModelError
from self_speculation.sampling import TokenSelector

PROMPT = [5, 7, 9, 11, 13]


def test_a_compiled_or_peft_wrapper_decodes_the_model_inside() -> None:
    """The wrapper's class hid the model's own (its generation hooks, which the load check
    reads; a PEFT model was refused as "no decoder layers")."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    assert Generator(torch.compile(model), IdTokenizer()).model is model

    class PeftModelForCausalLM(torch.nn.Module):
        def __init__(self, base: torch.nn.Module) -> None:
            super().__init__()
            self.base_model = base
            self.config = base.config

        def get_base_model(self) -> torch.nn.Module:
            return self.base_model

    PeftModelForCausalLM.__module__ = "peft.peft_model"
    generator = Generator(PeftModelForCausalLM(model), IdTokenizer())
    assert generator.model is model
    reference = Generator(model, IdTokenizer()).generate(
        PROMPT, GenerationConfig(max_steps=6, sample=False)
    )
    assert generator.generate(PROMPT, GenerationConfig(max_steps=6, sample=False)).token_ids == (
        reference.token_ids
    )


def test_unapplied_settings_are_named_also_when_set_after_the_generator(caplog) -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.generation_config.num_beams = 4
    with caplog.at_level(logging.WARNING):
        generator = Generator(model, IdTokenizer())
    assert "sets num_beams=4" in caplog.text
    caplog.clear()
    config = GenerationConfig(max_steps=4, sample=False)
    with caplog.at_level(logging.WARNING):
        generator.generate(PROMPT, config)
    assert "generation config sets" not in caplog.text  # said once per distinct set
    model.generation_config.encoder_repetition_penalty = 1.3
    with caplog.at_level(logging.WARNING):
        generator.generate(PROMPT, config)
    assert "encoder_repetition_penalty=1.3" in caplog.text
    model.generation_config.bad_words_ids = [[9]]
    generator.generate(PROMPT, config)
    model.generation_config.bad_words_ids.append([99999])  # changed in place
    with pytest.raises(ModelLoadError, match="generation config cannot be applied"):
        generator.generate(PROMPT, config)


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("repetition_penalty", 0.0, "has to be a strictly positive float"),
        ("bad_words_ids", [[99999]], "generation config cannot be applied"),
        ("suppress_tokens", 5, "generation config cannot be applied"),
    ],
)
def test_a_generation_config_that_cannot_run_is_one_error(setting, value, message) -> None:
    """At construction (a checkpoint's file) and at the next generation (set afterwards),
    not a transformers traceback at the first generation."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    setattr(model.generation_config, setting, value)
    with pytest.raises(ModelLoadError, match=message):
        generator.generate(PROMPT, GenerationConfig(max_steps=4, sample=False))
    with pytest.raises(ModelLoadError, match=message):
        Generator(model, IdTokenizer())


def test_a_no_repeat_ngram_size_below_one_is_off_as_in_transformers() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    plain = Generator(model, IdTokenizer()).generate(
        PROMPT, GenerationConfig(max_steps=8, sample=False)
    )
    model.generation_config.no_repeat_ngram_size = -1
    off = Generator(model, IdTokenizer()).generate(
        PROMPT, GenerationConfig(max_steps=8, sample=False)
    )
    assert off.token_ids == plain.token_ids


def test_stop_token_ids_are_not_banned_as_bad_words() -> None:
    """transformers never bans an end-of-sequence id as a one-token bad word; stop_token_ids
    are more end-of-sequence ids (a bad word among them never stopped the generation)."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.generation_config.bad_words_ids = [[9], [10]]
    selector = TokenSelector(
        GenerationConfig(sample=False, stop_token_ids=[9]), None, model.generation_config
    )
    tokens = torch.tensor([[1, 2, 3]])
    logits = torch.zeros(1, 1, 20)
    processed = selector.process(logits, tokens, torch.tensor([0]), torch.tensor([3]))[0, 0]
    assert processed[9] == 0 and processed[10] == float("-inf")


def test_weights_on_meta_and_int8_dynamic_quantization_are_named() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.model.layers[2].mlp.up_proj.to_empty(device="meta")
    with pytest.raises(UnsupportedModelError, match=r"on the meta device .*layers\.2\.mlp"):
        Generator(model, IdTokenizer())
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)
    with pytest.raises(UnsupportedModelError, match="int8 dynamically quantized"):
        Generator(quantized, IdTokenizer())


def test_a_dtype_the_model_cannot_run_after_the_generator_is_one_error() -> None:
    """The load probe runs again after model.double() / .half(): an expert kernel that takes
    no float64 was a raw RuntimeError at the first step."""
    model = make_tiny_model("qwen2_moe", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    model.double()
    with pytest.raises(UnsupportedModelError, match="its own forward fails in float64"):
        generator.generate(PROMPT, GenerationConfig(max_steps=4, sample=False))
