"""A stop string that holds a special token's text and other text stops where the model
writes it, as lm-eval's HFLM (and transformers' ``stop_strings``) match it: in text with the
special tokens written out.

lm-eval's gsm8k_cot_llama, gsm8k_platinum_cot_llama and asdiv_cot_llama stop at
``<|start_header_id|>user<|end_header_id|>``: with a Llama 3 tokenizer, where both are
special tokens, every request of those tasks was refused with a ConfigError ("holds the
special token ... and other text"), ending the evaluation; and a user's ``"<|im_end|>\\n"``
was refused although generation can stop there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_text_output import scripted_model
from tiny_models import make_tiny_tokenizer

from self_speculation import GenerationConfig, Generator, load_model_and_tokenizer
from self_speculation.eval_harness import LayerSkipLM

HEADER = "<|start_header_id|>user<|end_header_id|>"
STRATEGIES = [
    GenerationConfig(sample=False, max_steps=16, token_healing=False),
    GenerationConfig(
        generation_strategy="self_speculative", exit_layer=2, num_speculations=3, sample=False,
        max_steps=16, token_healing=False,
    ),
]  # fmt: skip


def _header_tokenizer_and_chain():
    """The tiny tokenizer with Llama 3's header and turn-end special tokens, and a greedy
    chain that writes a user header between two words."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True
    )
    start, end = tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"])
    chain = [*tokenizer.encode(" the lazy"), start, *tokenizer.encode("user"), end]
    chain += [*tokenizer.encode(" dog"), *tokenizer.encode(" fox"), tokenizer.eos_token_id]
    return tokenizer, chain, end


@pytest.mark.parametrize("config", STRATEGIES, ids=["autoregressive", "self_speculative"])
def test_a_stop_word_holding_special_tokens_stops_where_the_model_writes_it(
    config: GenerationConfig,
) -> None:
    tokenizer, chain, end = _header_tokenizer_and_chain()
    prompt = tokenizer.encode("def")
    generator = Generator(
        scripted_model(tokenizer, len(tokenizer) + 19, chain, prompt[-1]), tokenizer
    )
    assert generator.generate(prompt, config).token_ids == chain
    for words in ([HEADER], ["<|end_header_id|> dog"], ["Q:", HEADER]):
        stopped = generator.generate(
            prompt, GenerationConfig(**{**vars(config), "stop_words": words})
        )
        cut = chain.index(end) + 1 + (2 if "dog" in words[0] else 0)
        assert (stopped.token_ids, stopped.stop_reason) == (chain[:cut], "stop_word")
    # Not written: generation runs on to the EOS.
    other = generator.generate(
        prompt, GenerationConfig(**{**vars(config), "stop_words": ["<|eot_id|>user"]})
    )
    assert (other.token_ids, other.stop_reason) == (chain, "eos")


def test_a_task_stopping_at_a_llama3_user_header_answers_as_hflm(tmp_path: Path) -> None:
    """gsm8k_cot_llama's ``until`` with a tokenizer whose header tokens are special."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer, chain, _ = _header_tokenizer_and_chain()
    prompt_ids = tokenizer.encode("def")
    directory = tmp_path / "model"
    scripted_model(tokenizer, len(tokenizer) + 19, chain, prompt_ids[-1]).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    until = ["<|eot_id|>", HEADER, "Q:", "</s>", "<|im_end|>"]
    asked = [Instance("generate_until", {}, ("def", {"until": until, "max_gen_toks": 16}), 0)]
    hf = HFLM(pretrained=str(directory), dtype="float32", device="cpu", batch_size=1)
    expected = hf.generate_until(asked, disable_tqdm=True)
    model, loaded = load_model_and_tokenizer(str(directory), "float32", "cpu")
    generator = Generator(model, loaded)
    config = generator.resolve(GenerationConfig(sample=False, token_healing=False))
    lm = LayerSkipLM(generator, config, progress=False)
    assert lm.generate_until(asked) == expected == [" the lazyuser"]
    assert lm.generation_rows[0]["stop_reason"] == "stop_word"
