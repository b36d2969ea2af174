"""Small Llama architectures for training from scratch (``train.py --preset NAME``).

The vocabulary size, special token ids and context length come from the tokenizer and the
run, not from the preset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from self_speculation.errors import ConfigError, one_line, whole_number

PRESETS: dict[str, dict[str, Any]] = {
    # For tests and smoke runs: seconds on a CPU.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # A quick CPU example: a few minutes for a usable toy.
    "small": dict(
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # The shipped model (models/layerskip-stdlib; configs/layerskip-code-16x256.json).
    "stdlib": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}

_LLAMA_DEFAULTS: dict[str, Any] = dict(
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    initializer_range=0.02,
)


# Sizes that, where an architecture gives them, must be positive integers.
# What an architecture file must state (the rest has defaults of our own or the family's).
_REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
)


def _check_sizes(values: dict, source: str) -> None:
    """Refuse sizes that would fail deep inside the model's constructor (or allocate
    nothing sensible): each a positive integer, the heads dividing each other.

    Raises:
        ConfigError: the first bad size, naming the file or preset.
    """
    for name in _SIZES:
        value = values.get(name)
        if name in values and not whole_number(value, 1):
            raise ConfigError(
                f"architecture {source}: {name} must be an integer >= 1, got {value!r}"
            )
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ConfigError(
            f"architecture {source}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    hidden = values.get("hidden_size")
    if heads is not None and hidden is not None and "head_dim" not in values and hidden % heads:
        raise ConfigError(
            f"architecture {source}: hidden_size ({hidden}) must be a multiple of "
            f"num_attention_heads ({heads})"
        )
    _check_fits_in_memory(values, source)


def _machine_memory() -> int | None:
    """Physical memory in bytes; None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits_in_memory(values: dict, source: str) -> None:
    """Refuse sizes whose float32 weights alone exceed this machine's memory: every process
    builds the whole model on its CPU (``from_config``), and building a
    ``num_hidden_layers`` of 10**9 ran for hours, or until the kernel killed it, in silence.
    The count is a lower bound (each layer's MLP has at least two hidden x intermediate
    matrices, the embedding vocab x hidden), so no model that fits is refused."""
    sizes = [values.get(name) for name in ("hidden_size", "intermediate_size")]
    layers, vocab = values.get("num_hidden_layers"), values.get("vocab_size")
    memory = _machine_memory()
    if None in (*sizes, layers, vocab, memory):
        return
    hidden, intermediate = sizes
    parameters = layers * 2 * hidden * intermediate + vocab * hidden
    if 4 * parameters > memory:
        gib = 4 * parameters / 2**30
        raise ConfigError(
            f"architecture {source}: at least {parameters:.3g} weights ({gib:.3g} GiB in "
            f"float32), more than this machine's {memory / 2**30:.3g} GiB of memory"
        )


def architecture_config(
    preset: str | None,
    config_file: str | None,
    vocab_size: int,
    max_position_embeddings: int,
    special_token_ids: dict[str, int | None],
) -> PretrainedConfig:
    """A transformers config from a preset name or a JSON file (a ``config.json`` works).

    The JSON file may name any ``model_type`` transformers knows (default ``llama``).

    Raises:
        ConfigError: unknown preset, unreadable or invalid file.
    """
    if config_file is not None:
        try:
            values = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON, not UTF-8
            reason = "JSON nested too deeply" if isinstance(error, RecursionError) else error
            raise ConfigError(f"cannot read architecture file {config_file}: {reason}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"architecture file {config_file} must hold a JSON object")
    elif preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
        values = dict(PRESETS[preset])
    else:
        raise ConfigError(
            "training from scratch needs --preset or --config_file (or --model to continue a model)"
        )
    missing = [name for name in _REQUIRED_SIZES if name not in values]
    if missing:  # transformers would fill in its own defaults: a model of billions of weights
        raise ConfigError(
            f"architecture file {config_file or preset} must give the model's sizes: "
            f"{', '.join(missing)} missing"
        )
    values = {**_LLAMA_DEFAULTS, **values}
    values.update(vocab_size=vocab_size, **special_token_ids)
    _check_sizes(values, config_file or preset)
    values["max_position_embeddings"] = max(
        values.get("max_position_embeddings", 0), max_position_embeddings
    )
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except Exception as error:  # ValueError, TypeError, transformers' strict field checks...
        raise ConfigError(f"invalid architecture ({model_type}): {one_line(error)}") from None
