"""correctness.py's near-tie check compares the two tokens as greedy decoding compares them:
with the logits processors (no_repeat_ngram_size, the checkpoint's repetition penalty...)
and token healing's first-token restriction applied. On raw logits, a strategy that picked
a token greedy decoding rules out (a banned one, one that does not extend a healed prompt)
read as a near tie whenever that token's raw logit tied the right one, and
--allow_near_ties True passed the defect (exit 0)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator


def _save_with_twin(directory: Path, prompt: str, position: int, config, pick_twin) -> tuple:
    """A tiny model whose head scores ``twin`` (chosen by ``pick_twin``) exactly as the greedy
    token at ``position``; the greedy output is unchanged (twin is ruled out there, or above
    the chosen token, which argmax prefers on a tie)."""
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    tokenizer = make_tiny_tokenizer()
    plain = Generator(model, tokenizer).generate(prompt, config)
    chosen = plain.token_ids[position]
    twin = pick_twin(model, tokenizer, chosen)
    with torch.no_grad():
        model.lm_head.weight[twin] = model.lm_head.weight[chosen]
    assert Generator(model, tokenizer).generate(prompt, config).token_ids == plain.token_ids
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return chosen, twin


def _run(model_dir: Path, prompt: str, position: int, replacement: int, tmp: Path, *extra):
    correctness = importlib.import_module("correctness")
    data = tmp / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": prompt, "response": "x"}) + "\n")
    original = Generator.generate

    def altered(self, prompt, config, *args, **kwargs):
        result = original(self, prompt, config, *args, **kwargs)
        if config.num_speculations > 0:  # the strategy under test picks `replacement`
            result.token_ids[position:] = [replacement]
        return result

    Generator.generate = altered
    try:
        argv = [
            "--model", str(model_dir), "--dataset", "custom_jsonl", "--data_path", str(data),
            "--num_samples", "1", "--max_steps", "4", "--exit_layer", "2",
            "--num_speculations", "2", "--output_dir", str(tmp / "out"),
            "--allow_near_ties", "True", *extra,
        ]  # fmt: skip
        status = correctness.main(argv)
    finally:
        Generator.generate = original
    return status, json.loads(next((tmp / "out").glob("correctness_*.json")).read_text())


def test_a_banned_token_is_no_near_tie(tmp_path: Path) -> None:
    prompt, position = "def add(a, b):", 1
    config = GenerationConfig(max_steps=4, sample=False, no_repeat_ngram_size=1)

    def prompt_token(model, tokenizer, chosen):  # in the prompt: banned by no-repeat 1-grams
        return next(t for t in tokenizer(prompt)["input_ids"][1:] if t != chosen)

    chosen, twin = _save_with_twin(tmp_path / "model", prompt, position, config, prompt_token)
    status, document = _run(
        tmp_path / "model", prompt, position, twin, tmp_path,
        "--token_healing", "False", "--no_repeat_ngram_size", "1",
    )  # fmt: skip
    (mismatch,) = document["mismatches"]
    assert mismatch["tokens"] == [chosen, twin]
    assert not mismatch["near_tie"] and document["num_near_ties"] == 0
    assert status == 1


def test_a_token_that_does_not_extend_a_healed_prompt_is_no_near_tie(tmp_path: Path) -> None:
    prompt, position = "The quick ", 0  # healed: backed up over " "
    config = GenerationConfig(max_steps=4, sample=False, token_healing=True)  # as the scripts
    allowed = {}

    def not_extending(model, tokenizer, chosen):
        _, removed, mask = Generator(model, tokenizer)._heal([tokenizer(prompt)["input_ids"]])
        assert removed == [" "] and mask[0, chosen]
        allowed["mask"] = mask[0]
        return next(t for t in range(chosen + 1, 300) if not mask[0, t])

    chosen, twin = _save_with_twin(tmp_path / "model", prompt, position, config, not_extending)
    assert allowed["mask"][chosen] and not allowed["mask"][twin]
    status, document = _run(tmp_path / "model", prompt, position, twin, tmp_path)
    (mismatch,) = document["mismatches"]
    assert mismatch["tokens"] == [chosen, twin]
    assert not mismatch["near_tie"] and status == 1


@pytest.mark.parametrize("allowed", [True, False])
def test_a_tie_among_allowed_tokens_still_is_one(tmp_path: Path, allowed: bool) -> None:
    """Unchanged: two tokens the processors leave alone, tied, are a near tie."""
    prompt, position = "def add(a, b):", 1
    config = GenerationConfig(max_steps=4, sample=False, no_repeat_ngram_size=1)

    def unused(model, tokenizer, chosen):
        used = set(tokenizer(prompt)["input_ids"])
        plain = Generator(model, tokenizer).generate(prompt, config).token_ids
        return next(t for t in range(chosen + 1, 300) if t not in used and t not in plain)

    chosen, twin = _save_with_twin(tmp_path / "model", prompt, position, config, unused)
    extra = ("--no_repeat_ngram_size", "1") if allowed else ()
    status, document = _run(
        tmp_path / "model", prompt, position, twin, tmp_path, "--token_healing", "False", *extra
    )
    (mismatch,) = document["mismatches"]
    assert mismatch["near_tie"] and mismatch["rounding_steps"] == 0.0 and status == 0


def test_a_tie_under_the_checkpoints_repetition_penalty_is_one(tmp_path: Path) -> None:
    """The checkpoint's repetition penalty halves a repeated token's logit before greedy
    decoding compares: a repeated token whose raw logit is twice the chosen one's ties it
    there (a right implementation may pick either), though their raw logits are far apart."""
    from transformers import GenerationConfig as CheckpointConfig

    prompt, position = "def add(a, b):", 1
    model = make_tiny_model("llama_mha_untied", dtype=torch.float32)
    tokenizer = make_tiny_tokenizer()
    model.generation_config = CheckpointConfig(repetition_penalty=2.0)
    config = GenerationConfig(max_steps=4, sample=False)
    plain = Generator(model, tokenizer).generate(prompt, config).token_ids
    chosen = plain[position]
    in_prompt = set(tokenizer(prompt)["input_ids"])
    twin = next(t for t in sorted(in_prompt) if t > chosen)  # penalized at every position
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(prompt)["input_ids"] + plain[:position]])).logits
        assert logits[0, -1, chosen] > 0 and chosen not in in_prompt | set(plain[:position])
        model.lm_head.weight[twin] = 2 * model.lm_head.weight[chosen]
    assert Generator(model, tokenizer).generate(prompt, config).token_ids == plain
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    status, document = _run(
        tmp_path / "model", prompt, position, twin, tmp_path, "--token_healing", "False"
    )
    (mismatch,) = document["mismatches"]
    assert mismatch["tokens"] == [chosen, twin]
    assert mismatch["near_tie"] and status == 0
