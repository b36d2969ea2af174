"""The Generator follows the model and tokenizer as the user changes them after making it."""

from __future__ import annotations

import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer

from self_speculation import ConfigError, GenerationConfig, Generator, Streamer
from self_speculation.training import apply_layer_dropout

PROMPT = "def add(a, b):"
SPECULATIVE = GenerationConfig(
    generation_strategy="self_speculative",
    exit_layer=2,
    num_speculations=3,
    sample=False,
    max_steps=12,
)
PLAIN = GenerationConfig(sample=False, max_steps=12)


def _model(**overrides):
    return make_tiny_model(
        "llama_mha_untied", dtype=torch.float32, initializer_range=0.3, **overrides
    )


def test_a_model_in_training_mode_decodes_as_in_eval_mode_and_keeps_its_mode() -> None:
    model = _model()
    apply_layer_dropout(model, p_max=0.5)
    expected = Generator(model, make_tiny_tokenizer()).generate(PROMPT, PLAIN).token_ids
    model.train()
    generator = Generator(model, make_tiny_tokenizer())  # the probe runs in eval mode too
    assert generator.generate(PROMPT, SPECULATIVE).token_ids == expected
    model.activation_checkpointing_enable()
    assert generator.generate(PROMPT, SPECULATIVE).token_ids == expected
    assert model.training and model.model.layers[0].training


def test_switching_the_attention_implementation_after_the_generator_was_made() -> None:
    model = _model()
    generator = Generator(model, make_tiny_tokenizer())
    expected = generator.generate(PROMPT, SPECULATIVE).token_ids
    model.set_attn_implementation("eager")
    assert generator.generate(PROMPT, SPECULATIVE).token_ids == expected
    assert generator.generate(PROMPT, PLAIN).token_ids == expected


def test_an_eos_set_on_the_model_after_the_generator_was_made_stops_it() -> None:
    model = _model()
    generator = Generator(model, make_tiny_tokenizer())
    tokens = generator.generate(PROMPT, PLAIN).token_ids
    model.generation_config.eos_token_id = [1, tokens[4]]
    result = generator.generate(PROMPT, SPECULATIVE)
    assert (result.token_ids, result.stop_reason) == (tokens[:5], "eos")


def test_a_streamer_subclass_overriding_on_step_gets_every_step() -> None:
    class Collect(Streamer):
        def __init__(self) -> None:
            self.tokens: list[int] = []

        def on_step(self, new_tokens, draft_tokens, accepted_count) -> None:
            self.tokens += new_tokens

    streamer = Collect()
    result = Generator(_model(), make_tiny_tokenizer()).generate(PROMPT, SPECULATIVE, streamer)
    assert streamer.tokens == result.token_ids


def test_a_pad_id_outside_the_model_vocabulary_is_not_used_for_padding() -> None:
    tokenizer = make_tiny_tokenizer()
    model = _model(vocab_size=len(tokenizer))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # the model is not resized
    generator = Generator(model, tokenizer)
    rows = generator.generate_batch([PROMPT, "The"], SPECULATIVE)
    assert [row.token_ids for row in rows] == [
        generator.generate(prompt, SPECULATIVE).token_ids for prompt in (PROMPT, "The")
    ]


def test_a_stop_word_that_is_not_utf8_is_a_config_error() -> None:
    try:
        GenerationConfig(stop_words=["\ud800"])
    except ConfigError as error:
        assert "stop_words[0]" in str(error)
    else:
        raise AssertionError("no ConfigError")


def test_overlapping_generations_keep_eval_mode_until_the_last_one_ends() -> None:
    """Thread A ends while thread B still decodes a model left in train(): B stays in eval
    mode (dropout off) to its end; the modes come back after both."""
    import threading

    from tiny_models import IdTokenizer, make_tiny_model

    from self_speculation.streaming import Streamer

    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32, attention_dropout=0.5)
    generator = Generator(model, IdTokenizer())
    config = GenerationConfig(
        generation_strategy="self_speculative",
        sample=False,
        max_steps=24,
        exit_layer=2,
        num_speculations=3,
    )
    expected = generator.generate("9 10 11 12", config).token_ids
    model.train()
    b_started, a_done, out, threads = threading.Event(), threading.Event(), {}, []

    class WaitForA(Streamer):
        def on_step(self, new_tokens, draft_tokens, accepted_count):
            if not b_started.is_set():
                b_started.set()
                a_done.wait(30)

    def thread_b():
        out["b"] = generator.generate("9 10 11 12", config, streamer=WaitForA()).token_ids

    class StartB(Streamer):
        def on_step(self, new_tokens, draft_tokens, accepted_count):
            if not b_started.is_set():
                threads.append(threading.Thread(target=thread_b))
                threads[0].start()
                b_started.wait(30)

    generator.generate("5 6 7", GenerationConfig(max_steps=4, sample=False), streamer=StartB())
    a_done.set()
    threads[0].join(60)
    assert out["b"] == expected
    assert all(module.training for module in model.modules())
