"""Mutation-testing survivor of the compiled greedy step: a last step that verifies fewer
drafts than the compiled shape holds."""

from __future__ import annotations

import dataclasses

import pytest
from test_equivalence import NUM_LAYERS, generator_for, speculative

from self_speculation.passes import COMPILE_BACKEND_VARIABLE


@pytest.mark.parametrize("max_steps", [2, 4])
def test_a_compiled_last_step_accepts_no_draft_past_those_it_verifies(
    monkeypatch: pytest.MonkeyPatch, max_steps: int
) -> None:
    """k = 8 drafts in the compiled shape, room for max_steps - 1: the drafts after those
    are never verified, so none is accepted, even where the full model drafts them (it
    agrees with itself). Traced with dynamo's eager backend (seconds)."""
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    generator = generator_for("llama_mha_untied")
    config = speculative(NUM_LAYERS, 8, max_steps=max_steps)
    eager = generator.generate([5, 6], config)
    compiled = generator.generate([5, 6], dataclasses.replace(config, compile=True))
    assert compiled.token_ids == eager.token_ids and compiled.num_steps == eager.num_steps == 1
    assert compiled.num_drafted == compiled.num_accepted == max_steps - 1
