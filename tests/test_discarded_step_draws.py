"""A step issued ahead of the host's read after the last row finished is discarded; its
draws must not be: a random source shared by successive sampled calls (a seeded
``torch.Generator``, or torch's default one) draws the same text whether steps go ahead
(GPUs, without a streamer) or are read one by one (with a streamer, CPUs)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IdTokenizer, make_repeating_model

from self_speculation import GenerationConfig, Generator
from self_speculation import generator as generator_module

PROMPTS = [[3, 1, 4], [5, 6, 7, 8, 9]]
SETTINGS = [
    dict(generation_strategy="autoregressive"),
    dict(generation_strategy="self_speculative", exit_layer=1, num_speculations=3),
]


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator(make_repeating_model(), IdTokenizer())


def _two_calls(generator: Generator, ahead: bool, settings: dict, seeded: bool) -> list:
    """Two sampled calls sharing one random source, and the source's next number."""
    config = GenerationConfig(max_steps=6, sample=True, temperature=1.0, top_p=1.0, **settings)
    random = torch.Generator().manual_seed(3) if seeded else None
    if not seeded:
        torch.manual_seed(3)
    generator.steps_ahead = ahead
    try:
        texts = [
            [r.token_ids for r in generator.generate_batch(PROMPTS, config, generator=random)]
            for _ in range(2)
        ]
    finally:
        generator.steps_ahead = None
    return [texts, float(torch.rand(1, generator=random))]


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "default_source"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["generation_strategy"])
def test_a_discarded_step_ahead_gives_its_draws_back(
    generator: Generator, settings: dict, seeded: bool
) -> None:
    step_by_step = _two_calls(generator, False, settings, seeded)
    assert _two_calls(generator, True, settings, seeded) == step_by_step


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["generation_strategy"])
def test_numbers_another_thread_drew_meanwhile_are_not_handed_out_again(
    generator: Generator, settings: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something else drawing from the shared source while a step is ahead (another
    thread, simulated at each host read): the source is not rewound, so those numbers are
    not drawn again."""
    random = torch.Generator().manual_seed(5)
    elsewhere = []
    values = generator_module._HostRead.values

    def read_while_another_draws(read: object) -> list[int]:
        torch.rand(4, generator=random)
        elsewhere.append(random.get_state())
        return values(read)

    monkeypatch.setattr(generator_module._HostRead, "values", read_while_another_draws)
    config = GenerationConfig(max_steps=6, sample=True, temperature=1.0, top_p=1.0, **settings)
    generator.steps_ahead = True
    try:
        generator.generate_batch(PROMPTS, config, generator=random)
    finally:
        generator.steps_ahead = None
    # Rewound to before the discarded step, the source would hand out the other draws'
    # numbers again; it stays where the last of them left it.
    assert torch.equal(random.get_state(), elsewhere[-1])
