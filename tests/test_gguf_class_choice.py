"""Loading a GGUF file chooses AutoModelForCausalLM without parsing the file's metadata an
extra time for the choice (transformers reads no multimodal-only architecture from GGUF):
the AutoModelForImageTextToText check parsed it once more at every load, about 4.5 of
SmolLM2's 20 seconds on a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from self_speculation import loading


def test_a_gguf_files_model_class_is_chosen_without_reading_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_parse(*args, **kwargs):
        raise AssertionError(f"AutoConfig.from_pretrained{args, kwargs} parsed the file again")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", no_parse)
    arguments = {"gguf_file": "model.gguf", "revision": "main"}
    assert loading._model_class(str(tmp_path), arguments) is AutoModelForCausalLM
