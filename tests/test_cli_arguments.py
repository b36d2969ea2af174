"""The shared argument dataclasses: the original flags, defaults and validation."""

from __future__ import annotations

import dataclasses

import pytest

from arguments import (
    COMPILE_BREAK_EVEN_TOKENS,
    Arguments,
    ArgumentsError,
    BenchmarkArguments,
    GenerationArguments,
    expected_tokens,
    parse_args,
)
from self_speculation import DEFAULT_MODEL, ConfigError, GenerationConfig, GenerationStrategyName


def test_generation_arguments_mirror_generation_config() -> None:
    config_fields = {field.name: field for field in dataclasses.fields(GenerationConfig)}
    argument_fields = {field.name: field for field in dataclasses.fields(GenerationArguments)}
    assert set(config_fields) == set(argument_fields)
    defaults = GenerationArguments().config()
    # One deliberate difference: the scripts heal the prompt's last token by default.
    assert defaults == dataclasses.replace(GenerationConfig(), token_healing=True)


def test_defaults_are_the_original_tools() -> None:
    args, generation, benchmark = parse_args(
        Arguments, GenerationArguments, BenchmarkArguments, argv=[]
    )
    assert (args.model, args.seed, args.output_dir, args.dtype) == (
        DEFAULT_MODEL,
        42,
        "./logs",
        None,
    )
    assert (generation.max_steps, generation.exit_layer, generation.num_speculations) == (
        512,
        -1,
        -1,
    )
    assert generation.sample is True and generation.temperature == 0.6 and generation.top_p == 0.9
    assert (
        benchmark.random_shuffle is True and benchmark.n_shot == 0 and benchmark.num_samples is None
    )


def test_flags_parse_like_the_original() -> None:
    argv = [
        "--model", "m", "--sample", "False", "--generation_strategy", "self_speculative",
        "--exit_layer", "8", "--num_speculations", "6", "--stop_words", "###", "\n\n",
        "--stop_token_ids", "1", "2", "--random_shuffle", "False", "--n_shot", "2",
        "--template", "Q: {message}", "--model_args", "revision=main,trust_remote_code=false",
    ]  # fmt: skip
    args, generation, benchmark = parse_args(
        Arguments, GenerationArguments, BenchmarkArguments, argv=argv
    )
    config = generation.config()
    assert config.generation_strategy is GenerationStrategyName.SELF_SPECULATIVE
    assert (config.sample, config.exit_layer, config.num_speculations) == (False, 8, 6)
    assert config.stop_words == ["###", "\n\n"] and config.stop_token_ids == [1, 2]
    assert benchmark.random_shuffle is False and benchmark.n_shot == 2
    assert args.model_kwargs == {"revision": "main", "trust_remote_code": False}


def test_model_args_as_json() -> None:
    (args,) = parse_args(
        Arguments, argv=["--model_args", '{"revision": "v1", "low_cpu_mem_usage": true}']
    )
    assert args.model_kwargs == {"revision": "v1", "low_cpu_mem_usage": True}


def test_strategy_list_compares_against_the_full_model() -> None:
    (generation,) = parse_args(
        GenerationArguments,
        argv=["--generation_strategy", "autoregressive,self_speculative", "--exit_layer", "3"],
    )
    baseline, speculative = generation.configs()
    assert baseline.generation_strategy is GenerationStrategyName.AUTOREGRESSIVE
    assert baseline.exit_layer == -1  # the full model, not early exit
    assert speculative.exit_layer == 3


@pytest.mark.parametrize(
    ("argv", "error", "fragment"),
    [
        (["--bogus", "1"], ArgumentsError, "unrecognized arguments: --bogus"),
        (["--max_step", "5"], ArgumentsError, "unrecognized arguments: --max_step"),  # no prefixes
        (["--temp", "0.5"], ArgumentsError, "unrecognized arguments: --temp"),
        (["--sample", "perhaps"], ArgumentsError, "Boolean value expected"),
        (["--max_steps", "many"], ArgumentsError, "invalid int value"),
        (["--max_steps", "0"], ConfigError, "max_steps must be >= 1"),
        (["--temperature", "0"], ConfigError, "temperature must be"),
        (["--generation_strategy", "autoregressive,autoregressive"], ConfigError, "twice"),
        (["--num_samples", "0"], ConfigError, "--num_samples must be >= 1"),
        (["--n_shot", "-1"], ConfigError, "--n_shot must be >= 0"),
        (["--model_args", "novalue"], ConfigError, "expected key=value"),
    ],
)
def test_bad_flags_raise_user_errors(argv: list[str], error: type, fragment: str) -> None:
    with pytest.raises(error, match=None) as raised:
        parse_args(Arguments, GenerationArguments, BenchmarkArguments, argv=argv)
    assert fragment in str(raised.value)


def test_help_names_groups_for_users_and_each_default_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_args(Arguments, GenerationArguments, BenchmarkArguments, argv=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "['group" not in text and "GenerationArguments" not in text
    for title in ("common options:", "generation options:", "benchmark options:"):
        assert title in text
    # a help text that states its default gets no second "(default: ...)"
    assert "(default: float32 on CPU) (default" not in text
    assert "(default: cuda when available) (default" not in text
    assert "--max_steps int Most tokens to generate. (default: 512)" in text


def test_num_threads_is_applied_before_any_run_and_checked() -> None:
    import torch

    from arguments import DEFAULT_NUM_THREADS, distributed_run

    (args,) = parse_args(Arguments, argv=["--num_threads", "3"])
    with distributed_run(args):
        assert torch.get_num_threads() == 3
    (args,) = parse_args(Arguments, argv=[])
    assert args.num_threads == DEFAULT_NUM_THREADS == 1  # see its help: measured under load
    with pytest.raises(ConfigError, match="--num_threads must be in"):
        parse_args(Arguments, argv=["--num_threads", "-1"])


def test_output_dir_expands_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (args,) = parse_args(Arguments, argv=["--output_dir", "~/runs"])
    assert args.output_dir == str(tmp_path / "runs")


def test_compile_auto_compiles_long_runs_only() -> None:
    """--compile auto (the default) turns the fast path on where a run's expected tokens
    reach the break-even, and says so; True and False are what they say."""
    (generation,) = parse_args(GenerationArguments, argv=[])
    assert generation.compile == "auto"
    assert not generation.config().compile  # tokens not known: eager
    assert not generation.config(expected_tokens=COMPILE_BREAK_EVEN_TOKENS - 1).compile
    assert generation.config(expected_tokens=COMPILE_BREAK_EVEN_TOKENS).compile
    assert all(config.compile for config in generation.configs(10**6))
    for argv, expected in (
        (["--compile", "True"], True),
        (["--compile"], True),  # a bare flag, as when it was a boolean
        (["--compile", "1"], True),
        (["--compile", "false"], False),
        (["--compile", "no"], False),
    ):
        (generation,) = parse_args(GenerationArguments, argv=argv)
        assert generation.config().compile is expected
        assert generation.config(expected_tokens=10**6).compile is expected
    assert GenerationArguments(compile=True).config().compile  # Python callers' booleans
    with pytest.raises(ConfigError, match="--compile must be True, False or auto, got 'maybe'"):
        parse_args(GenerationArguments, argv=["--compile", "maybe"])


def test_expected_tokens_are_the_largest_share_of_a_process() -> None:
    """Every process of a torchrun run decides --compile auto alike (47 samples on 2)."""
    assert expected_tokens(47, 512, 2) == expected_tokens(48, 512, 2) == 24 * 512
    assert expected_tokens(47, 512) == 47 * 512


def test_the_hub_client_logs_errors_only() -> None:
    """An unreachable hub id printed each retry's warning twice (25-46 lines over about a
    minute) before the scripts' one-line error."""
    import logging

    from huggingface_hub.utils import logging as hub_logging

    from arguments import setup_logging

    hub_logging.set_verbosity_warning()
    setup_logging()
    assert hub_logging.get_logger().getEffectiveLevel() == logging.ERROR
