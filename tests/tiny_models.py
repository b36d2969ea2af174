"""Tiny random decoder models and a tiny tokenizer, built offline for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Cohere2Config,
    CohereConfig,
    DeepseekV2Config,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GptOssConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
    SmolLM3Config,
    StableLmConfig,
    Starcoder2Config,
)

VOCAB_SIZE = 320  # model vocabulary; the tokenizer uses at most TOKENIZER_VOCAB of it
TOKENIZER_VOCAB = 300
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

# name -> (config class, overrides)
FAMILIES = {
    "llama_mha_untied": (LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_gqa_tied": (LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2": (Qwen2Config, dict(num_key_value_heads=2)),
    "mistral": (MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "gemma": (GemmaConfig, dict(num_key_value_heads=1, head_dim=8)),
    "qwen3": (Qwen3Config, dict(num_key_value_heads=2, head_dim=8)),
    "phi3": (Phi3Config, dict(num_key_value_heads=2)),
    # Sliding windows shorter than the tests' sequences, alternating with full attention.
    "qwen2_sliding": (
        Qwen2Config,
        dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    ),
    "gemma2_softcap_sliding": (
        Gemma2Config,
        dict(num_key_value_heads=2, head_dim=8, sliding_window=4, final_logit_softcapping=5.0),
    ),
    "gemma3_text": (Gemma3TextConfig, dict(num_key_value_heads=2, head_dim=8, sliding_window=4)),
}

# Position-dependent RoPE switches at this many positions in the families below that have one.
ROPE_SWITCH = 24
_HEAD_DIM = _COMMON["hidden_size"] // _COMMON["num_attention_heads"]
_LONGROPE = dict(
    rope_type="longrope",
    rope_theta=10000.0,
    short_factor=[1.0] * (_HEAD_DIM // 2),
    long_factor=[3.0 + i for i in range(_HEAD_DIM // 2)],
    original_max_position_embeddings=ROPE_SWITCH,
    factor=4.0,
)
_EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# Families and configurations real checkpoints use beyond FAMILIES: windows on every layer
# without layer_types, mixtures of experts (float32: transformers' grouped expert kernel
# takes no float64), other rotary types, other norms and scalars. name -> (config class,
# overrides, dtype).
FAMILIES_BEYOND = {
    "mistral_sliding": (MistralConfig, dict(num_key_value_heads=2, sliding_window=4), None),
    "starcoder2_sliding": (Starcoder2Config, dict(num_key_value_heads=2, sliding_window=4), None),
    "mixtral_sliding": (
        MixtralConfig,
        dict(num_key_value_heads=2, sliding_window=4, num_local_experts=4, num_experts_per_tok=2),
        torch.float32,
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        dict(num_key_value_heads=2, num_experts=4, shared_expert_intermediate_size=32, **_EXPERTS),
        torch.float32,
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        dict(num_key_value_heads=2, head_dim=8, num_experts=4, **_EXPERTS),
        torch.float32,
    ),
    "gpt_oss_sinks_sliding": (
        GptOssConfig,
        dict(num_key_value_heads=2, head_dim=8, sliding_window=4, num_local_experts=4),
        torch.float32,
    ),
    # Multi-head latent attention; its rotary returns one complex table.
    "deepseek_v2_mla": (
        DeepseekV2Config,
        dict(
            num_key_value_heads=4,
            head_dim=8,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
        ),
        torch.float32,
    ),
    "olmo2": (Olmo2Config, dict(num_key_value_heads=2), None),
    "olmo3_sliding": (Olmo3Config, dict(num_key_value_heads=2, sliding_window=4), None),
    "cohere": (CohereConfig, dict(num_key_value_heads=2, logit_scale=0.5), None),
    "cohere2_sliding": (Cohere2Config, dict(num_key_value_heads=2, sliding_window=4), None),
    "granite_scalars": (
        GraniteConfig,
        dict(embedding_multiplier=3.0, logits_scaling=7.0, residual_multiplier=0.5),
        None,
    ),
    "stablelm_partial_rotary": (
        StableLmConfig,
        dict(num_key_value_heads=2, partial_rotary_factor=0.5),
        None,
    ),
    "smollm3_no_rope_layers": (SmolLM3Config, dict(num_key_value_heads=2), None),
    "llama3_rope": (
        LlamaConfig,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=ROPE_SWITCH,
            )
        ),
        None,
    ),
    "llama_yarn": (
        LlamaConfig,
        dict(
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=ROPE_SWITCH,
            )
        ),
        None,
    ),
    "llama_dynamic_rope": (
        LlamaConfig,
        dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
        None,
    ),
    # Context capped at ROPE_SWITCH: the tables switch there (and Phi-3 resets its cache).
    "llama_longrope": (LlamaConfig, dict(rope_parameters=_LONGROPE), None),
    "phi3_longrope": (
        Phi3Config,
        dict(
            num_key_value_heads=2,
            rope_parameters=_LONGROPE,
            original_max_position_embeddings=ROPE_SWITCH,
        ),
        None,
    ),
}

# More families, as transformers registers them (model_type), built from their default
# config shrunk to the sizes above (float32; several are mixtures of experts). Each decoded
# exactly in a probe over every registered causal LM (2026-12-05); they differ from the
# families above in attention (differential, mixture of attention heads), activations,
# norms, routers or layer kinds.
FAMILIES_REGISTERED = (
    "afmoe",
    "apertus",
    "bitnet",
    "cohere2_moe",
    "diffllama",
    "ernie4_5_moe",
    "exaone4",
    "flex_olmo",
    "glm4",
    "glm4_moe",
    "granitemoe",
    "helium",
    "hunyuan_v1_moe",
    "jetmoe",
    "laguna",
    "mimo_v2_flash",
    "minimax_m2",
    "nemotron",
    "olmoe",
    "seed_oss",
    "vaultgemma",
)
_REGISTERED_SIZES = dict(
    _COMMON,
    num_key_value_heads=2,
    head_dim=8,
    sliding_window=4,
    moe_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
)


# Multimodal checkpoints decoded text-only (their text decoder under .model.language_model).
# Multimodal checkpoints whose language model is decoded text-only; all but Gemma 3 are
# loaded by AutoModelForImageTextToText (AutoModelForCausalLM does not know them).
FAMILIES_MULTIMODAL = (
    "gemma3_multimodal",
    "mistral3",
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
)
_MULTIMODAL_VISION = dict(
    depth=1,
    num_hidden_layers=1,
    hidden_size=32,
    embed_dim=32,
    intermediate_size=64,
    num_heads=2,
    num_attention_heads=2,
    out_hidden_size=32,
    image_size=28,
    patch_size=14,
)


def _multimodal_config(family: str, **overrides):
    if family != "gemma3_multimodal":
        config = AutoConfig.for_model(family)
        text = config.text_config
        for name, value in {**_COMMON, "num_key_value_heads": 2, **overrides}.items():
            setattr(text, name, value)
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[: text.num_hidden_layers]
        if getattr(text, "head_dim", None):  # the default config's, for its own sizes
            text.head_dim = text.hidden_size // text.num_attention_heads
        if "mrope_section" in (getattr(text, "rope_parameters", None) or {}) or "qwen" in family:
            # Qwen's multimodal rotary sections (temporal, height, width) of head_dim / 2.
            text.rope_parameters = {**text.rope_parameters, "mrope_section": [2, 1, 1]}
        for name, value in _MULTIMODAL_VISION.items():
            if hasattr(config.vision_config, name):
                setattr(config.vision_config, name, value)
        # Untied: a tied random tiny model mostly repeats its last token (Mistral 3's did).
        config.tie_word_embeddings = text.tie_word_embeddings = False
        for name in ("image_token_id", "image_token_index", "video_token_id"):
            if hasattr(config, name):
                setattr(config, name, VOCAB_SIZE - 3)
        return config
    text = Gemma3TextConfig(
        **{**_COMMON, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4, **overrides}
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=VOCAB_SIZE - 3,
        boi_token_index=VOCAB_SIZE - 2,
        eoi_token_index=VOCAB_SIZE - 1,
    )


def _registered_config(model_type: str):
    """``model_type``'s default config with every size it has from _REGISTERED_SIZES, and
    per-layer kinds cut to its number of layers."""
    config = AutoConfig.for_model(model_type)
    for name, value in _REGISTERED_SIZES.items():
        if hasattr(config, name):
            setattr(config, name, value)
    if getattr(config, "layer_types", None):
        config.layer_types = (list(config.layer_types) * config.num_hidden_layers)[
            : config.num_hidden_layers
        ]
    return config


def make_tiny_model(
    family: str = "llama_mha_untied", seed: int = 0, dtype=torch.float64, **overrides
):
    """A randomly initialised tiny causal LM of ``family`` (FAMILIES, FAMILIES_BEYOND,
    FAMILIES_REGISTERED or FAMILIES_MULTIMODAL) in eval mode; a FAMILIES_BEYOND family that states a dtype gets
    that dtype, a FAMILIES_REGISTERED one float32."""
    if family in FAMILIES_REGISTERED:
        config, dtype = _registered_config(family), torch.float32
        for name, value in overrides.items():
            setattr(config, name, value)
    elif family in FAMILIES_MULTIMODAL:
        config = _multimodal_config(family, **overrides)
    else:
        if family in FAMILIES_BEYOND:
            config_class, family_overrides, family_dtype = FAMILIES_BEYOND[family]
            dtype = family_dtype or dtype
        else:
            config_class, family_overrides = FAMILIES[family]
        config = config_class(**{**_COMMON, **family_overrides, **overrides})
    torch.manual_seed(seed)
    loads = AutoModelForCausalLM
    if family in FAMILIES_MULTIMODAL and family != "gemma3_multimodal":
        loads = AutoModelForImageTextToText
    model = loads.from_config(config, dtype=dtype)
    return model.eval()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with at most VOCAB_SIZE entries, trained on a fixed text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "def add(a, b):\n    return a + b\n",
        "The quick brown fox jumps over the lazy dog.",
    ] * 20
    tokenizer.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_tiny_model(
    directory: Path, family: str = "llama_gqa_tied", dtype=torch.float32, **overrides
) -> Path:
    """Save a tiny model + tokenizer in save_pretrained form, as the scripts load them."""
    model = make_tiny_model(family, dtype=dtype, **overrides)
    model.save_pretrained(directory)
    make_tiny_tokenizer().save_pretrained(directory)
    return directory


class IdTokenizer:
    """Just enough tokenizer for the generator: token ids in and out, no special tokens."""

    eos_token_id = None
    pad_token_id = 0

    def __call__(self, text: str) -> dict:
        return {"input_ids": [int(part) for part in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def make_repeating_model(seed: int = 1):
    """A 16-token tiny Llama without special tokens whose greedy output repeats tokens (its
    head scaled up): what n-gram bans and rows finishing apart need to show."""
    model = make_tiny_model(
        "llama_mha_untied", vocab_size=16, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, seed=seed,
    )  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model


def write_python_corpus(directory: Path) -> Path:
    """Three small Python-like files in ``directory`` (created): a training corpus."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        lines = [
            f"def function_{index}_{n}(value, other={n}):\n    return value * {n} + other\n"
            for n in range(120)
        ]
        (directory / f"module_{index}.py").write_text("".join(lines))
    return directory
