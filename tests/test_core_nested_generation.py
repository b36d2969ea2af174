"""An eager generation started from a compiled generation's streamer runs (it is not
refused, and the outer generation's tokens stay right). test_fast_path's version of this
never ran the inner generation: its streamer took no tokens, so on_step was never called."""

from __future__ import annotations

import dataclasses

import pytest
from test_equivalence import generator_for, greedy

from self_speculation.passes import COMPILE_BACKEND_VARIABLE
from self_speculation.streaming import Streamer


def test_an_eager_generation_inside_a_compiled_ones_streamer_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")  # traced, not compiled: seconds
    generator = generator_for("llama_mha_untied")
    eager = greedy(8)
    expected = generator.generate([5, 7, 9], eager).token_ids
    inner_expected = generator.generate([3, 4], eager).token_ids
    inner = []

    class Nested(Streamer):
        def on_step(self, *step) -> None:
            inner.append(generator.generate([3, 4], eager).token_ids)

    compiled = dataclasses.replace(eager, compile=True)
    result = generator.generate([5, 7, 9], compiled, streamer=Nested())
    assert result.token_ids == expected
    assert len(inner) == 8 and all(tokens == inner_expected for tokens in inner)
