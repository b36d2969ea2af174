"""An adapter's per-adapter scaling changed between compiled generations (PEFT keeps a LoRA
layer's as a dict, ``scaling[adapter]``, which ``peft.helpers.rescale_adapter_scale``
changes): the fast path decodes with the scaling as it is now, as eager code and the model's
own ``generate`` do, not with the one its passes were first compiled with."""

from __future__ import annotations

import pytest
import torch
from test_hook_values import CONFIGS, PROMPT
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import Generator


@pytest.fixture(autouse=True)
def _traced_not_built(monkeypatch) -> None:
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")  # dynamo's guards, in seconds


class ScaledLora(torch.nn.Module):
    """A linear layer with a low-rank delta scaled per adapter, as PEFT lays a LoRA out."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        generator = torch.Generator().manual_seed(0)
        self.lora_A = torch.nn.Parameter(torch.randn(4, base.in_features, generator=generator))
        self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, 4, generator=generator))
        self.scaling = {"default": 1.0}
        self.active_adapter = "default"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = hidden @ self.lora_A.T @ self.lora_B.T  # [batch, seq, out]
        return self.base_layer(hidden) + self.scaling[self.active_adapter] * delta


def _own_generate(model: torch.nn.Module) -> list[int]:
    ids = torch.tensor([PROMPT])
    output = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return output[0, len(PROMPT) :].tolist()


def _decodes_as_generate(generator: Generator, model: torch.nn.Module) -> None:
    expected = _own_generate(model)
    for config in CONFIGS:
        assert generator.generate(PROMPT, config).token_ids == expected, config


def test_a_scaling_changed_since_compiling_is_followed() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, seed=3)
    attention = model.model.layers[1].self_attn
    attention.v_proj = ScaledLora(attention.v_proj)
    generator = Generator(model, IdTokenizer())
    _decodes_as_generate(generator, model)
    attention.v_proj.scaling["default"] = 0.05
    _decodes_as_generate(generator, model)


def test_peft_rescale_adapter_scale_is_followed() -> None:
    peft = pytest.importorskip("peft")
    from peft.helpers import rescale_adapter_scale  # noqa: PLC0415 (peft is optional)

    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, seed=3)
    lora = peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, lora)
    generator = Generator(wrapped, IdTokenizer())
    _decodes_as_generate(generator, wrapped)
    with rescale_adapter_scale(wrapped, 0.05):
        _decodes_as_generate(generator, wrapped)
