"""A library in inductor's on-disk cache left empty or cut short by a compile killed while
writing it made every later compile of that code fail to load it ("file too short"), so
every later process decoded eagerly: it is removed and the pass compiled again, once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator
from self_speculation.passes import COMPILE_BACKEND_VARIABLE, PRECOMPILE_VARIABLE

PROMPTS = [[5, 7, 9, 11, 13], [3, 4]]
CONFIG = GenerationConfig(
    max_steps=12, sample=False, generation_strategy="self_speculative", exit_layer=2,
    num_speculations=3,
)  # fmt: skip


def _backend_loading(library: Path, name: str) -> None:
    """A backend whose compiles fail to load ``library`` while it is there, as inductor's do
    on a damaged file, and run the graph as it is otherwise."""

    def backend(graph, example_inputs):
        if library.exists():
            raise ImportError(f"{library}: file too short")
        return graph.forward

    torch._dynamo.register_backend(backend, name=name)


@pytest.mark.parametrize("inside", [True, False], ids=["in_the_cache", "elsewhere"])
def test_a_damaged_library_in_inductors_cache_is_removed_and_compiled_again(
    inside: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setenv(PRECOMPILE_VARIABLE, "0")
    library = (cache if inside else tmp_path / "mine") / "jg" / "cjgp7smp.main.so"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    name = f"layerskip_damaged_{'inside' if inside else 'elsewhere'}"
    _backend_loading(library, name)
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, name)
    generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
    eager = [r.token_ids for r in generator.generate_batch(PROMPTS, CONFIG)]
    fast_config = GenerationConfig(**{**CONFIG.__dict__, "compile": True})
    with caplog.at_level(logging.WARNING, logger="self_speculation.passes"):
        fast = [r.token_ids for r in generator.generate_batch(PROMPTS, fast_config)]
    warnings = [record.getMessage() for record in caplog.records]
    assert fast == eager and len(warnings) == 1, warnings
    if inside:  # removed, compiled again: the fast path stays on
        assert not library.exists() and "damaged" in warnings[0]
        assert generator.fast_path_fallback(fast_config) is None
    else:  # never a file outside inductor's cache: the fast path is off, as before
        assert library.exists() and "fast path off" in warnings[0]
