"""A hub id read from a cache folder of its own (``--model_args cache_dir=DIR``), offline:
the weights honoured it, but the tokenizer and config.json were read from the default hub
cache (and the offline check looked only there), so the model was refused as missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import generate
from self_speculation import load_model_and_tokenizer
from self_speculation.errors import ModelLoadError


def hub_cache_with(model_dir: Path, cache_dir: Path, repo_id: str) -> None:
    """``model_dir``'s files laid out as the hub cache keeps ``repo_id`` at its main."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_a_hub_id_loads_from_its_own_cache_dir_offline(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    hub_cache_with(tiny_model_dir, cache, "acme/tiny-llama")
    model, tokenizer = load_model_and_tokenizer(
        "acme/tiny-llama", model_args={"cache_dir": str(cache)}
    )
    assert model.config.num_hidden_layers == 4 and tokenizer("def")["input_ids"]
    with pytest.raises(ModelLoadError, match=r"hub cache \(.*\) has no copy of it"):
        load_model_and_tokenizer("acme/other", model_args={"cache_dir": str(cache)})
    argv = ["--model", "acme/tiny-llama", "--model_args", f"cache_dir={cache}", "--prompt", "x"]
    argv += ["--max_steps", "2", "--output_dir", str(tmp_path / "logs")]
    assert generate.main(argv) == 0
    document = json.loads(next((tmp_path / "logs").glob("generate_*.json")).read_text())
    assert document["prompts"][0]["num_generated_tokens"] >= 1
