"""An exit adapter trained for a multimodal checkpoint (Qwen2.5-VL, Gemma 3) drafts for it
through the scripts: the width check before loading read ``hidden_size`` from config.json's
top level, which a multimodal config keeps in its ``text_config``, and refused the adapter
("... has 4 of width None")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

import generate
from self_speculation import Generator, load_model_and_tokenizer
from self_speculation.draft import AdapterConfig, ExitAdapter, save_adapter


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3_multimodal"])
def test_generate_py_drafts_a_multimodal_model_with_its_adapter(
    family: str, tmp_path: Path
) -> None:
    model_dir = save_tiny_model(tmp_path / family, family)
    generator = Generator(*load_model_and_tokenizer(str(model_dir)))
    layerwise = generator.layerwise
    adapter = ExitAdapter(layerwise, 2).requires_grad_(False)
    settings = AdapterConfig(
        exit_layer=2,
        num_layers=layerwise.num_layers,
        hidden_size=layerwise.config.hidden_size,
        init_layer=adapter.init_layer,
        base_model=str(model_dir),
    )
    save_adapter(tmp_path / "adapter", adapter, settings, None)
    arguments = ["--model", str(model_dir), "--prompt", "def f(x):", "--sample", "False"]
    arguments += ["--generation_strategy", "self_speculative", "--num_speculations", "3"]
    arguments += ["--draft_adapter", str(tmp_path / "adapter"), "--max_steps", "8"]
    assert generate.main([*arguments, "--output_dir", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").glob("generate_*.json")
    assert json.loads(written.read_text())["prompts"][0]["num_generated_tokens"] == 8
