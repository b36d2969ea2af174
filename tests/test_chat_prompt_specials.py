"""An instruct checkpoint's prompts: a prompt text that writes out the BOS token (a chat
template's text, pasted or put in a data file) gets no second BOS, and a stop word that is
a special token's text ("<|im_end|>") stops at that token, which decodes to no text."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from test_text_output import scripted_model
from tiny_models import make_tiny_model, make_tiny_tokenizer
from tokenizers.processors import TemplateProcessing

from self_speculation import GenerationConfig, Generator

STRATEGIES = [
    GenerationConfig(sample=False, max_steps=12),
    GenerationConfig(
        generation_strategy="self_speculative", exit_layer=2, num_speculations=3, sample=False,
        max_steps=12,
    ),
]  # fmt: skip


def bos_adding_tokenizer():
    """The tiny tokenizer, adding "<s>" in front of every text as Llama's tokenizers do."""
    tokenizer = make_tiny_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert tokenizer("def add")["input_ids"][:2] == [tokenizer.bos_token_id, 297]
    return tokenizer


@pytest.mark.parametrize("config", STRATEGIES, ids=["autoregressive", "self_speculative"])
def test_a_prompt_that_writes_out_the_bos_gets_one_bos(config: GenerationConfig) -> None:
    """A text "<s>def add" (a Llama chat template's text starts with its BOS) was encoded
    [<s>, <s>, ...]: the model read a second BOS that the same prompt as ids has not."""
    tokenizer = bos_adding_tokenizer()
    generator = Generator(make_tiny_model("llama_gqa_tied"), tokenizer)
    ids = tokenizer("def add(a, b):")["input_ids"]
    assert generator.encode("<s>def add(a, b):") == ids
    written = generator.generate("<s>def add(a, b):", config)
    assert written.num_prompt_tokens == len(ids)
    assert written.token_ids == generator.generate(ids, config).token_ids


def test_generate_py_gives_a_prompt_that_writes_out_the_bos_one_bos(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    make_tiny_model("llama_gqa_tied").save_pretrained(model_dir)
    bos_adding_tokenizer().save_pretrained(model_dir)
    generate = importlib.import_module("generate")
    for prompt, logs in (("def add(a, b):", "plain"), ("<s>def add(a, b):", "written")):
        argv = ["--model", str(model_dir), "--prompt", prompt, "--sample", "False"]
        argv += ["--max_steps", "4", "--output_dir", str(tmp_path / logs)]
        assert generate.main(argv) == 0
    counts = [
        json.loads(next((tmp_path / logs).glob("generate_*.json")).read_text())["prompts"][0][
            "num_prompt_tokens"
        ]
        for logs in ("plain", "written")
    ]
    assert counts[0] == counts[1]


def test_generate_py_records_whether_the_chat_template_ran(tmp_path: Path) -> None:
    """--chat_template True on a tokenizer without one uses the prompt as written (a
    warning says so); the document recorded only the flag, True."""
    generate = importlib.import_module("generate")
    model_dir = tmp_path / "model"
    make_tiny_model("llama_gqa_tied").save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)  # no chat template
    chat_dir = tmp_path / "chat"
    make_tiny_model("llama_gqa_tied").save_pretrained(chat_dir)
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(chat_dir)
    applied = []
    for model, flag in ((model_dir, "True"), (chat_dir, "True"), (chat_dir, "False")):
        logs = tmp_path / f"logs-{model.name}-{flag}"
        argv = ["--model", str(model), "--prompt", "x", "--chat_template", flag, "--sample"]
        argv += ["False", "--max_steps", "2", "--output_dir", str(logs)]
        assert generate.main(argv) == 0
        document = json.loads(next(logs.glob("generate_*.json")).read_text())
        applied.append(document["chat_template_applied"])
    assert applied == [False, True, False]


def chat_tokenizer_and_chain():
    """The tiny tokenizer with "<|im_end|>" added as a special token (not the EOS), and a
    greedy chain that writes it between two words."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(["<|im_end|>"], special_tokens=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chain = [*tokenizer.encode(" the lazy"), end, *tokenizer.encode(" dog")]
    chain += [*tokenizer.encode(" fox"), tokenizer.eos_token_id]
    return tokenizer, chain, end


@pytest.mark.parametrize("config", STRATEGIES, ids=["autoregressive", "self_speculative"])
def test_a_stop_word_that_is_a_special_tokens_text_stops_at_that_token(
    config: GenerationConfig,
) -> None:
    """--stop_words "<|im_end|>" never fired: the stop words are searched in text decoded
    without special tokens, so generation ran past the end of the assistant's turn."""
    tokenizer, chain, end = chat_tokenizer_and_chain()
    prompt = tokenizer.encode("def")
    model = scripted_model(tokenizer, len(tokenizer) + 19, chain, prompt[-1])
    generator = Generator(model, tokenizer)
    plain = generator.generate(prompt, config)
    assert plain.token_ids == chain and plain.stop_reason == "eos"
    stopped = generator.generate(
        prompt, GenerationConfig(**{**vars(config), "stop_words": ["<|im_end|>"]})
    )
    assert stopped.token_ids == chain[: chain.index(end) + 1]
    assert (stopped.stop_reason, stopped.text) == ("stop_word", " the lazy")
    # The EOS's own text stops as the EOS does, and a text stop word as before.
    eos = generator.generate(prompt, GenerationConfig(**{**vars(config), "stop_words": ["</s>"]}))
    assert (eos.token_ids, eos.stop_reason) == (chain, "eos")
    text = generator.generate(prompt, GenerationConfig(**{**vars(config), "stop_words": ["dog"]}))
    assert (text.stop_reason, text.text) == ("stop_word", " the lazy dog")


@pytest.mark.parametrize("config", STRATEGIES, ids=["autoregressive", "self_speculative"])
def test_a_stop_word_holding_a_special_token_and_text_stops_where_it_is_written(
    config: GenerationConfig,
) -> None:
    """ "<|im_end|> dog" was searched in text decoded without special tokens, so it never
    matched (then it was refused); it is searched with the special tokens written out, as
    lm-eval's HFLM matches its stop strings (tests/test_special_stop_words.py)."""
    tokenizer, chain, end = chat_tokenizer_and_chain()
    prompt = tokenizer.encode("def")
    generator = Generator(
        scripted_model(tokenizer, len(tokenizer) + 19, chain, prompt[-1]), tokenizer
    )
    for words, kept in ((["<|im_end|> dog"], chain.index(end) + 3), (["<|im_end|>\n"], None)):
        result = generator.generate(
            prompt, GenerationConfig(**{**vars(config), "stop_words": words})
        )
        assert result.token_ids == chain[:kept]
        assert result.stop_reason == ("eos" if kept is None else "stop_word")
