"""The Python API's entry points refuse wrong arguments as the scripts do: a TypeError or
ConfigError naming the argument, raised before any work (issue 24)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from self_speculation import (
    ConfigError,
    GenerationConfig,
    Generator,
    build_streamer,
    load_model_and_tokenizer,
)
from self_speculation.errors import ArgumentTypeError, LayerSkipError

GREEDY = GenerationConfig(sample=False, max_steps=2)


@pytest.fixture(scope="module")
def generator(tiny_model_dir: Path) -> Generator:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    return Generator(model, tokenizer)


@pytest.fixture()
def no_work(generator: Generator, monkeypatch):
    """Fails the test if decoding starts (the error must come before any work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("decoding started before the arguments were checked")

    monkeypatch.setattr(generator, "_strategy", refuse)
    return generator


@pytest.mark.parametrize(
    ("prompt", "error", "fragment"),
    [
        (b"def add", ArgumentTypeError, "prompt must be a str or a list of token ids, got bytes"),
        (None, ArgumentTypeError, "prompt must be a str or a list of token ids, got NoneType"),
        (42, ArgumentTypeError, "got int"),
        ("", ConfigError, "prompt is empty"),
        (" \n\t", ConfigError, "prompt is empty"),
        ([], ConfigError, "prompt is empty"),
        ([1, 2.5], ArgumentTypeError, "prompt must be a list of int, it holds float"),
        ([1, True], ArgumentTypeError, "it holds bool"),
        ([[1, 2]], ArgumentTypeError, "it holds list"),
        ([-1], ConfigError, "-1 is not a token id of this model"),
        ([10**9], ConfigError, "is not a token id of this model"),
        (torch.ones(1, 3, dtype=torch.long), ArgumentTypeError, "must be 1-D and integer"),
        (torch.ones(3), ArgumentTypeError, "must be 1-D and integer"),
        (torch.ones(3, dtype=torch.bool), ArgumentTypeError, "prompt: a tensor of token ids"),
        ("bad \udcff", ConfigError, "not valid UTF-8"),
    ],
)
def test_generate_refuses_bad_prompts(no_work: Generator, prompt, error, fragment) -> None:
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        no_work.generate(prompt, GREEDY)


def test_type_errors_are_type_errors_and_one_line_errors() -> None:
    """Python callers catch TypeError; the scripts print any LayerSkipError as one line."""
    assert issubclass(ArgumentTypeError, TypeError)
    assert issubclass(ArgumentTypeError, LayerSkipError)


def test_a_tensor_or_tuple_of_ids_is_a_prompt(generator: Generator) -> None:
    ids = generator.encode("def add")
    expected = generator.generate(ids, GREEDY).token_ids
    assert generator.generate(torch.tensor(ids), GREEDY).token_ids == expected
    assert generator.generate(tuple(ids), GREEDY).token_ids == expected


@pytest.mark.parametrize(
    ("prompts", "fragment"),
    [
        ("def add", "prompts must be a list of prompts, got str"),
        (b"def add", "prompts must be a list of prompts, got bytes"),
        (None, "got NoneType"),
        (torch.ones(2, 3, dtype=torch.long), "got Tensor"),
        (["def", b"add"], r"prompts\[1\] must be a str or a list of token ids, got bytes"),
        (["def", ""], r"prompts\[1\] is empty"),
        (["def", None], r"prompts\[1\] must be a str"),
    ],
)
def test_generate_batch_refuses_bad_prompts(no_work: Generator, prompts, fragment) -> None:
    with pytest.raises((ArgumentTypeError, ConfigError), match=fragment):
        no_work.generate_batch(prompts, GREEDY)


def test_generate_batch_refuses_no_prompts(no_work: Generator) -> None:
    with pytest.raises(ConfigError, match="no prompts given"):
        no_work.generate_batch([], GREEDY)


@pytest.mark.parametrize("method", ["generate", "generate_batch"])
def test_config_streamer_and_random_generator_are_checked(no_work: Generator, method) -> None:
    call = getattr(no_work, method)
    prompt = "def" if method == "generate" else ["def"]
    with pytest.raises(ArgumentTypeError, match="config must be a GenerationConfig, got NoneType"):
        call(prompt, None)
    with pytest.raises(ArgumentTypeError, match="config must be a GenerationConfig, got dict"):
        call(prompt, {"max_steps": 2})
    with pytest.raises(ArgumentTypeError, match="streamer must be a Streamer"):
        call(prompt, GREEDY, "standard")
    with pytest.raises(ArgumentTypeError, match="generator must be a torch.Generator"):
        call(prompt, GREEDY, None, 42)
    streamer = build_streamer("none", no_work.tokenizer)
    with pytest.raises(AssertionError, match="decoding started"):  # good arguments: work starts
        call(prompt, GREEDY, streamer, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"max_steps": 2.5}, "max_steps must be an int, got float 2.5"),
        ({"max_steps": True}, "max_steps must be an int, got bool"),
        ({"max_steps": "8"}, "max_steps must be an int, got str"),
        ({"exit_layer": 2.0}, "exit_layer must be an int"),
        ({"num_speculations": None}, "num_speculations must be an int, got NoneType"),
        ({"top_k": 1.5}, "top_k must be an int"),
        ({"no_repeat_ngram_size": 2.5}, "no_repeat_ngram_size must be an int"),
        ({"temperature": "0.7"}, "temperature must be a number, got str"),
        ({"top_p": None}, "top_p must be a number"),
        ({"draft_confidence_threshold": True}, "draft_confidence_threshold must be a number"),
        ({"sample": "False"}, "sample must be True or False, got str"),
        ({"sample": 0}, "sample must be True or False, got int"),
        ({"compile": None}, "compile must be True or False"),
        ({"token_healing": 1}, "token_healing must be True or False"),
        (
            {"stop_words": "name"},
            r"stop_words must be a list of str, got str 'name' \(write \['name'\]",
        ),
        ({"stop_words": ["a", 1]}, "stop_words must be a list of str, it holds int"),
        ({"stop_words": b"x"}, "stop_words must be a list of str, got bytes"),
        ({"stop_token_ids": 2}, r"stop_token_ids must be a list of int, got int 2 \(write \[2\]"),
        ({"stop_token_ids": [2, 2.0]}, "stop_token_ids must be a list of int, it holds float"),
        ({"stop_token_ids": "12"}, "stop_token_ids must be a list of int, got str"),
        ({"generation_strategy": None}, "generation_strategy must be"),
    ],
)
def test_generation_config_refuses_wrong_types(changes: dict, fragment: str) -> None:
    with pytest.raises(ArgumentTypeError, match=fragment):
        GenerationConfig(**changes)


def test_generation_config_takes_tuples_as_lists() -> None:
    config = GenerationConfig(stop_words=("a", "b"), stop_token_ids=(1, 2))
    assert config.stop_words == ["a", "b"] and config.stop_token_ids == [1, 2]


def test_generator_init_checks_its_arguments(generator: Generator) -> None:
    model, tokenizer = generator.model, generator.tokenizer
    with pytest.raises(ArgumentTypeError, match="model must be a transformers causal LM"):
        Generator("models/layerskip-stdlib", tokenizer)
    with pytest.raises(ArgumentTypeError, match="model must be"):
        Generator(None, tokenizer)
    with pytest.raises(ArgumentTypeError, match="tokenizer must be the model's tokenizer"):
        Generator(model, None)
    with pytest.raises(ArgumentTypeError, match="verify_model must be True or False"):
        Generator(model, tokenizer, verify_model="no")
    with pytest.raises(ArgumentTypeError, match="draft must be a DraftExit or None"):
        Generator(model, tokenizer, draft="adapter")


def test_load_model_and_tokenizer_checks_its_arguments(tiny_model_dir: Path) -> None:
    with pytest.raises(ArgumentTypeError, match="model must be a hub id, a path"):
        load_model_and_tokenizer(None)
    with pytest.raises(ArgumentTypeError, match="model must be"):
        load_model_and_tokenizer(b"models/layerskip-stdlib")
    with pytest.raises(ConfigError, match="model is empty"):
        load_model_and_tokenizer("  ")
    with pytest.raises(ArgumentTypeError, match="dtype must be a str"):
        load_model_and_tokenizer(str(tiny_model_dir), dtype=32)
    with pytest.raises(ConfigError, match="unsupported dtype torch.int8"):
        load_model_and_tokenizer(str(tiny_model_dir), dtype=torch.int8)
    with pytest.raises(ArgumentTypeError, match="device must be a str"):
        load_model_and_tokenizer(str(tiny_model_dir), device=0)
    with pytest.raises(ArgumentTypeError, match="model_args must be a dict"):
        load_model_and_tokenizer(str(tiny_model_dir), model_args="attn_implementation=eager")
    # a Path, a torch.dtype and a torch.device are taken for their names
    model, _ = load_model_and_tokenizer(
        tiny_model_dir, dtype=torch.float32, device=torch.device("cpu")
    )
    assert next(model.parameters()).dtype == torch.float32


def test_build_streamer_checks_its_name() -> None:
    with pytest.raises(ConfigError, match="unknown streamer 'colour'"):
        build_streamer("colour", None)
    with pytest.raises(ArgumentTypeError, match="got NoneType"):
        build_streamer(None, None)


def test_encode_and_resolve_check_their_arguments(generator: Generator) -> None:
    with pytest.raises(ArgumentTypeError, match="prompt must be a str, got bytes"):
        generator.encode(b"def")
    with pytest.raises(ArgumentTypeError, match="config must be a GenerationConfig, got NoneType"):
        generator.resolve(None)


def test_numpy_integers_are_integers(generator: Generator) -> None:
    import numpy as np

    config = GenerationConfig(sample=False, max_steps=np.int64(2), stop_token_ids=[np.int32(0)])
    assert type(config.max_steps) is int and config.stop_token_ids == [0]
    ids = generator.encode("def add")
    expected = generator.generate(ids, config).token_ids
    assert generator.generate([np.int64(token) for token in ids], config).token_ids == expected
    with pytest.raises(ArgumentTypeError, match="max_steps must be an int, got float64"):
        GenerationConfig(max_steps=np.float64(2.0))


@pytest.mark.parametrize("method", ["generate", "generate_batch"])
def test_a_random_generator_on_another_device_is_refused(no_work: Generator, method, monkeypatch):
    """A CPU torch.Generator for a model on CUDA (or the reverse) is one ConfigError before
    any work, not an error from deep inside sampling."""
    layerwise_class = type(no_work.layerwise)
    monkeypatch.setattr(layerwise_class, "device", property(lambda self: torch.device("cuda", 0)))
    call = getattr(no_work, method)
    prompt = "def" if method == "generate" else ["def"]
    with pytest.raises(
        ConfigError, match="generator is a cpu torch.Generator; the model runs on cuda:0"
    ):
        call(prompt, GREEDY, None, torch.Generator().manual_seed(0))


def test_a_model_whose_own_forward_gives_nan_is_refused_in_one_line() -> None:
    """NaN weights (or a dtype whose activations overflow): UnsupportedModelError naming it,
    not a RuntimeError from the exactness check."""
    from tiny_models import IdTokenizer, make_tiny_model

    from self_speculation import UnsupportedModelError

    model = make_tiny_model("qwen2")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(UnsupportedModelError, match="its own forward gives NaN or infinite logits"):
        Generator(model, IdTokenizer())


def test_drafting_with_the_full_model_is_warned_about_once(generator: Generator, caplog) -> None:
    """exit_layer = L is accepted (drafts equal the model's own tokens) but can only be slower
    than plain decoding: one warning per Generator, none for a lower exit layer."""
    generator._full_depth_drafts_warned = False
    lower = GenerationConfig(
        sample=False, max_steps=2, generation_strategy="self_speculative", exit_layer=1,
        num_speculations=2,
    )  # fmt: skip
    full = dataclasses.replace(lower, exit_layer=generator.num_layers)
    with caplog.at_level("WARNING"):
        generator.resolve(lower)
        assert "is the full model" not in caplog.text
        generator.resolve(full)
        generator.resolve(full)
    assert caplog.text.count("is the full model") == 1


def test_stop_token_ids_outside_the_vocabulary_are_refused(no_work: Generator) -> None:
    with pytest.raises(
        ConfigError, match=r"stop_token_ids must be token ids \(0 <= id < 2\*\*62\)"
    ):
        GenerationConfig(stop_token_ids=[2**63])  # no tensor holds it
    vocab_size = no_work.model.config.vocab_size
    for method in (
        no_work.generate,
        lambda prompt, config: no_work.generate_batch([prompt], config),
    ):
        with pytest.raises(ConfigError, match=f"{vocab_size} is not a token id of this model"):
            method("x", dataclasses.replace(GREEDY, stop_token_ids=[3, vocab_size]))


def test_a_stray_sliding_window_in_a_config_is_named() -> None:
    """A Llama config.json with a sliding_window key (its attention has none; transformers'
    cache applies one) was refused as "this family needs an adapter" alone."""
    from tiny_models import IdTokenizer, make_tiny_model

    from self_speculation.errors import UnsupportedModelError

    model = make_tiny_model("llama_mha_untied", dtype=torch.float32, sliding_window=4)
    with pytest.raises(UnsupportedModelError, match="config sets sliding_window=4"):
        Generator(model, IdTokenizer())
