"""The LayerSkip training pieces against their definitions and slow reference loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, make_tiny_model
from transformers import AutoModelForCausalLM, GraniteConfig

from self_speculation.model_surgery import LayerwiseModel
from self_speculation.training import (
    Curriculum,
    DropoutSchedule,
    DropoutShape,
    ExitScale,
    active_exits,
    apply_layer_dropout,
    early_exit_loss,
    exit_loss_weights,
    layer_dropout_rates,
    schedule_factor,
)
from self_speculation.training.layer_quality import exit_quality
from self_speculation.training.objective import LayerSkipObjective


def _inputs(model, batch: int = 3, seq: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator)


# ----------------------------------------------------------------------------- layer dropout


def test_dropout_shapes_match_the_paper() -> None:
    rates = layer_dropout_rates(5, 0.2, DropoutShape.EXPONENTIAL)
    expected = [0.2 * (math.exp(layer * math.log(2) / 4) - 1) for layer in range(5)]
    assert rates == pytest.approx(expected)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert layer_dropout_rates(5, 0.2, "uniform") == pytest.approx([0.2] * 5)
    assert layer_dropout_rates(5, 0.2, "linear") == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    for shape in DropoutShape:
        if shape is DropoutShape.UNIFORM:
            continue
        values = layer_dropout_rates(8, 1.0, shape)
        assert values[0] == pytest.approx(0.0) and values[-1] == pytest.approx(1.0), shape
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:])), f"{shape} not monotone"


def test_time_schedule() -> None:
    assert [schedule_factor("constant", t, 10) for t in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert schedule_factor(DropoutSchedule.EXPONENTIAL, 0, 10) == 0.0
    assert schedule_factor(DropoutSchedule.EXPONENTIAL, 9, 10) == pytest.approx(1.0)
    assert schedule_factor("exponential", 3, 7) == pytest.approx(math.exp(0.5 * math.log(2)) - 1)


@pytest.mark.parametrize("shape", ["uniform", "exponential"])
def test_layer_dropout_skips_at_the_configured_rates(shape: str) -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).train()
    generator = torch.Generator().manual_seed(0)
    dropout = apply_layer_dropout(model, p_max=0.5, shape=shape, generator=generator)
    batch, calls = 64, 40
    skipped = torch.zeros(4)
    with torch.no_grad():
        for call in range(calls):
            model(_inputs(model, batch=batch, seq=4, seed=call))
            # A layer with rate 0 never draws (last_kept stays None): nothing skipped.
            skipped += torch.tensor(
                [0.0 if kept is None else float((~kept).sum()) for kept in dropout.last_kept]
            )
            dropout.last_kept = [None] * 4
    observed = skipped / (batch * calls)
    expected = torch.tensor(layer_dropout_rates(4, 0.5, shape))
    # 2560 Bernoulli draws per layer: standard error <= 0.01; allow 4 of them.
    assert torch.allclose(observed, expected, atol=0.04), (observed, expected)


def test_skipped_samples_pass_through_and_kept_samples_are_exact() -> None:
    model = make_tiny_model("qwen2", dtype=torch.float32).train()
    layer = model.model.layers[2]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    layer.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    dropout = apply_layer_dropout(
        model, p_max=0.5, shape="uniform", generator=torch.Generator().manual_seed(3)
    )
    input_ids = _inputs(model, batch=8)
    with torch.no_grad():
        model(input_ids)
    kept = dropout.last_kept[2]
    assert 0 < int(kept.sum()) < 8, "seed chosen so that the layer keeps some samples"
    layer_input, layer_output = seen[-1]
    assert torch.equal(layer_output[~kept], layer_input[~kept])
    # A kept sample's output is the layer's own output for that sample alone.
    dropout.remove()
    model.eval()
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rotary = model.model.rotary_emb(layer_input, positions)
    with torch.no_grad():
        for sample in kept.nonzero().squeeze(1).tolist():
            alone = layer(
                layer_input[sample : sample + 1], position_embeddings=rotary, position_ids=positions
            )
            assert torch.allclose(alone[0], layer_output[sample], atol=1e-5)


def test_layer_dropout_is_off_in_eval_and_removable() -> None:
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    keys = list(model.state_dict())
    input_ids = _inputs(model)
    with torch.no_grad():
        reference = model(input_ids).logits
    dropout = apply_layer_dropout(model, p_max=1.0, shape="uniform")
    assert list(model.state_dict()) == keys, "no new modules or renamed weights"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference)
    assert dropout.last_kept == [None] * 4
    model.train()
    with torch.no_grad():  # p = 1 everywhere: every layer skipped, logits of the embeddings
        skipped_all = model(input_ids).logits
    layerwise = LayerwiseModel(model, verify=False)
    assert torch.allclose(skipped_all, layerwise.unembed(layerwise.embed(input_ids)), atol=1e-6)
    dropout.remove()
    assert all("forward" not in vars(layer) for layer in model.model.layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference)


def test_layer_dropout_trains_with_gradients() -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).train()
    apply_layer_dropout(
        model, p_max=0.5, shape="uniform", generator=torch.Generator().manual_seed(5)
    )
    input_ids = _inputs(model, batch=6)
    model(input_ids, labels=input_ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


# ----------------------------------------------------------------------------- early-exit loss


@pytest.mark.parametrize("scale", list(ExitScale))
def test_exit_weights(scale: ExitScale) -> None:
    weights = exit_loss_weights([1, 2, 3, 4], 4, scale, e_scale=0.5)
    raw = {
        "uniform": [1, 1, 1, 1],
        "linear": [1, 2, 3, 4],
        "sum": [1, 3, 6, 10],
        "sqrt": [1, 2**0.5, 3**0.5, 2],
        "inverse": [1, 1 / 2, 1 / 3, 1 / 4],
    }[scale.value]
    raw = [r * 0.5 for r in raw[:3]] + [raw[3]]
    assert weights == pytest.approx([r / sum(raw) for r in raw])
    assert sum(weights) == pytest.approx(1.0)


def _reference_loss(model, input_ids, exit_layers, scale, e_scale) -> torch.Tensor:
    """The early-exit loss one exit at a time, from transformers' own outputs."""
    num_layers = model.config.num_hidden_layers
    output = model(input_ids, output_hidden_states=True)
    targets = input_ids[:, 1:].reshape(-1)
    raw = [
        (e_scale if e < num_layers else 1.0)
        * {"uniform": 1.0, "linear": e, "sum": e * (e + 1) / 2, "sqrt": e**0.5, "inverse": 1 / e}[
            scale
        ]
        for e in exit_layers
    ]
    total = torch.zeros(())
    for weight, exit_layer in zip(raw, exit_layers):
        if exit_layer == num_layers:  # the model's own logits (its hidden_states[-1] is normed)
            logits = output.logits
        else:
            logits = model.lm_head(model.model.norm(output.hidden_states[exit_layer]))
        total = total + weight / sum(raw) * F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets
        )
    return total


@pytest.mark.parametrize("family", ["llama_mha_untied", "llama_gqa_tied", "qwen2", "mistral"])
@pytest.mark.parametrize("scale", ["linear", "sum", "inverse"])
def test_vectorised_loss_equals_slow_loop(family: str, scale: str) -> None:
    model = make_tiny_model(family, dtype=torch.float32)
    objective = LayerSkipObjective(model, scale=scale, e_scale=0.7)
    input_ids = _inputs(model)
    for exits in ([1, 2, 3, 4], [2, 4], [3]):
        result = objective(input_ids, exits)
        expected = _reference_loss(model, input_ids, exits, scale, 0.7)
        assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert sorted(result.exit_losses) == exits


def test_last_exit_alone_is_the_models_own_loss_with_family_scalars() -> None:
    config = GraniteConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        embedding_multiplier=3.0,
        logits_scaling=4.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
    )
    torch.manual_seed(0)
    for model in (
        AutoModelForCausalLM.from_config(config),
        make_tiny_model("gemma", dtype=torch.float32),
    ):
        model.eval()
        input_ids = _inputs(model)
        expected = model(input_ids, labels=input_ids).loss
        result = LayerSkipObjective(model)(input_ids, [model.config.num_hidden_layers])
        assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5), type(model).__name__


def test_position_subsampling_is_an_unbiased_estimate() -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    input_ids = _inputs(model, batch=4, seq=16)
    full = LayerSkipObjective(model)
    sampled = LayerSkipObjective(
        model, position_fraction=0.125, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        exact = full(input_ids, [1, 2, 3, 4])
        draws = [sampled(input_ids, [1, 2, 3, 4]) for _ in range(300)]
    for layer in (1, 2, 3):
        mean = torch.stack([draw.exit_losses[layer] for draw in draws]).mean()
        assert mean.item() == pytest.approx(exact.exit_losses[layer].item(), rel=0.02)
    # The last exit is never subsampled.
    assert all(
        draw.exit_losses[4].item() == pytest.approx(exact.exit_losses[4].item(), rel=1e-6)
        for draw in draws
    )


def test_loss_ignores_padding_targets() -> None:
    hidden = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    head = torch.nn.Linear(8, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 3:] = -100
    result = early_exit_loss(hidden, [1, 2], targets, head, num_layers=2, scale="uniform")
    keep = targets != -100
    expected = [F.cross_entropy(head(h[keep]), targets[keep]) for h in hidden]
    assert result.loss.item() == pytest.approx(0.5 * (expected[0] + expected[1]).item(), rel=1e-6)


# ----------------------------------------------------------------------------- curricula


def test_curriculum_none() -> None:
    assert all(active_exits("none", t, 10, 6) == [1, 2, 3, 4, 5, 6] for t in range(10))


def test_curriculum_rotational() -> None:
    steps = [active_exits(Curriculum.ROTATIONAL, t, 10, 6, rotation=3) for t in range(4)]
    assert steps == [[3, 6], [2, 5, 6], [1, 4, 6], [3, 6]]
    steps = [active_exits("rotational", t, 10, 5, rotation=2) for t in range(3)]
    assert steps == [[2, 4, 5], [1, 3, 5], [2, 4, 5]]
    covered = set().union(*(active_exits("rotational", t, 99, 7, rotation=4) for t in range(4)))
    assert covered == set(range(1, 8))


def test_curriculum_gradual() -> None:
    # L = 4, T = 10: exit l switches on once t / T >= 0.5 * (4 - l) / 4.
    steps = [active_exits("gradual", t, 10, 4) for t in range(6)]
    assert steps == [[4], [4], [3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]


def test_unknown_choices_are_config_errors() -> None:
    from self_speculation.errors import ConfigError

    with pytest.raises(ValueError):
        active_exits("sideways", 0, 1, 4)
    with pytest.raises(ConfigError):
        layer_dropout_rates(4, 1.5)
    with pytest.raises(ConfigError):
        exit_loss_weights([1, 2], 4, "linear", e_scale=-1)


# ----------------------------------------------------------------------------- layer quality


def test_exit_quality_against_the_models_own_logits() -> None:
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    blocks = _inputs(model, batch=5, seq=12)
    rows = exit_quality(LayerwiseModel(model), blocks, batch_size=2)
    assert [row.exit_layer for row in rows] == [1, 2, 3, 4]
    assert rows[-1].agreement == 1.0
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
    targets = blocks[:, 1:]
    assert rows[-1].accuracy == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert rows[-1].perplexity == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert set(FAMILIES) >= {"llama_gqa_tied"}
