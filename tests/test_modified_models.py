"""Models as researchers modify them: hooks on the modules the layer-wise engine does not
call, activated LoRA adapters, dynamically quantized activations. Each is either decoded as
the model's own forward would, or refused in one line naming the cause."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import ConfigError, GenerationConfig, Generator
from self_speculation.errors import UnsupportedModelError

PROMPT = [5, 7, 9, 11, 13]


def _greedy_configs(max_steps: int, num_speculations: int) -> list[GenerationConfig]:
    """Greedy decoding of ``max_steps`` tokens: autoregressive with the full model, and
    self-speculative from exit 2."""
    plain = GenerationConfig(max_steps=max_steps, sample=False)
    speculative = dataclasses.replace(
        plain,
        generation_strategy="self_speculative",
        exit_layer=2,
        num_speculations=num_speculations,
    )
    return [plain, speculative]


def _own_generate(model: torch.nn.Module) -> list[int]:
    """The model's own greedy ``generate`` of 8 tokens after PROMPT."""
    ids = torch.tensor([PROMPT])
    output = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return output[0, len(PROMPT) :].tolist()


def _logit_hook(module: torch.nn.Module, args: tuple, output: object) -> object:
    output.logits = output.logits.clone()
    output.logits[..., 17] += 100.0  # token 17 always wins in the model's own forward
    return output


def _negating_hook(module: torch.nn.Module, args: tuple, output: object) -> object:
    output.last_hidden_state = -output.last_hidden_state
    return output


@pytest.mark.parametrize("where", ["model", "base"])
def test_a_hook_the_layerwise_view_never_runs_is_refused_in_one_line(where) -> None:
    """A forward hook on the model or its base model: the engine calls neither's forward.
    Registered before the Generator it was refused as "this family needs an adapter";
    registered after, its tokens were silently the unhooked model's."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    hooked = model if where == "model" else model.model
    hook = _logit_hook if where == "model" else _negating_hook
    handle = hooked.register_forward_hook(hook)
    with pytest.raises(UnsupportedModelError, match="has a forward hook, which the layer-wise"):
        Generator(model, IdTokenizer())
    handle.remove()
    generator = Generator(model, IdTokenizer())
    hooked.register_forward_hook(hook)
    for config in _greedy_configs(4, 2):
        with pytest.raises(ConfigError, match="has a forward hook, which the layer-wise"):
            generator.generate(PROMPT, config)


def test_hooks_on_modules_the_view_calls_still_run() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    model.lm_head.register_forward_hook(
        lambda module, args, out: out + 100.0 * (torch.arange(out.shape[-1]) == 17)
    )
    for config in _greedy_configs(4, 2):
        assert generator.generate(PROMPT, config).token_ids == [17] * 4


class ALoraLinearVariant:
    """Stands for PEFT's activated-LoRA variant (matched by class name, as PEFT is optional)."""


class ActivatedLora(torch.nn.Module):
    """A linear layer with an activated LoRA, as PEFT lays it out: its delta applies only
    from the offsets PEFT's own forward finds in the tokens (none: the base layer's output)."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_variant = {"default": ALoraLinearVariant()}
        self.active_adapters = ["default"]
        self.disable_adapters = False

    def forward(self, hidden: torch.Tensor, alora_offsets: list | None = None) -> torch.Tensor:
        return self.base_layer(hidden) + (0.0 if alora_offsets is None else 1.0)


def test_an_activated_lora_is_refused_not_decoded_as_the_base_model() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    attention = model.model.layers[1].self_attn
    attention.q_proj = ActivatedLora(attention.q_proj)
    config = GenerationConfig(max_steps=4, sample=False)
    with pytest.raises(ConfigError, match="activated LoRA adapter .'default'"):
        generator.generate(PROMPT, config)
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.self_attn\.q_proj holds an act"):
        Generator(model, IdTokenizer())
    attention.q_proj.disable_adapters = True  # decoded as the base model, as PEFT does
    assert len(Generator(model, IdTokenizer()).generate(PROMPT, config).token_ids) == 4


def test_a_peft_activated_lora_is_refused() -> None:
    peft = pytest.importorskip("peft")
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    lora = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        target_modules=["q_proj", "v_proj"],
        alora_invocation_tokens=[11],
    )
    wrapped = peft.get_peft_model(model, lora)
    with pytest.raises(UnsupportedModelError, match="activated LoRA adapter"):
        Generator(wrapped, IdTokenizer())
    with wrapped.disable_adapter():
        Generator(wrapped, IdTokenizer())


def test_dynamically_quantized_activations_name_their_cause() -> None:
    """torchao's int8 dynamic activation quantization was refused as "the layer-wise cached
    one-token forward differs ...; this family needs an adapter" (a Llama)."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    projection = model.model.layers[2].mlp.up_proj
    weight = torch.nn.Parameter(projection.weight.detach().clone(), requires_grad=False)
    weight.act_quant_kwargs = {"granularity": "per_row"}  # as torchao's Int8Tensor holds it
    projection.weight = weight
    with pytest.raises(UnsupportedModelError, match=r"layers\.2\.mlp\.up_proj\.weight quantizes"):
        Generator(model, IdTokenizer())


def test_torchao_quantization_is_decoded_or_refused_by_name() -> None:
    quantization = pytest.importorskip("torchao.quantization")
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    quantization.quantize_(model, quantization.Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedModelError, match="torchao's dynamic activation"):
        Generator(model, IdTokenizer())
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    generator = Generator(model, IdTokenizer())
    expected = _own_generate(model)
    for config in _greedy_configs(8, 3):
        assert generator.generate(PROMPT, config).token_ids == expected


class RowlessWeight(torch.Tensor):
    """A quantized weight as torchao's IntxUnpackedToInt8Tensor or Float8Tensor: it computes
    in F.linear but takes no row indexing (aten.index); ``dequantize`` gives its values."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            raise NotImplementedError("RowlessWeight dispatch: unimplemented aten.index")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        return result.as_subclass(cls) if func is torch.Tensor.detach else result

    def dequantize(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()


def test_a_reduced_draft_vocabulary_copies_rows_of_a_quantized_head() -> None:
    """DraftExit(vocab=...) over a head whose weight takes no row indexing raised torchao's
    NotImplementedError traceback; its rows are copied from the dequantized weight."""
    from self_speculation.draft import DraftExit

    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    generator = Generator(model, IdTokenizer())
    weight = model.lm_head.weight.detach().clone()
    model.lm_head.weight = torch.nn.Parameter(weight.as_subclass(RowlessWeight), False)
    vocab = torch.arange(0, 64)
    generator.draft = DraftExit(generator.layerwise, vocab=vocab)
    assert torch.equal(generator.draft._head_weight, weight[vocab])
    plain, speculative = _greedy_configs(8, 3)
    expected = generator.generate(PROMPT, plain).token_ids
    assert generator.generate(PROMPT, speculative).token_ids == expected


@pytest.mark.parametrize("kind", ["IntxWeightOnlyConfig", "Float8WeightOnlyConfig"])
def test_a_reduced_draft_vocabulary_over_a_torchao_head(kind) -> None:
    quantization = pytest.importorskip("torchao.quantization")
    from self_speculation.draft import DraftExit

    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    quantization.quantize_(model, getattr(quantization, kind)())
    generator = Generator(model, IdTokenizer())
    generator.draft = DraftExit(generator.layerwise, vocab=torch.arange(0, 64))
    plain, speculative = _greedy_configs(8, 3)
    expected = generator.generate(PROMPT, plain).token_ids
    assert generator.generate(PROMPT, speculative).token_ids == expected


def test_a_peft_mixed_model_decodes_the_model_inside() -> None:
    """PEFT's PeftMixedModel (adapters of several kinds active at once) has no
    get_base_model; it was refused as "PeftMixedModel has no decoder layers"."""

    class MixedModel(torch.nn.Module):  # PEFT's tuner: the causal LM as .model
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.model = inner

    class PeftMixedModel(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.base_model = MixedModel(inner)
            self.config = inner.config

    PeftMixedModel.__module__ = "peft.mixed_model"
    MixedModel.__module__ = "peft.tuners.mixed.model"
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    assert Generator(PeftMixedModel(model), IdTokenizer()).model is model


def test_a_real_peft_mixed_model_decodes_as_its_own_generate() -> None:
    peft = pytest.importorskip("peft")
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    mixed = peft.PeftMixedModel(model, lora, "lora")
    mixed.add_adapter("loha", peft.LoHaConfig(r=4, target_modules=["v_proj"], init_weights=False))
    mixed.set_adapter(["lora", "loha"])
    mixed.eval()
    expected = _own_generate(mixed)
    generator = Generator(mixed, IdTokenizer())
    for config in _greedy_configs(8, 3):
        assert generator.generate(PROMPT, config).token_ids == expected
