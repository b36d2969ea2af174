"""Multimodal checkpoints that AutoModelForCausalLM does not load (Mistral 3, Llava,
Qwen2.5-VL, Qwen3-VL): loaded by AutoModelForImageTextToText and decoded text-only, token
for token as transformers' own generate; one the engine cannot decode is refused in one
line. They were all refused at load ("Unrecognized configuration class")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_tokenizer, save_tiny_model

import generate
from arguments import run_main
from self_speculation import GenerationConfig, Generator, load_model_and_tokenizer

LOADED_BY_IMAGE_TEXT = {
    "mistral3": "Mistral3ForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}
PROMPTS = ["def add(a, b):", "x = 1"]


@pytest.mark.parametrize("family", sorted(LOADED_BY_IMAGE_TEXT))
def test_a_saved_multimodal_model_loads_and_decodes_as_transformers(
    family: str, tmp_path: Path
) -> None:
    save_tiny_model(tmp_path / family, family)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / family))
    assert type(model).__name__ == LOADED_BY_IMAGE_TEXT[family]
    generator = Generator(model, tokenizer)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        theirs = model.generate(
            ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, ids.shape[1] :].tolist()
        for strategy, extra in (
            ("autoregressive", {}),
            ("self_speculative", {"exit_layer": 2, "num_speculations": 3}),
        ):
            config = GenerationConfig(
                generation_strategy=strategy, sample=False, max_steps=20, **extra
            )
            ours = generator.generate(prompt, config).token_ids
            assert ours == theirs[: len(ours)], (strategy, prompt)
            assert len(ours) == 20 or tokenizer.eos_token_id in theirs[len(ours) - 1 :]


def test_mrope_decodes_compiled_as_eager(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Qwen's multimodal rotary embedding (three position sections) on the fast path."""
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    save_tiny_model(tmp_path / "qwen", "qwen2_5_vl")
    generator = Generator(*load_model_and_tokenizer(str(tmp_path / "qwen")))
    speculative = dict(generation_strategy="self_speculative", exit_layer=2, num_speculations=3)
    for extra in ({}, speculative):
        eager = generator.generate_batch(PROMPTS, GenerationConfig(sample=False, **extra))
        fast = generator.generate_batch(
            PROMPTS, GenerationConfig(sample=False, compile=True, **extra)
        )
        assert [r.token_ids for r in fast] == [r.token_ids for r in eager]


def test_generate_py_runs_a_multimodal_folder(tmp_path: Path) -> None:
    save_tiny_model(tmp_path / "qwen", "qwen2_5_vl")
    arguments = ["--model", str(tmp_path / "qwen"), "--prompt", "def f(x):", "--sample", "False"]
    arguments += ["--generation_strategy", "self_speculative", "--exit_layer", "2"]
    arguments += ["--num_speculations", "3", "--max_steps", "8", "--output_dir", str(tmp_path)]
    assert generate.main(arguments) == 0
    (written,) = tmp_path.glob("generate_*.json")
    assert json.loads(written.read_text())["prompts"][0]["num_generated_tokens"] == 8


def test_a_multimodal_layout_the_engine_cannot_decode_is_one_line(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """SmolVLM keeps its decoder at .model.text_model: refused, named, in one line."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model("smolvlm")
    text = config.text_config
    text.vocab_size, text.hidden_size, text.intermediate_size = 320, 32, 64
    text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = 2, 4, 2
    vision = config.vision_config
    vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = 32, 64, 1
    vision.num_attention_heads = 2
    config.image_token_id = 317
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path / "smolvlm")
    make_tiny_tokenizer().save_pretrained(tmp_path / "smolvlm")
    capsys.readouterr()
    arguments = ["--model", str(tmp_path / "smolvlm"), "--prompt", "x", "--max_steps", "4"]
    monkeypatch.setattr(sys, "argv", ["generate.py", *arguments, "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(generate.main, prog="generate.py")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("generate.py: error: SmolVLMForConditionalGeneration has no decoder")
