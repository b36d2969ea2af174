"""correctness.py classifies each difference: a near tie (the full model's logits for the two
tokens within rounding of each other, what bfloat16 and float16 produce without either
strategy being wrong) or a real one. Before, every difference was only "differs", so a
bfloat16 run could not tell rounding from a defect; --allow_near_ties True exits 0 when all
differences are near ties."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator

PROMPT = "def add(a, b):"
POSITION = 1  # where the self-speculative output is made to differ


@pytest.fixture(scope="module")
def twin_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """A tiny model whose head scores token ``twin`` exactly as the greedy token at POSITION
    (their rows made equal): picking either there is a tie."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    tokenizer = make_tiny_tokenizer()
    plain = Generator(model, tokenizer).generate(
        PROMPT, GenerationConfig(max_steps=4, sample=False)
    )
    chosen = plain.token_ids[POSITION]
    twin = chosen + 1 if chosen + 1 not in plain.token_ids else chosen + 2
    with torch.no_grad():
        model.lm_head.weight[twin] = model.lm_head.weight[chosen]
    directory = tmp_path_factory.mktemp("twin")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, chosen, twin


def run(
    model_dir: Path, data: Path, output: Path, replacement: int, *extra: str
) -> tuple[int, dict]:
    correctness = importlib.import_module("correctness")
    original = Generator.generate

    def altered(self, prompt, config, *args, **kwargs):
        result = original(self, prompt, config, *args, **kwargs)
        if config.num_speculations > 0:  # the strategy under test picks `replacement` there
            result.token_ids[POSITION:] = [replacement]
        return result

    Generator.generate = altered
    try:
        argv = [
            "--model", str(model_dir), "--dataset", "custom_jsonl", "--data_path", str(data),
            "--num_samples", "1", "--max_steps", "4", "--exit_layer", "2",
            "--num_speculations", "2", "--token_healing", "False", "--output_dir", str(output),
            *extra,
        ]  # fmt: skip
        status = correctness.main(argv)
    finally:
        Generator.generate = original
    return status, json.loads(next(output.glob("correctness_*.json")).read_text())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT, "response": "x"}) + "\n")
    return path


def test_a_tie_is_reported_as_one_and_may_pass(twin_model, data: Path, tmp_path: Path) -> None:
    model_dir, chosen, twin = twin_model
    status, document = run(model_dir, data, tmp_path / "a", twin)
    (mismatch,) = document["mismatches"]
    assert status == 1 and not document["passed"]
    assert mismatch["first_difference"] == POSITION and mismatch["tokens"] == [chosen, twin]
    assert mismatch["near_tie"] and mismatch["rounding_steps"] == 0.0
    assert document["num_near_ties"] == 1
    status, _ = run(model_dir, data, tmp_path / "b", twin, "--allow_near_ties", "True")
    assert status == 0


def test_a_real_difference_fails_even_with_near_ties_allowed(
    twin_model, data: Path, tmp_path: Path
) -> None:
    model_dir, chosen, _ = twin_model
    far = (chosen + 7) % 50
    status, document = run(model_dir, data, tmp_path, far, "--allow_near_ties", "True")
    (mismatch,) = document["mismatches"]
    assert status == 1 and mismatch["tokens"] == [chosen, far]
    assert not mismatch["near_tie"] and mismatch["rounding_steps"] > 1000
    assert document["num_near_ties"] == 0


def test_a_check_that_fails_leaves_the_difference_unclassified_not_the_results_unwritten(
    twin_model, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recomputed forward can fail where decoding did not (out of memory for a long
    prompt on a GPU): the comparison is done, and its document is still written."""
    correctness = importlib.import_module("correctness")
    model_dir, _, twin = twin_model

    def failing(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(correctness, "_tie_check", failing)
    status, document = run(model_dir, data, tmp_path, twin)
    (mismatch,) = document["mismatches"]
    assert status == 1 and not mismatch["near_tie"]
    assert mismatch["why"].startswith("not classified: CUDA out of memory")
