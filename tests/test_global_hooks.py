"""A forward hook registered for every module (``register_module_forward_hook``) runs inside
the compiled passes as a module's own hook does: the fast path decodes as eager code and the
model's own ``generate`` do with the hooks registered now, in this Generator and in the next
(passes kept on disk for a later process never carry one in, nor leave one out)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hook_values import CONFIGS, PROMPT
from tiny_models import IdTokenizer, make_tiny_model
from torch.nn.modules.module import register_module_forward_hook

from self_speculation import Generator, precompiled


@pytest.fixture(autouse=True)
def _kept_apart(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(precompiled.DIRECTORY_VARIABLE, str(tmp_path))
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")  # dynamo's guards, in seconds


def _own_generate(model: torch.nn.Module) -> list[int]:
    ids = torch.tensor([PROMPT])
    output = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return output[0, len(PROMPT) :].tolist()


def _decodes_as_generate(generator: Generator, model: torch.nn.Module) -> None:
    expected = _own_generate(model)
    for config in CONFIGS:
        assert generator.generate(PROMPT, config).token_ids == expected, config


def _negating_the_norm(model: torch.nn.Module):
    """A hook for every module that negates the final norm's output (the others pass)."""
    norm = model.model.norm
    return register_module_forward_hook(
        lambda module, args, output: -output if module is norm else output
    )


def test_a_global_hook_added_and_removed_between_compiled_generations_is_followed() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, seed=3)
    generator = Generator(model, IdTokenizer())
    _decodes_as_generate(generator, model)
    handle = _negating_the_norm(model)
    try:
        _decodes_as_generate(generator, model)
    finally:
        handle.remove()
    _decodes_as_generate(generator, model)


# A later process decodes with the global hook registered (after this one kept its passes).
_HOOKED_PROCESS = """
import sys
sys.path.insert(0, {tests!r})
import torch
from test_global_hooks import _decodes_as_generate, _negating_the_norm
from tiny_models import IdTokenizer, make_tiny_model
from self_speculation import Generator

model = make_tiny_model("llama_mha_untied", dtype=torch.float32, seed=3)
_negating_the_norm(model)
_decodes_as_generate(Generator(model, IdTokenizer()), model)
"""


def test_passes_kept_on_disk_do_not_leave_out_a_later_processs_global_hook() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, seed=3)
    _decodes_as_generate(Generator(model, IdTokenizer()), model)  # passes kept on disk
    code = _HOOKED_PROCESS.format(tests=str(Path(__file__).parent))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
