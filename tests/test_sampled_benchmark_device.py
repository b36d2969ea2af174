"""benchmarks/sampled.py on a GPU: the model loads on CUDA where there is one, so a seed's
generator and transformers' prompt ids must be made on the model's device (a CPU
torch.Generator is refused by ``Generator.generate`` after every path's warm-up compile;
CPU ids fail transformers' ``generate`` on a CUDA model). Checked on the CPU with a
recording stand-in for torch.Generator and for the model."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sampled  # noqa: E402

CUDA = torch.device("cuda", 0)


def test_seeded_generators_are_made_on_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []

    class RecordingGenerator:
        def __init__(self, device="cpu") -> None:
            made.append(torch.device(device))

        def manual_seed(self, seed: int) -> RecordingGenerator:
            return self

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    result = SimpleNamespace(
        num_generated_tokens=2, total_time=1.0, num_drafted=0, num_accepted=0, token_ids=[1, 2]
    )
    fake = SimpleNamespace(
        layerwise=SimpleNamespace(device=CUDA), generate=lambda prompt, config, generator: result
    )
    sampled._decode(fake, None, ["a", "b"])
    assert made == [CUDA, CUDA]


def test_transformers_prompt_ids_go_to_the_models_device(monkeypatch: pytest.MonkeyPatch) -> None:
    moved = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    class Ids(torch.Tensor):
        def to(self, *args, **kwargs):
            moved.append(torch.device(args[0]))
            return self

    class Tokenizer:
        pad_token_id = 0

        def __call__(self, prompt: str, return_tensors: str) -> dict:
            return {"input_ids": torch.tensor([[5, 6, 7]]).as_subclass(Ids)}

    model = SimpleNamespace(device=CUDA, generate=lambda ids, **kwargs: torch.cat([ids, ids], 1))
    args = sampled.SampledArguments(max_steps=3)
    assert sampled._transformers_rate(model, Tokenizer(), ["a"], args) > 0
    assert moved == [CUDA]
