"""The text a user sees: results, streams, stop words and token healing read the generated
tokens as they follow the prompt, with tokenizers that decode a text's first token otherwise
than inside a text (SentencePiece Llama: Llama 2, CodeLlama) and tokens that decode to
nothing (special tokens, ids past the tokenizer's vocabulary)."""

from __future__ import annotations

import io

import pytest
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer
from transformers import LlamaTokenizer

from self_speculation import GenerationConfig, Generator, build_streamer

PIECES = ["▁", "▁▁", "▁▁▁", "▁def", "▁f", "(", "x", "):", "▁return", "▁y", "▁=", "▁+", "▁1"]
PIECES += ["▁Hello", "▁world", "▁x"]


def llama2_tokenizer() -> tuple[LlamaTokenizer, dict[str, int]]:
    """A Llama 2 style tokenizer (Metaspace, byte fallback, a decoder that strips the
    text's leading space) over a handful of pieces."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece in PIECES:
        vocab[piece] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=[]), vocab


def scripted_model(tokenizer, vocab_size: int, chain: list[int], first: int):
    """A tiny Llama whose greedy continuation of a prompt ending in ``first`` is ``chain``
    (layers silenced; each token's embedding points the head at the next one)."""
    keys = [first, *chain[:-1]]
    assert len(set(keys)) == len(keys)
    model = make_tiny_model(
        "llama_mha_untied", vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, max_position_embeddings=256,
    )  # fmt: skip
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
        embeddings.mul_(0.01)
        head.zero_()
        for dimension, (key, following) in enumerate(zip(keys, chain, strict=True)):
            embeddings[key] = 0.0
            embeddings[key, dimension] = 1.0
            head[following, dimension] = 10.0
    return model


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_a_continuation_keeps_its_leading_space_with_a_llama2_tokenizer(strategy: str) -> None:
    """HumanEval-like: the prompt ends in a newline and the answer starts with indentation;
    decoded alone, "▁▁▁" lost a space and prompt + text did not compile."""
    tokenizer, vocab = llama2_tokenizer()
    pieces = ["<s>", "▁def", "▁f", "(", "x", "):", "<0x0A>", "▁▁▁", "▁y", "▁=", "▁x", "▁+"]
    prompt = [vocab[piece] for piece in [*pieces, "▁1", "<0x0A>"]]
    body = [vocab[piece] for piece in ["▁▁▁", "▁return", "▁y"]]
    generator = Generator(scripted_model(tokenizer, len(tokenizer), body, prompt[-1]), tokenizer)
    streamer = build_streamer("standard", tokenizer)
    streamer.stream = io.StringIO()
    config = GenerationConfig(
        max_steps=3, sample=False, generation_strategy=strategy, exit_layer=2, num_speculations=2
    )
    result = generator.generate(prompt, config, streamer)
    assert result.token_ids == body
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
    assert result.text == "    return y"
    assert prompt_text + result.text == tokenizer.decode(prompt + body, skip_special_tokens=True)
    assert streamer.stream.getvalue() == result.text + "\n"
    compile(prompt_text + result.text + "\n", "<answer>", "exec")  # indentation holds


def test_a_prompt_ending_in_a_lone_space_token_is_healed_with_a_llama2_tokenizer() -> None:
    """ "Hello " is ["▁Hello", "▁"], and "▁" decoded alone is "": healing did not see it."""
    tokenizer, vocab = llama2_tokenizer()
    prompt = tokenizer("Hello ")["input_ids"]
    assert prompt[-1] == vocab["▁"]
    generator = Generator(
        scripted_model(tokenizer, len(tokenizer), [vocab["▁world"]], prompt[-2]), tokenizer
    )
    healed = generator.generate(
        "Hello ", GenerationConfig(max_steps=1, sample=False, token_healing=True)
    )
    assert healed.num_prompt_tokens == len(prompt) - 1
    assert healed.token_ids == [vocab["▁world"]]
    assert "Hello " + healed.text == "Hello world"


def test_a_stop_word_split_by_tokens_without_text_is_found() -> None:
    """The stop checker decodes a tail of the generated tokens; tokens that decode to
    nothing (ids past the tokenizer's vocabulary, special tokens) no longer shorten it."""
    tokenizer = make_tiny_tokenizer()
    prompt = tokenizer.encode("def")
    a, b = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("b")
    silent = [*range(len(tokenizer), len(tokenizer) + 12), tokenizer.pad_token_id]
    chain = [a, *silent, b, *tokenizer.encode(" the lazy dog")]
    model = scripted_model(tokenizer, len(tokenizer) + 20, chain, prompt[-1])
    result = Generator(model, tokenizer).generate(
        prompt, GenerationConfig(max_steps=len(chain), sample=False, stop_words=["ab"])
    )
    assert (result.stop_reason, result.text) == ("stop_word", "ab")
