"""Exactness beyond the core families: sliding windows on every layer, mixtures of experts,
rotary types whose tables depend on the call, generation hooks, and what is refused.

Every accepted family decodes like transformers' own greedy ``generate`` (one prompt at a
time) with the autoregressive strategy, and self-speculation and batching (left-padded rows
of unequal lengths) give the autoregressive tokens; sequences run past every window and, in
the capped families, up to the RoPE switch point.
"""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import (
    FAMILIES_BEYOND,
    FAMILIES_MULTIMODAL,
    FAMILIES_REGISTERED,
    ROPE_SWITCH,
    IdTokenizer,
    _registered_config,
    make_tiny_model,
)
from transformers import (
    AutoModelForCausalLM,
    DogeConfig,
    DogeForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from self_speculation import (
    ConfigError,
    GenerationConfig,
    Generator,
    LayerwiseModel,
    UnsupportedModelError,
)
from self_speculation.model_support import unapplied_generation_settings

CAPPED = {"llama_longrope", "phi3_longrope"}  # context ends at ROPE_SWITCH
PROMPTS = [[5, 60, 7, 200, 31, 9, 44, 12, 90, 3], [17, 4], [8, 8, 9, 100, 101]]
MAX_STEPS = 30  # past every window (4) and, in the capped families, up to the switch


@functools.cache
def generator_for(family: str) -> Generator:
    return Generator(make_tiny_model(family), IdTokenizer())


def settings(strategy: str = "autoregressive", **overrides) -> GenerationConfig:
    return GenerationConfig(
        max_steps=MAX_STEPS, sample=False, generation_strategy=strategy, **overrides
    )


ALL_BEYOND = [*FAMILIES_BEYOND, *FAMILIES_REGISTERED, *FAMILIES_MULTIMODAL]


@pytest.mark.parametrize("family", ALL_BEYOND)
def test_autoregressive_equals_transformers_generate(family: str) -> None:
    generator = generator_for(family)
    model = generator.layerwise.model
    for prompt in PROMPTS:
        ours = generator.generate(prompt, settings())
        theirs = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=MAX_STEPS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        # Ours also stops at the model's end-of-sequence token; theirs was told not to.
        assert ours.token_ids == theirs[: len(ours.token_ids)], prompt
        if family in CAPPED:
            assert ours.stop_reason == "context_length"
            assert len(prompt) + len(ours.token_ids) == ROPE_SWITCH
        elif ours.stop_reason != "eos":
            assert len(ours.token_ids) == MAX_STEPS


@pytest.mark.parametrize("family", ALL_BEYOND)
def test_self_speculation_and_batches_equal_single_autoregressive_runs(family: str) -> None:
    generator = generator_for(family)
    single = [generator.generate(prompt, settings()).token_ids for prompt in PROMPTS]
    batched = generator.generate_batch(PROMPTS, settings())
    assert [result.token_ids for result in batched] == single
    for exit_layer, num_speculations in ((1, 3), (2, 1), (3, 5), (4, 2)):
        speculative = settings(
            "self_speculative", exit_layer=exit_layer, num_speculations=num_speculations
        )
        results = generator.generate_batch(PROMPTS, speculative)
        assert [result.token_ids for result in results] == single, (exit_layer, num_speculations)
        assert generator.generate(PROMPTS[0], speculative).token_ids == single[0]


@pytest.mark.parametrize("family", ["mistral_sliding", "llama_longrope", "phi3_longrope"])
@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_compiled_path_equals_eager_past_windows_and_up_to_switch_points(
    family: str, strategy: str
) -> None:
    generator = Generator(make_tiny_model(family, dtype=torch.float32), IdTokenizer())
    eager = [r.token_ids for r in generator.generate_batch(PROMPTS, settings())]
    extra = dict(exit_layer=2, num_speculations=3) if strategy == "self_speculative" else {}
    fast = generator.generate_batch(PROMPTS, settings(strategy, compile=True, **extra))
    assert [r.token_ids for r in fast] == eager


def test_a_window_without_layer_types_applies_to_every_layer() -> None:
    layerwise = generator_for("mistral_sliding").layerwise
    assert layerwise.layer_types == ["sliding_attention"] * layerwise.num_layers
    # The cache keeps every column (a window cache would drop what a rollback restores).
    cache = layerwise.new_cache()
    ids = torch.tensor([PROMPTS[0]])  # [1, 10]
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    layerwise.run_layers(layerwise.embed(ids), 0, layerwise.num_layers, cache, positions)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [10] * layerwise.num_layers


def test_the_load_time_check_sees_a_window_shorter_than_its_probe() -> None:
    """The check narrows windows below its probe length: treating Mistral's windowed
    layers as full attention, as this project once did, is caught there, even though the
    model's real window (4096 in Mistral-7B) is longer than any probe."""
    model = make_tiny_model("mistral_sliding", sliding_window=4096)
    layerwise = LayerwiseModel(model, verify=False)
    layerwise.layer_types = ["full_attention"] * layerwise.num_layers
    layerwise.has_sliding_layers = False
    with pytest.raises(UnsupportedModelError, match="differs from the model's own forward"):
        layerwise._verify_against_own_forward()
    assert model.config.sliding_window == 4096  # the probe put the window back
    LayerwiseModel(model)  # derived correctly, the same model passes


@pytest.mark.parametrize("family", sorted(CAPPED))
def test_position_dependent_rope_caps_the_context_at_its_switch_point(family: str) -> None:
    generator = generator_for(family)
    assert generator.layerwise.context_length == ROPE_SWITCH
    with pytest.raises(ConfigError, match="context"):
        generator.generate(list(range(3, 3 + ROPE_SWITCH)), settings())


def test_dynamic_rope_is_clamped_at_the_context_and_keeps_its_length() -> None:
    layerwise = generator_for("llama_dynamic_rope").layerwise
    assert layerwise.context_length == layerwise.config.max_position_embeddings
    assert layerwise.rotary_position_limit == layerwise.context_length


def test_static_rope_types_keep_the_whole_context_unclamped() -> None:
    for family in ("llama3_rope", "llama_yarn", "mistral_sliding"):
        layerwise = generator_for(family).layerwise
        assert layerwise.rotary_position_limit is None
        assert layerwise.context_length == layerwise.config.max_position_embeddings


@pytest.mark.parametrize("family", ["mixtral_sliding", "qwen2_moe"])
def test_a_forward_failing_in_the_dtype_is_one_line_naming_a_dtype_that_works(
    family: str,
) -> None:
    model = make_tiny_model(family).to(torch.float64)
    with pytest.raises(
        UnsupportedModelError, match=r"fails in float64 .*try --dtype float32"
    ) as info:
        LayerwiseModel(model)
    assert "\n" not in str(info.value)


def test_chunked_attention_is_refused() -> None:
    config = Llama4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        intermediate_size_mlp=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
    )
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        from self_speculation.model_support import attention_layer_types

        attention_layer_types(config, 4, "Llama4ForCausalLM")


class _HookedLlama(LlamaForCausalLM):
    """A family whose generation hook does something of its own."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return super().prepare_inputs_for_generation(*args, **kwargs)


def _tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **overrides,
    )


def test_an_unknown_generation_hook_is_refused() -> None:
    model = _HookedLlama(_tiny_llama_config()).eval()
    with pytest.raises(UnsupportedModelError, match="prepare_inputs_for_generation"):
        LayerwiseModel(model)


class _CallDependentRotary(LlamaRotaryEmbedding):
    """Tables scaled by the largest position of the call: no switch point makes it exact."""

    def forward(self, x, position_ids):
        cos, sin = super().forward(x, position_ids)
        scale = 1.0 + position_ids.max().to(cos.dtype) / 1000
        return cos * scale, sin * scale


def test_rotary_tables_that_depend_on_the_call_everywhere_are_refused() -> None:
    model = LlamaForCausalLM(_tiny_llama_config()).eval()
    model.model.rotary_emb = _CallDependentRotary(model.config)
    with pytest.raises(UnsupportedModelError, match="rotary embedding"):
        LayerwiseModel(model)


class _FailingRotary(LlamaRotaryEmbedding):
    """A rotary module the engine cannot call as it calls the family's own."""

    def forward(self, x, position_ids):
        raise KeyError("full_attention")


def test_a_rotary_embedding_that_fails_when_called_is_one_line() -> None:
    model = LlamaForCausalLM(_tiny_llama_config()).eval()
    model.model.rotary_emb = _FailingRotary(model.config)
    with pytest.raises(UnsupportedModelError, match="cannot be called") as info:
        LayerwiseModel(model)
    assert "\n" not in str(info.value)


def test_a_window_of_one_is_refused() -> None:
    """transformers' own cached generate disagrees with its own forward at window 1."""
    with pytest.raises(UnsupportedModelError, match="sliding_window >= 2"):
        LayerwiseModel(make_tiny_model("mistral_sliding", sliding_window=1))


def test_checkpoint_generation_settings_the_engine_does_not_apply_are_named() -> None:
    model = make_tiny_model("llama_mha_untied")
    model.generation_config.repetition_penalty = 1.05  # applied: not named
    assert unapplied_generation_settings(model) == []
    model.generation_config.begin_suppress_tokens = [3]
    model.generation_config.min_new_tokens = 2
    assert unapplied_generation_settings(model) == ["begin_suppress_tokens=[3]", "min_new_tokens=2"]
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    assert unapplied_generation_settings(model)[-2:] == ["do_sample=True", "temperature=0.7"]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("repetition_penalty", 1.5),
        ("no_repeat_ngram_size", 2),
        ("suppress_tokens", [22]),
        ("bad_words_ids", [[22], [5, 6]]),
    ],
)
def test_a_checkpoint_s_sequence_processors_decode_as_transformers_generate(
    setting: str, value
) -> None:
    """Qwen2.5-Instruct ships repetition_penalty 1.05: generate applies it, greedy too."""
    model = make_tiny_model("llama_mha_untied")
    model.generation_config.eos_token_id = None
    setattr(model.generation_config, setting, value)
    generator = Generator(model, IdTokenizer())
    prompt = [9, 8, 7, 6, 5, 4, 3]
    ours = generator.generate(prompt, settings()).token_ids
    theirs = model.generate(
        torch.tensor([prompt]), max_new_tokens=MAX_STEPS, do_sample=False, pad_token_id=2
    )[0, len(prompt) :].tolist()
    assert ours == theirs
    for exit_layer, num_speculations in ((1, 3), (2, 2), (4, 5)):
        speculative = settings(
            "self_speculative", exit_layer=exit_layer, num_speculations=num_speculations
        )
        assert generator.generate(prompt, speculative).token_ids == ours


def test_a_prompt_past_a_capped_context_says_what_capped_it() -> None:
    generator = generator_for("llama_longrope")
    with pytest.raises(ConfigError, match="where its rotary tables switch"):
        generator.generate(list(range(3, 3 + ROPE_SWITCH)), settings())


def test_the_generator_warns_of_checkpoint_settings_it_does_not_apply(caplog) -> None:
    model = make_tiny_model("llama_mha_untied")
    model.generation_config.begin_suppress_tokens = [3]
    with caplog.at_level("WARNING"):
        Generator(model, IdTokenizer())
    assert "begin_suppress_tokens=[3]" in caplog.text


def doge(**settings) -> DogeForCausalLM:
    config = DogeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **settings,
    )
    torch.manual_seed(0)
    return DogeForCausalLM(config).to(torch.float64).eval()


def test_attention_that_changes_past_a_config_length_is_seen_by_the_load_time_check() -> None:
    """Doge keeps only its top keep_window_size keys past that length (2048 in real
    checkpoints), which the engine's cached decoding does not reproduce: the check narrows
    the setting below its probe, on the config and on the modules that copied it."""
    model = doge(keep_window_size=2048)
    with pytest.raises(UnsupportedModelError, match="differs from the model's own forward"):
        LayerwiseModel(model)
    assert model.config.keep_window_size == 2048  # put back


def test_a_keep_window_inside_a_longer_sliding_window_is_seen_by_the_load_time_check() -> None:
    """Doge's top-k keys inside a longer sliding window: narrowed to one length, the window
    hid the top-k from the check and the model decoded otherwise than its own generate.
    The check keeps the two lengths in order; a keep window the sliding window covers (so
    that it never binds) is accepted and exact."""
    with pytest.raises(UnsupportedModelError, match="differs from the model's own forward"):
        LayerwiseModel(doge(keep_window_size=8, sliding_window=64))
    model = doge(keep_window_size=2048, sliding_window=4)
    prompt = list(range(5, 17))
    ours = Generator(model, IdTokenizer()).generate(prompt, settings()).token_ids
    theirs = model.generate(
        torch.tensor([prompt]), max_new_tokens=MAX_STEPS, do_sample=False, eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()  # fmt: skip
    assert ours == theirs[: len(ours)] and len(ours) == MAX_STEPS


def test_decoder_layers_with_attention_of_other_cache_layers_are_refused() -> None:
    """LongCat-Flash's decoder layer i holds two attention modules, of cache layers 2i and
    2i + 1: accepted at load, it failed in the cache on the first step (an IndexError);
    now refused in one line, as the engine keeps one cache layer per decoder layer."""
    config = _registered_config("longcat_flash")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedModelError, match="holds attention of cache layer 1"):
        Generator(model, IdTokenizer())
