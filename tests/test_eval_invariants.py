"""lm-eval's is_greedy flag: the suite only checked that it is a bool."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, load_model_and_tokenizer
from self_speculation.eval_harness import LayerSkipLM


class Request:  # what lm-eval's Instance offers the model
    def __init__(self, args: tuple) -> None:
        self.args = args


def test_is_greedy_says_whether_argmax_decoding_gives_the_continuation(
    tiny_model_dir: Path,
) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    context = "def add(a, b):"
    context_ids = tokenizer(context)["input_ids"]
    with torch.no_grad():  # the full model's own greedy continuation, three tokens
        ids = torch.tensor([context_ids])
        for _ in range(3):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    greedy_ids = ids[0, len(context_ids) :].tolist()
    other_ids = [*greedy_ids[:2], (greedy_ids[2] + 1) % model.config.vocab_size]
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=False)), progress=False)
    # Token ids in, so that no retokenization of the continuation gets in the way.
    results = [lm._continuation_logprob(context_ids, ids) for ids in (greedy_ids, other_ids)]
    assert [greedy for _, greedy in results] == [True, False]
    assert results[0][0] > results[1][0]


def test_a_context_longer_than_the_model_is_cut_to_leave_room_to_generate() -> None:
    generator = Generator(
        make_tiny_model("llama_gqa_tied", max_position_embeddings=32), make_tiny_tokenizer()
    )
    lm = LayerSkipLM(
        generator, generator.resolve(GenerationConfig(sample=False, max_steps=4)), progress=False
    )
    (answer,) = lm.generate_until([Request(("x y " * 40, {"until": [], "max_gen_toks": 4}))])
    assert isinstance(answer, str)
    assert lm.generation_rows[0]["num_generated_tokens"] >= 1
