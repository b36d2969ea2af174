"""The LayerSkip training pieces against their definitions and slow reference loops, and
the properties training at scale relies on (memory, collectives, recomputation, schedules)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, make_repeating_model, make_tiny_model
from transformers import AutoModelForCausalLM, GraniteConfig

from self_speculation.model_surgery import LayerwiseModel
from self_speculation.training import (
    Curriculum,
    DropoutSchedule,
    DropoutShape,
    ExitScale,
    LayerDropout,
    active_exits,
    apply_layer_dropout,
    early_exit_loss,
    exit_loss_weights,
    layer_dropout_rates,
    schedule_factor,
)
from self_speculation.training.distributed_setup import apply_activation_checkpointing
from self_speculation.training.early_exit_loss import stacked_early_exit_loss
from self_speculation.training.layer_dropout import keep_from_uniforms
from self_speculation.training.layer_quality import exit_quality
from self_speculation.training.loop import recipe_uniforms
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


def test_the_objective_refuses_exits_outside_the_model() -> None:
    """Exit 0 hooked layers[-1] (the last layer's output, reported as exit 0), exit L + 1
    was an IndexError; an infinite e_scale made every weight NaN."""
    from self_speculation.errors import ConfigError
    from self_speculation.training.early_exit_loss import exit_loss_weights

    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    input_ids = _inputs(model)
    layers = model.config.num_hidden_layers
    for exits in ([0, layers], [layers + 1]):
        with pytest.raises(ConfigError, match=f"exit layer {exits[0]} is outside 1..{layers}"):
            LayerSkipObjective(model)(input_ids, exits)
    with pytest.raises(ConfigError, match="finite"):
        exit_loss_weights([1, 4], 4, e_scale=float("inf"))
    with pytest.raises(ConfigError, match="outside"):
        exit_loss_weights([5], 4)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral_sliding"])
def test_a_moe_asking_for_its_router_loss_gets_it(family: str) -> None:
    """A config with output_router_logits: the model's own labels= loss adds the
    load-balancing loss, and so does the objective (it was dropped without a word)."""
    model = make_tiny_model(family, output_router_logits=True, router_aux_loss_coef=0.5)
    input_ids = _inputs(model)
    expected = model(input_ids, labels=input_ids).loss
    result = LayerSkipObjective(model)(input_ids, [model.config.num_hidden_layers])
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_model_with_dropout_in_training_mode_passes_the_check() -> None:
    """The layer-wise check runs in eval mode: with dropout in the config (StarCoder2's
    published 0.1) two training-mode passes differ, and train.py refused the model."""
    model = make_tiny_model("qwen2", attention_dropout=0.5).train()
    LayerSkipObjective(model)
    assert model.training


def test_position_subsampling_is_an_unbiased_estimate() -> None:
    """The mean of the subsampled exit losses is the full one, within 4 standard errors.
    Rows whose first half is the model's own greedy continuation and whose second half is
    random make the loss differ from position to position (on random tokens it is about
    the same everywhere, so that a subset biased toward the first positions passed)."""
    model = make_repeating_model()
    input_ids = _inputs(model, batch=4, seq=16)
    with torch.no_grad():  # the first half each row's greedy continuation: easy to predict
        for column in range(1, 8):
            input_ids[:, column] = model(input_ids[:, :column]).logits[:, -1].argmax(dim=-1)
    full = LayerSkipObjective(model)
    sampled = LayerSkipObjective(
        model, position_fraction=0.125, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        exact = full(input_ids, [1, 2, 3, 4])
        draws = [sampled(input_ids, [1, 2, 3, 4]) for _ in range(400)]
        per_position = F.cross_entropy(
            model(input_ids[:, :-1]).logits.reshape(-1, 16), input_ids[:, 1:].reshape(-1),
            reduction="none",
        )  # fmt: skip
    assert per_position.std() > 0.15 * per_position.mean()  # the positions differ
    for layer in (1, 2, 3):
        losses = torch.stack([draw.exit_losses[layer] for draw in draws])
        error = losses.std() / len(draws) ** 0.5
        assert abs(losses.mean() - exact.exit_losses[layer]) < 4 * error, layer
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
    # L = 4, T = 10: the exit after 0-based layer i switches on once t / T >= 0.5 * (4 - i) / 4.
    steps = [active_exits("gradual", t, 10, 4) for t in range(7)]
    assert steps == [[4], [4], [4], [3, 4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]


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


# ----------------------------------------------------------------------------- at scale


def _exit_states(model, input_ids):
    """Raw decoder-layer outputs (the exits' hidden states) from transformers' forward."""
    output = model(input_ids, output_hidden_states=True)
    # hidden_states[l] leaves layer l-1 for l < L; the last entry is normed, so rebuild it.
    layerwise = LayerwiseModel(model, verify=False)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    last = layerwise.run_layers(output.hidden_states[-2], 3, 4, None, positions)
    return [*output.hidden_states[1:-1], last], layerwise


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_per_exit_loss_equals_the_stacked_loss_with_gradients(fraction: float) -> None:
    # The loss is fp32 (logits are upcast), so fp32 sums in another order: 1e-6.
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32).train()
    input_ids = _inputs(model, batch=3, seq=10)
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    exits = [1, 2, 3, 4]
    noise = torch.rand(4, *input_ids.shape, generator=torch.Generator().manual_seed(2))
    results, gradients = [], []
    for loss_function in (early_exit_loss, stacked_early_exit_loss):
        model.zero_grad()
        hidden, layerwise = _exit_states(model, input_ids)
        result = loss_function(
            hidden,
            exits,
            targets,
            layerwise.unembed,
            4,
            scale="sum",
            e_scale=0.5,
            position_fraction=fraction,
            position_noise=noise,
        )
        result.loss.backward()
        results.append(result)
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
    per_exit, stacked = results
    assert per_exit.loss.item() == pytest.approx(stacked.loss.item(), rel=1e-6)
    for layer in exits:
        assert per_exit.exit_losses[layer].item() == pytest.approx(
            stacked.exit_losses[layer].item(), rel=1e-6
        )
    for name, gradient in gradients[1].items():
        assert torch.allclose(gradients[0][name], gradient, rtol=1e-5, atol=1e-7), name


def test_per_exit_loss_keeps_no_logits_for_the_backward_pass() -> None:
    """What autograd keeps for the backward pass does not grow with the number of exits:
    no [positions, vocab] tensor is saved (the head is rebuilt one exit at a time)."""
    vocab, hidden_size, positions = 997, 16, 64
    head = torch.nn.Linear(hidden_size, vocab)
    targets = torch.randint(0, vocab, (2, positions // 2))

    def saved_bytes(loss_function, num_exits: int) -> tuple[int, int]:
        hidden = [torch.randn(2, positions // 2, hidden_size, requires_grad=True)] * num_exits
        sizes: list[torch.Size] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            sizes.append(tensor.shape)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_function(hidden, list(range(1, num_exits + 1)), targets, head, num_exits)
        widest = max((size[-1] for size in sizes if len(size) > 0), default=0)
        return sum(torch.Size(size).numel() for size in sizes), widest

    for num_exits in (6, 24):
        total, widest = saved_bytes(early_exit_loss, num_exits)
        assert widest < vocab, "a vocab-wide tensor is kept for backward"
        assert total <= num_exits * positions * (hidden_size + 4), total
        _, stacked_widest = saved_bytes(stacked_early_exit_loss, num_exits)
        assert stacked_widest == vocab  # the reference does keep the logits


class _RecordingLayer(torch.nn.Module):
    """A stand-in decoder layer that records the arguments it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, table=None):
        self.calls.append(
            dict(hidden=hidden_states, mask=attention_mask, rotary=position_embeddings, table=table)
        )
        return hidden_states * self.scale + 1.0


def test_layer_dropout_slices_only_the_per_sample_arguments() -> None:
    layer = _RecordingLayer().train()
    dropout = LayerDropout(torch.nn.ModuleList([layer]), rates=[0.5])
    batch = 4
    hidden = torch.randn(batch, 3, 8)
    mask = torch.zeros(batch, 1, 3, 3)  # per sample
    rotary = (torch.randn(1, 3, 2), torch.randn(1, 3, 2))  # shared by every sample
    table = torch.arange(batch * 5.0).view(batch, 5)  # first dim == batch, not per sample
    dropout.plan(torch.tensor([[True], [False], [True], [False]]))
    output = layer(
        hidden, attention_mask=mask, position_embeddings=rotary, table=table
    )  # [batch, 3, 8]
    seen = layer.calls[-1]
    assert seen["hidden"].shape[0] == 2 and seen["mask"].shape[0] == 2
    assert seen["rotary"][0] is rotary[0] and seen["rotary"][1] is rotary[1]
    assert seen["table"] is table, "an unknown argument must pass through untouched"
    assert torch.equal(output[[1, 3]], hidden[[1, 3]])
    assert torch.equal(output[[0, 2]], hidden[[0, 2]] + 1.0)


def test_a_layer_every_sample_skips_still_gets_zero_gradients() -> None:
    """The FSDP / DDP collectives of a layer run on a process whose samples all skip it."""
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).train()
    dropout = apply_layer_dropout(model, p_max=0.5, shape="uniform")
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[:, 2] = False  # every sample skips layer 2
    dropout.plan(keep)
    input_ids = _inputs(model)
    model(input_ids, labels=input_ids).loss.backward()
    for name, parameter in model.model.layers[2].named_parameters():
        assert parameter.grad is not None and torch.count_nonzero(parameter.grad) == 0, name
    assert all(
        parameter.grad is not None and parameter.grad.abs().sum() > 0
        for parameter in model.model.layers[1].parameters()
    )


def test_planned_skips_are_kept_under_activation_checkpointing() -> None:
    """Skips decided outside the recomputed region: same loss and gradients as without."""
    keep = torch.tensor([[True, False, True, True], [True, True, False, True]] * 2)
    gradients = []
    for checkpointed in (False, True):
        model = make_tiny_model("qwen2", dtype=torch.float64).train()
        layers = model.model.layers
        if checkpointed:
            apply_activation_checkpointing(layers)
        dropout = apply_layer_dropout(model, p_max=0.5, shape="uniform")
        dropout.plan(keep)
        input_ids = _inputs(model, batch=4)
        model(input_ids, labels=input_ids).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters()})
        dropout.remove()
        assert ("forward" in vars(layers[0])) == checkpointed, "the checkpointing stays"
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradients[1][name], gradient, rtol=1e-10, atol=1e-12), name


def test_recipe_draws_do_not_depend_on_how_a_step_is_split() -> None:
    """A sample's draws depend on its place in the step's data only: 1 process x batch 8,
    2 processes x batch 4 and 4 micro-batches of 2 draw the same table."""
    whole = recipe_uniforms(7, step=3, first=0, count=8, shape=(4, 5))
    for size in (4, 2, 1):
        parts = [recipe_uniforms(7, 3, first, size, (4, 5)) for first in range(0, 8, size)]
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole, recipe_uniforms(7, step=4, first=0, count=8, shape=(4, 5)))
    assert not torch.equal(whole, recipe_uniforms(8, step=3, first=0, count=8, shape=(4, 5)))
    assert not torch.equal(whole[0], whole[1])
    keep = keep_from_uniforms(torch.tensor([[0.05, 0.5], [0.3, 0.1]]), [0.1, 0.2])
    assert keep.tolist() == [[False, True], [True, False]]


def test_an_unknown_horizon_holds_the_schedules_at_their_start() -> None:
    """A time budget before the speed is measured: no full-strength warm-up, no extra exits."""
    assert schedule_factor("exponential", 5, None) == 0.0
    assert schedule_factor("constant", 5, None) == 1.0
    assert active_exits("gradual", 5, None, 4) == [4]
    assert active_exits("rotational", 1, None, 5, rotation=2) == [1, 3, 5]


def test_stop_signals_turn_the_first_signal_into_a_request() -> None:
    """The loop stops after its step on SIGINT/SIGTERM; under torchrun (which forwards the
    terminal's Ctrl-C once more) a repeated signal does not kill the checkpoint write."""
    import os
    import signal

    from self_speculation.training.loop import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(force_on_repeat=False) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    # A closed terminal (SIGHUP) stops after the step with a checkpoint too; under nohup
    # (SIGHUP ignored) the run goes on, as it was asked to.
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with StopSignals(force_on_repeat=False) as signals:
            os.kill(os.getpid(), signal.SIGHUP)
            assert signals.received == signal.SIGHUP
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with StopSignals(force_on_repeat=False) as signals:
            os.kill(os.getpid(), signal.SIGHUP)
            assert signals.received is None
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, hangup)


def test_a_damaged_target_cache_is_one_line(tmp_path) -> None:
    """train_adapter.py's target cache: a truncated shard or manifest names the file and
    what to do, instead of torch's or json's traceback."""
    from self_speculation.adapter_training import TargetSettings, compute_targets, load_targets
    from self_speculation.errors import ConfigError

    (tmp_path / "shard_00000.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match=r"shard_00000.pt is damaged .*delete it"):
        load_targets(tmp_path, 2)
    (tmp_path / "manifest.json").write_text("{")
    settings = TargetSettings("m", [2], 8, 4, 1, "f")
    with pytest.raises(ConfigError, match=r"manifest.json is damaged .*compute the targets again"):
        compute_targets(None, torch.zeros(1, 8, dtype=torch.long), settings, tmp_path)
