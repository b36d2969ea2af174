"""Models loaded with accelerate's big-model options (``device_map`` with layers offloaded to
disk): exit adapters built on them, and decoding them, against transformers' own ``generate``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from self_speculation import ConfigError, GenerationConfig, Generator, UnsupportedModelError
from self_speculation.draft import (
    AdapterConfig,
    DraftExit,
    ExitAdapter,
    load_draft_exit,
    save_adapter,
)

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("untied"), family="llama_mha_untied")


def offloaded(directory: Path, offload_folder: Path, *on_disk: str):
    """The model with the named modules offloaded to disk, the others on the CPU."""
    device_map = {
        name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")
    }
    device_map |= {f"model.layers.{index}": "cpu" for index in range(4)}
    device_map |= dict.fromkeys(on_disk, "disk")
    return AutoModelForCausalLM.from_pretrained(
        directory, device_map=device_map, offload_folder=str(offload_folder)
    )


def test_offloaded_layers_decode_as_transformers_generate(untied_dir, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    model = offloaded(untied_dir, tmp_path, "model.layers.1", "model.layers.3", "lm_head")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    generator = Generator(model, tokenizer)
    full = GenerationConfig(sample=False, max_steps=12)
    chain = dataclasses.replace(
        full, generation_strategy="self_speculative", exit_layer=2, num_speculations=3
    )
    for config in (full, chain):
        assert generator.generate(PROMPT, config).token_ids == expected.tolist()


def test_an_adapter_copying_an_offloaded_layer_is_refused(untied_dir, tmp_path) -> None:
    """The copy held meta weights: loading a trained adapter into it was a no-op (the hook it
    carried loaded the base layer's weights at each call), and moving it was a
    NotImplementedError from torch."""
    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    plain = Generator(AutoModelForCausalLM.from_pretrained(untied_dir), tokenizer)
    adapter = ExitAdapter(plain.layerwise, 2).requires_grad_(False)
    hidden = plain.layerwise.config.hidden_size
    settings = AdapterConfig(exit_layer=2, num_layers=4, hidden_size=hidden, init_layer=3)
    save_adapter(tmp_path / "adapter", adapter, settings, None)
    generator = Generator(offloaded(untied_dir, tmp_path / "offload", "model.layers.3"), tokenizer)
    with pytest.raises(ConfigError, match="layer 3, which the exit adapter copies, is offloaded"):
        ExitAdapter(generator.layerwise, 2)
    with pytest.raises(ConfigError, match="is offloaded"):
        load_draft_exit(generator.layerwise, tmp_path / "adapter")
    # A layer kept on the CPU beside offloaded ones still makes an adapter with its weights.
    copy = ExitAdapter(generator.layerwise, 2, init_layer=2)
    assert not any(parameter.is_meta for parameter in copy.parameters())
    expected = plain.layerwise.layers[2].state_dict()
    for name, tensor in copy.block.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_reduced_draft_vocabulary_reads_an_offloaded_head(untied_dir, tmp_path) -> None:
    """The head's rows were copied from its meta weight: early-exit decoding over the
    reduced vocabulary stopped at once ("logits became NaN"), and self-speculation
    accepted no draft."""
    tokenizer = AutoTokenizer.from_pretrained(untied_dir)
    plain = Generator(AutoModelForCausalLM.from_pretrained(untied_dir), tokenizer)
    generator = Generator(offloaded(untied_dir, tmp_path, "lm_head"), tokenizer)
    vocab = torch.arange(0, 300, 2)
    for each in (plain, generator):
        each.draft = DraftExit(each.layerwise, None, vocab)
    early = GenerationConfig(sample=False, max_steps=12, exit_layer=2)
    chain = dataclasses.replace(early, generation_strategy="self_speculative", num_speculations=3)
    for config in (early, chain):
        expected, got = plain.generate(PROMPT, config), generator.generate(PROMPT, config)
        assert got.token_ids == expected.token_ids
        assert (got.num_drafted, got.num_accepted) == (expected.num_drafted, expected.num_accepted)
    assert generator.model.lm_head.weight.is_meta  # still offloaded


def test_a_tied_head_offloaded_apart_from_its_embeddings_is_refused_with_the_reason(
    tmp_path,
) -> None:
    """accelerate's hook looks for a head weight a tied model never saved apart, so the
    model's own forward fails with a bare KeyError: the refusal says what to change."""
    directory = save_tiny_model(tmp_path / "tied", family="llama_gqa_tied")
    model = offloaded(directory, tmp_path / "offload", "lm_head")
    with pytest.raises(UnsupportedModelError) as refused:
        Generator(model, AutoTokenizer.from_pretrained(directory))
    message = str(refused.value)
    assert "\n" not in message
    assert "KeyError 'lm_head.weight'" in message
    assert "keep lm_head and embed_tokens on one device" in message
