"""Greedy decoding of a float64 model compares logits as transformers' ``generate`` does: in
float32 (``generate`` casts every step's logits to float32 before its argmax). Before, the
argmax took the float64 logits as they were, unless a logits processor ran (those work in
float32): two tokens whose float64 logits lay within float32 rounding of each other decoded
one way without processors and the other way with a no_repeat_ngram_size that banned
nothing, and ``generate`` decoded the second. correctness.py measures a difference's gap in
rounding steps of that same float32."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator

PROMPT = [5, 60, 7]
STEPS = 4


@pytest.fixture(scope="module")
def near_twin() -> tuple[torch.nn.Module, int]:
    """A float64 tiny Llama whose head row for the token below the prompt's greedy token
    scores 1e-12 (relative) lower than it: apart in float64, one value in float32."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float64)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]  # [vocab]
        chosen = int(logits.argmax())
        assert chosen > 0
        weight = model.lm_head.weight
        weight[chosen - 1] = weight[chosen] * (1.0 - 1e-12 * float(logits[chosen].sign()))
        logits = model(ids).logits[0, -1]
    assert logits[chosen] > logits[chosen - 1]  # float64 keeps them apart
    assert logits.float()[chosen] == logits.float()[chosen - 1]  # float32 does not
    return model, chosen


def transformers_greedy(model: torch.nn.Module) -> list[int]:
    ids = torch.tensor([PROMPT])
    output = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
        eos_token_id=None, pad_token_id=2,
    )  # fmt: skip
    return output[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"no_repeat_ngram_size": 8},  # bans nothing in 4 tokens
        {"generation_strategy": "self_speculative", "exit_layer": 2, "num_speculations": 3},
        {"generation_strategy": "self_speculative", "exit_layer": 4, "num_speculations": 2},
        {"generation_strategy": "tree", "exit_layer": 4, "num_speculations": 2},
    ],
    ids=["autoregressive", "ngram_banning_nothing", "self_speculative", "last_exit", "tree"],
)
def test_float64_greedy_decodes_as_transformers(near_twin, settings: dict) -> None:
    model, chosen = near_twin
    reference = transformers_greedy(model)
    assert reference[0] == chosen - 1  # the float32 tie goes to the lower token id
    config = GenerationConfig(max_steps=STEPS, sample=False, **settings)
    assert Generator(model, IdTokenizer()).generate(PROMPT, config).token_ids == reference


def test_tie_check_measures_float64_in_float32_steps(near_twin) -> None:
    """A difference at the near twin is a tie as greedy decoding sees it (0 steps); one a
    float32 rounding step apart is 1 step, not the 2**29 float64 steps it spans."""
    correctness = importlib.import_module("correctness")
    model, chosen = near_twin
    generator = Generator(model, IdTokenizer())
    rows = [
        {"index": 0, "generation_strategy": name, "prompt": " ".join(map(str, PROMPT)),
         "num_prompt_tokens": len(PROMPT), "token_ids": [token]}
        for name, token in (("autoregressive", chosen - 1), ("self_speculative", chosen))
    ]  # fmt: skip
    config = GenerationConfig(max_steps=STEPS, sample=False)
    names = ["autoregressive", "self_speculative"]
    tie = correctness._tie_check(generator, config, rows, 0, 0, names)
    assert tie["near_tie"] and tie["rounding_steps"] == 0
    with torch.no_grad():  # the lower twin one float32 step below the greedy token
        logits = model(torch.tensor([PROMPT])).logits[0, -1]  # [vocab], float64
        below = torch.nextafter(logits[chosen].float(), torch.tensor(-1e9)).double()
        model.lm_head.weight[chosen - 1] = model.lm_head.weight[chosen] * (below / logits[chosen])
    try:
        apart = correctness._tie_check(generator, config, rows, 0, 0, names)
    finally:
        with torch.no_grad():
            model.lm_head.weight[chosen - 1] = model.lm_head.weight[chosen] * (
                1.0 - 1e-12 * float(logits[chosen].sign())
            )
    assert 0.5 <= apart["rounding_steps"] <= 1.5 and apart["near_tie"]
