"""benchmarks/overhead.py: the cost-model bounds and the measured verification pass."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from self_speculation import ConfigError, GenerationConfig, Generator

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead_script", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead_script"] = module
    spec.loader.exec_module(module)
    return module


def test_measured_bound_equals_reference_when_verification_costs_one_token(overhead):
    c, h, num_layers = 0.4, 0.1, 24
    for exit_layer, k, tokens_per_step in ((5, 5, 3.2), (3, 2, 2.0), (12, 1, 1.7)):
        one_token_verify = (num_layers - exit_layer) * c + h
        assert overhead.measured_verify_bound(
            tokens_per_step, num_layers, exit_layer, k, c, h, one_token_verify
        ) == pytest.approx(
            overhead.reference_bound(tokens_per_step, num_layers, exit_layer, k, c, h)
        )


def test_a_dearer_verification_lowers_the_bound(overhead):
    cheap = overhead.measured_verify_bound(3.0, 24, 5, 5, 0.4, 0.1, 8.0)
    dear = overhead.measured_verify_bound(3.0, 24, 5, 5, 0.4, 0.1, 12.0)
    assert dear < cheap
    # With no acceptance (T = 1) and free drafts the bound is 1: nothing to gain.
    assert overhead.reference_bound(1.0, 24, 0, 3, 0.4, 0.0) == pytest.approx(1.0)


def test_verify_cost_times_k_plus_one_tokens_through_the_upper_layers(
    overhead, tiny_model_dir, monkeypatch
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = Generator(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    layerwise = generator.layerwise
    num_layers = generator.num_layers
    calls = []
    run_layers = layerwise.run_layers

    def recording(hidden, start, end, cache, positions, padding_mask=None):
        calls.append((hidden.shape[1], start, end, cache.get_seq_length(num_layers - 1)))
        return run_layers(hidden, start, end, cache, positions, padding_mask)

    monkeypatch.setattr(layerwise, "run_layers", recording)
    seconds = overhead.verify_cost(generator, 1, 3, context=16)
    assert seconds > 0
    assert calls[0] == (16, 0, num_layers, 0)  # the context, once
    # Every timed pass: 3 tokens through [1, L) over the same 16-position cache.
    assert len(calls) > 2 and set(calls[1:]) == {(3, 1, num_layers, 16)}


def test_engine_step_costs_bound_the_batch_ratio_from_pass_times(monkeypatch) -> None:
    """benchmarks/engine.py's batch breakdown: tokens per batch step over pass time for each
    strategy. Here self-speculation gains 20 tokens per step (of 8 rows x 4 slots) for
    10 + 30 ms, autoregressive decoding 8 tokens for 10 ms: at most (20 / 40) / (8 / 10)
    = 0.625x, and 0.833x with drafting free."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    import engine

    rows = [
        {
            "batch_size": 8,
            "path": "autoregressive",
            "prompts": 8,
            "tokens": 8 + 8 * 100,
            "steps": 100,
            "row_steps": 800,
            "pass_seconds": {"early": [1.0, 100]},
        },
        {
            "batch_size": 8,
            "path": "self_speculative",
            "prompts": 8,
            "tokens": 8 + 20 * 50,
            "steps": 50,
            "row_steps": 300,
            "pass_seconds": {"greedy_drafts": [0.5, 50], "verify": [1.5, 50]},
        },
    ]
    (cost,) = engine.step_costs(rows)
    assert cost["tokens_per_step"] == pytest.approx(20.0)
    assert cost["bound"] == pytest.approx(0.625)
    assert cost["bound_drafting_free"] == pytest.approx(20 / 30e-3 / 800)
    assert cost["active"] == pytest.approx(0.75)
    assert engine.step_costs(rows[:1]) == []  # no self-speculative row: nothing to bound
    # A greedy compiled step is one call: its whole time counts, drafting is not separable.
    rows[1]["pass_seconds"] = {"greedy_step": [2.0, 50]}
    (fused,) = engine.step_costs(rows)
    assert fused["bound"] == pytest.approx(0.625)
    assert fused["bound_drafting_free"] is None
    engine.print_step_costs(rows)
    # On CUDA the batch runs time no pass (a synchronisation after each would undo the
    # steps ahead): rows without pass timings are left out, nothing divides by zero.
    untimed = [{**row, "pass_seconds": {}} for row in rows]
    assert engine.step_costs(untimed) == []
    engine.print_step_costs(untimed)


def test_batch_bound_prices_each_step_at_its_products_and_nothing_else(monkeypatch) -> None:
    """benchmarks/batch_bound.py: a self-speculative step's products cost more than an
    autoregressive step's (k drafts, then k + 1 verified positions per row), and a run's
    bound is its tokens over prefill plus row-steps at the full batch's per-row cost."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    batch_bound = importlib.import_module("batch_bound")

    class MultiplyAddTimer(batch_bound.ProductTimer):
        """Prices a product at its multiply-adds (a nanosecond each), not at a measured
        time: which products a step is priced at is the behaviour under test, and two
        measured times compare any way on a loaded machine."""

        def linear(self, rows: int, weight: torch.Tensor) -> float:
            self.fastest[("linear", rows, *weight.shape)] = torch.nn.functional.linear
            return rows * weight.shape[0] * weight.shape[1] * 1e-9

        def attention(self, batch: int, kv_heads: int, queries: int, columns: int, dim: int):
            return 2 * batch * kv_heads * queries * columns * dim * 1e-9

    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    args = batch_bound.BoundArguments(
        batch_size=2, exit_layer=2, num_speculations=3, repeats=3, columns=16
    )
    timer = MultiplyAddTimer(args.repeats)
    with torch.no_grad():
        bounds = batch_bound.step_bounds(model, args, timer)
        sequence = batch_bound.StepSequence(model, args, timer)
        sequenced = sequence.bounds(model)
    assert bounds["self_speculative_step"] > bounds["autoregressive_step"] > 0
    assert bounds["layer_verified_positions"] > bounds["layer_one_position"] > 0
    assert set(sequenced) == {"sequenced_autoregressive_step", "sequenced_self_speculative_step"}
    assert all(seconds >= 0 for seconds in sequenced.values())
    # The sequence makes every product of the step on the layer's own weights: seven
    # projections and two attention products per layer, the head where logits are needed.
    layers, weights = model.config.num_hidden_layers, batch_bound.layer_weights(model)
    calls = sequence._calls(1, layers, 4, head=True)  # verification's layers [E, L) at k + 1
    assert len(calls) == 9 * (layers - 1) + 1
    assert calls[0][1][1].data_ptr() == weights[1][0].data_ptr()  # layer 1's q_proj
    assert calls[9][1][1].data_ptr() == weights[2][0].data_ptr()  # layer 2's
    assert calls[0][1][0].shape == (2 * 4, model.config.hidden_size)
    assert calls[-1][1][1].data_ptr() == model.lm_head.weight.data_ptr()

    def row(size: int, path: str, tokens_per_second: float) -> dict:
        return dict(
            batch_size=size, path=path, row_steps=10, tokens=100, seconds=1.0,
            tokens_per_second=tokens_per_second,
        )  # fmt: skip

    engine = {
        "batch": [row(1, "self_speculative", 50.0), row(2, "autoregressive", 80.0)]
        + [row(2, "self_speculative", 70.0)]
    }
    steps = {"self_speculative_step": 0.02, "autoregressive_step": 0.01}
    run = batch_bound.bound_run(engine, steps, batch=2, prefill=0.4)
    assert run["bound_self_speculative_tok_s"] == pytest.approx(100 / (0.4 + 10 * 0.02 / 2))
    assert run["bound_autoregressive_tok_s"] == pytest.approx(100 / (0.4 + 10 * 0.01 / 2))
    # Two lower bounds of a step: the larger (here the sequenced one) is the tighter.
    steps |= {"sequenced_self_speculative_step": 0.03, "sequenced_autoregressive_step": 0.005}
    run = batch_bound.bound_run(engine, steps, batch=2, prefill=0.4)
    assert run["bound_self_speculative_tok_s"] == pytest.approx(100 / (0.4 + 10 * 0.03 / 2))
    assert run["bound_autoregressive_tok_s"] == pytest.approx(100 / (0.4 + 10 * 0.01 / 2))
    assert run["target_4x_batch1_tok_s"] == 200.0
    assert run["target_1.2x_autoregressive_tok_s"] == pytest.approx(96.0)
    with pytest.raises(ConfigError, match="no batch rows"):
        batch_bound.bound_run({"batch": engine["batch"][1:]}, {}, batch=2, prefill=0.4)
    # What each target would need: 100 tokens at 200 tok/s leave 0.1 s after the prefill
    # for 100 / T row-steps of 0.015 s.
    assert run["needed_tokens_per_row_step_4x_batch1"] == pytest.approx(100 * 0.015 / 0.1)
    assert batch_bound.needed_tokens_per_row_step(100, 250.0, 0.4, 0.015) == float("inf")
    # 1.2x the autoregressive bound (1.2 * 100 / 0.45 tok/s) leaves no time after the prefill.
    assert run["needed_tokens_per_row_step_1.2x_autoregressive_bound"] == float("inf")
    # Each of k = 3 drafts kept with probability 0.5: 1 + 0.5 + 0.25 + 0.125 tokens a step.
    assert batch_bound.acceptance_for(1.875, 3) == pytest.approx(0.5)
    assert batch_bound.acceptance_for(1.0, 3) == pytest.approx(0.0, abs=1e-9)
    assert batch_bound.acceptance_for(4.5, 3) == float("inf")  # more than k + 1 tokens


def test_engine_compares_shedding_finished_rows_in_one_run(monkeypatch) -> None:
    """benchmarks/engine.py --compare_shedding: the same batch with finished rows leaving
    and kept, interleaved; the same tokens either way, and the default restored."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    engine = importlib.import_module("engine")
    from tiny_models import make_tiny_tokenizer

    generator = Generator(make_tiny_model("llama_mha_untied"), make_tiny_tokenizer())
    config = GenerationConfig(
        max_steps=24,
        sample=False,
        generation_strategy="self_speculative",
        exit_layer=2,
        num_speculations=3,
    )
    calls = []
    keep = generator._rows_to_keep

    def recording(strategy, running):
        calls.append(generator.shed_finished_rows)
        return keep(strategy, running)

    monkeypatch.setattr(generator, "_rows_to_keep", recording)
    result = engine.compare_shedding(generator, config, [[5, 7, 9, 11, 13], [3, 4], [8, 8]], 2)
    assert result["identical_tokens"] and result["batch_size"] == 3
    assert [len(values) for values in result["tokens_per_second"].values()] == [2, 2]
    assert result["best_ratio"] > 0 and result["median_ratio"] > 0
    assert calls and all(calls)  # asked only while shedding is on
    assert generator.shed_finished_rows


def test_engine_goes_on_when_a_transformers_path_fails(monkeypatch, tmp_path) -> None:
    """A peer path of transformers that raises (a compile mode never run on this device) is
    recorded under failed_paths with one warning; the run times the other paths and exits 0,
    so gpu_check.py's part keeps its later measurements."""
    monkeypatch.syspath_prepend(str(_PATH.parent))
    engine = importlib.import_module("engine")
    original = engine.run_transformers

    def failing(model, tokenizer, name, *args, **kwargs):
        if "static" in name:
            raise RuntimeError("cannot capture\na graph")
        return original(model, tokenizer, name, *args, **kwargs)

    monkeypatch.setattr(engine, "run_transformers", failing)
    output = tmp_path / "engine.json"
    argv = [
        "--model", "random-llama-tiny", "--num_prompts", "1", "--max_steps", "3",
        "--compile_backend", "eager", "--paths", "eager autoregressive", "transformers",
        "--batch_sizes", "--output", str(output),
    ]  # fmt: skip
    assert engine.main(argv) == 0
    document = json.loads(output.read_text())
    assert document["failed_paths"] == {
        "transformers generate (static cache + compile)": "RuntimeError: cannot capture a graph"
    }
    names = [path["name"] for path in document["paths"]]
    assert "transformers generate (dynamic cache)" in names
    assert any("assistant_early_exit" in name for name in names)
