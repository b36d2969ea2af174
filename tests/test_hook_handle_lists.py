"""A module attribute named like hooks that is a list of handles, not a hooks dict:
transformers' ``enable_input_require_grads`` (which PEFT calls for LoRA training with
gradient checkpointing) keeps ``_require_grads_hooks``, a list, on the model, and
``disable_input_require_grads`` leaves it empty. A compiled generation after either ended
in a traceback (``'list' object has no attribute 'values'``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_capture_threads import PROMPT
from test_compiled_lifetime import CONFIG
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import Generator
from self_speculation.model_surgery import module_state
from self_speculation.precompiled import has_hooks


@pytest.mark.parametrize("disabled", [False, True])
def test_compiled_generation_after_enable_input_require_grads(monkeypatch, disabled: bool) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    monkeypatch.setenv("LAYERSKIP_PRECOMPILE", "0")
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    model.enable_input_require_grads()
    if disabled:
        model.disable_input_require_grads()
    assert isinstance(model._require_grads_hooks, list)
    module_state(model)
    assert has_hooks(model) is not disabled  # the hook itself is on the embeddings
    generator = Generator(model, IdTokenizer())
    expected = generator.generate(PROMPT, dataclasses.replace(CONFIG, compile=False))
    for _ in range(2):
        assert generator.generate(PROMPT, CONFIG).token_ids == expected.token_ids
        assert generator.fast_path_fallback(CONFIG) is None
