"""LAYERSKIP_LAYER_REGIONS=1 with decoder layers of different structure (a dense first
layer before mixture-of-experts layers: DeepSeek, AFMoE, Ernie 4.5, GLM-4 MoE).

torch 2.13 records no guard, in a region traced again for another input shape, on the
modules and weights an earlier trace in the same pass already read; a layer of another
structure then matched it. A tree step runs layers [0, E) at two shapes (one row per node
of each depth): the dense layer's second trace was stamped out for a mixture-of-experts
layer ("KeyError: gate_proj", eager decoding instead of the compiled step), and a layer
whose modules differ only in class (another norm) decoded silently other tokens. Each
layer structure now gets a region of its own.

Traced with dynamo's eager backend (seconds).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, model_surgery
from self_speculation.passes import COMPILE_BACKEND_VARIABLE, PRECOMPILE_VARIABLE

pytestmark = pytest.mark.skipif(
    model_surgery._layer_region is model_surgery._layer_call,
    reason="this torch has no reusable nested_compile_region (torch < 2.12)",
)

PROMPTS = ["def f(x):", "import os\nimport sys", "class A:"]
TREE = dict(generation_strategy="tree", exit_layer=2, tree_branching=[2, 1], max_steps=12)


@pytest.fixture(autouse=True)
def regions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    monkeypatch.setenv(PRECOMPILE_VARIABLE, "0")
    monkeypatch.setattr(model_surgery, "_REGIONS_SETTING", "1")  # LAYERSKIP_LAYER_REGIONS=1


def _compiled_equals_eager(generator: Generator, sample: bool) -> None:
    eager = GenerationConfig(compile=False, sample=sample, **TREE)
    compiled = dataclasses.replace(eager, compile=True)

    def tokens(config: GenerationConfig) -> list[list[int]]:
        seed = torch.Generator().manual_seed(0)
        return [r.token_ids for r in generator.generate_batch(PROMPTS, config, generator=seed)]

    assert tokens(compiled) == tokens(eager)
    assert generator.fast_path_fallback(compiled) is None


@pytest.mark.parametrize("family", ["deepseek_v2_mla", "afmoe"])
def test_a_dense_first_layer_before_experts_compiles_a_tree_step(family: str) -> None:
    _compiled_equals_eager(Generator(make_tiny_model(family), make_tiny_tokenizer()), False)


class _ShiftedNorm(torch.nn.Module):
    """A norm of another class with the same weight as the model's (its one difference)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        centred = hidden - hidden.mean(-1, keepdim=True)
        return self.weight * centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("sample", [False, True])
def test_a_layer_whose_modules_differ_in_class_alone_decodes_its_own_tokens(
    sample: bool,
) -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, initializer_range=0.3)
    layer = model.model.layers[1]
    layer.input_layernorm = _ShiftedNorm(layer.input_layernorm)
    _compiled_equals_eager(Generator(model, make_tiny_tokenizer()), sample)
