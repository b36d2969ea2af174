"""Configuration knobs the family tests leave at their defaults."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Llama4TextConfig

from self_speculation import LayerwiseModel, UnsupportedModelError


def _llama4(floor_scale: int) -> torch.nn.Module:
    """Llama 4 text with every layer full attention (accepted), NoPE layers that scale their
    queries by the position (temperature tuning) from floor_scale on."""
    config = Llama4TextConfig(
        vocab_size=500, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
        no_rope_layers=[1, 0, 1, 0], layer_types=["full_attention"] * 4,
        attention_chunk_size=1000, floor_scale=floor_scale, attn_scale=0.5,
        max_position_embeddings=256, initializer_range=0.1, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("floor_scale", [8, 16, 8192])
def test_attention_reading_the_cache_length_is_refused(floor_scale: int) -> None:
    """Llama 4's temperature tuning takes positions from past_key_values.get_seq_length,
    which the engine's column cache cannot give per row (it is its capacity): accepted,
    the model decoded other tokens than its own generate from position floor_scale on.
    The probe narrows floor_scale (a length past which the family attends otherwise)."""
    model = _llama4(floor_scale)
    with pytest.raises(UnsupportedModelError, match="differs from the model's own forward") as info:
        LayerwiseModel(model)
    assert "\n" not in str(info.value)
    assert model.config.floor_scale == floor_scale  # put back
    assert all(
        getattr(module, "floor_scale", floor_scale) == floor_scale for module in model.modules()
    )


def test_a_family_reading_positions_from_the_cache_length_is_refused_by_any_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe's cache has spare columns, as decoding's has: a family taking positions
    from ``get_seq_length`` sees other ones there than in its own forward, whether or not
    a setting of it is known to the probe (here floor_scale, not narrowed)."""
    from self_speculation import model_surgery

    monkeypatch.setattr(model_surgery, "_WINDOW_SETTINGS", ("sliding_window", "keep_window_size"))
    with pytest.raises(UnsupportedModelError, match="differs from the model's own forward"):
        LayerwiseModel(_llama4(8))


@pytest.mark.parametrize("implementation", ["flex_attention", "flash_attention_2"])
def test_an_attention_implementation_without_the_engines_masks_is_named(
    implementation: str,
) -> None:
    """Flex attention on a CPU failed inside the probe with a compiler's error and "needs
    an adapter"; the implementation is named instead, before any forward."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config._attn_implementation_internal = implementation
    with pytest.raises(UnsupportedModelError, match=f"attn_implementation '{implementation}'"):
        LayerwiseModel(model)


@pytest.mark.parametrize(
    ("model_type", "named"),
    [("falcon_h1", r"not all attention \(FalconH1Mixer\)"), ("phi", "laid out otherwise")],
)
def test_a_model_without_llamas_layout_is_refused_naming_why(model_type: str, named: str) -> None:
    """A hybrid's refusal named a missing module ('norm') only; it names its non-attention
    layers, or the other layout."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        model_type, vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=named) as info:
        LayerwiseModel(AutoModelForCausalLM.from_config(config))
    assert "\n" not in str(info.value)
