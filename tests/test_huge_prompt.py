"""A data row far longer than the model's context is refused from a prefix of it.

``check_prompts`` encoded every prompt whole to measure it: a JSONL file with one 50 MB row
took benchmark.py (sweep.py, correctness.py) over two minutes and 10 GB of memory, then
died in the tokenizer's allocator without a line (or ran the machine out of memory).
"""

from __future__ import annotations

import pytest
from tiny_models import make_tiny_model, make_tiny_tokenizer

from data import EvaluationExample
from self_speculation import ConfigError, Generator
from self_speculation.benchmarking import check_prompts


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())


def _recording(generator: Generator, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length in characters of every text ``generator`` encodes from now on."""
    lengths: list[int] = []
    encode = generator.encode

    def recorded(prompt: str) -> list[int]:
        lengths.append(len(prompt))
        return encode(prompt)

    monkeypatch.setattr(generator, "encode", recorded)
    return lengths


def test_a_huge_prompt_is_refused_without_encoding_it_whole(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = "x = 1 + 2\n" * 500_000  # 5 MB
    samples = [
        EvaluationExample(0, "def add(a, b):", None, {}, source_row=0),
        EvaluationExample(1, huge, None, {}, source_row=1),
    ]
    lengths = _recording(generator, monkeypatch)
    with pytest.raises(ConfigError, match=r"sample 1 \(row 2 of the data\): the prompt has over"):
        check_prompts(generator, samples)
    assert max(lengths) < len(huge) // 100
    assert all(length < len(huge) for length in lengths)


def test_a_prompt_that_fits_is_counted_whole(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = "def add(a, b):\n    return a + b\n" * 3
    lengths = _recording(generator, monkeypatch)
    check_prompts(generator, [EvaluationExample(0, prompt, None, {}, source_row=0)])
    assert lengths == [len(prompt)]


def test_a_prompt_just_over_the_context_gives_its_exact_length(generator: Generator) -> None:
    context = generator.layerwise.context_length
    prompt = "x = 1 + 2\n" * context
    length = len(generator.encode(prompt))
    assert context <= length and len(prompt) < 32 * context
    with pytest.raises(ConfigError, match=f"the prompt has {length} tokens;"):
        check_prompts(generator, [EvaluationExample(0, prompt, None, {}, source_row=0)])
