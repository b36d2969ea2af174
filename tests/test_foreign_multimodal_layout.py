"""A config.json of the original LLaVA code (model_type "llava", architectures
LlavaLlamaForCausalLM, no text_config): transformers reads it as LlavaConfig with its
default 7B text decoder, which AutoModelForImageTextToText would build before anything
was checked (out of memory on a 24 GiB machine for a tiny checkpoint). Refused in one
line, before any weight is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from self_speculation import load_model_and_tokenizer
from self_speculation.errors import ModelLoadError


def test_an_original_llava_checkpoint_is_refused_before_it_is_built(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "llava-v1.5")
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="llava",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower="openai/clip-vit-large-patch14-336",
    )
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="names LlavaLlamaForCausalLM, which transformers"):
        load_model_and_tokenizer(str(folder))
