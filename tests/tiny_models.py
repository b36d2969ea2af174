"""Tiny random decoder models and a tiny tokenizer, built offline for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
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


def make_tiny_model(
    family: str = "llama_mha_untied", seed: int = 0, dtype=torch.float64, **overrides
):
    """A randomly initialised tiny causal LM of ``family`` in eval mode."""
    config_class, family_overrides = FAMILIES[family]
    config = config_class(**{**_COMMON, **family_overrides, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
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
