"""benchmarks/overhead.py: the cost-model bounds and the measured verification pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from self_speculation import Generator

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
