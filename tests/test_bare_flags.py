"""A flag given without its value. simple-parsing lets a flag whose field is optional
(``int | None``) go bare, and the bare flag then stands for "not given": ``generate.py
--prompt $EMPTY`` (an unquoted empty variable) read standard input instead of refusing,
``--dtype`` alone ran in the default dtype, ``--no_repeat_ngram_size`` alone used the
checkpoint's setting. Such flags now take a value; yes/no flags alone mean yes."""

from __future__ import annotations

import importlib

import pytest

from self_speculation.cli import FlagParser
from self_speculation.errors import ArgumentsError

SCRIPTS = {
    "generate": ("Arguments", "GenerationArguments", "GenerateArguments"),
    "benchmark": ("Arguments", "GenerationArguments", "BenchmarkArguments", "MetricArguments"),
    "correctness": (
        "CorrectnessArguments", "CorrectnessGenerationArguments", "BenchmarkArguments",
    ),
    "eval": ("Arguments", "EvalGenerationArguments", "EvalArguments"),
    "sweep": ("Arguments", "GenerationArguments", "BenchmarkArguments", "SweepArguments"),
    "train_adapter": ("AdapterTrainArguments",),
    "layer_report": ("ReportConfig",),
}  # fmt: skip


def _parser(script: str) -> FlagParser:
    module = importlib.import_module(script)
    arguments = importlib.import_module("arguments")
    parser = FlagParser(prog=script)
    for position, name in enumerate(SCRIPTS[script]):
        cls = getattr(module, name, None) or getattr(arguments, name)
        parser.add_arguments(cls, dest=f"group{position}")
    parser._preprocessing()
    return parser


def _train_parser() -> FlagParser:
    from self_speculation.training import config

    parser = FlagParser(prog="train.py")
    for name in ("ModelArguments", "DataArguments", "LayerSkipArguments", "TrainingArguments"):
        parser.add_arguments(getattr(config, name), dest=name)
    parser._preprocessing()
    return parser


@pytest.mark.parametrize("script", [*SCRIPTS, "train"])
def test_no_flag_stands_for_not_given_when_bare(script: str) -> None:
    parser = _train_parser() if script == "train" else _parser(script)
    bare = [
        action.option_strings[0]
        for action in parser._actions
        if action.nargs == "?" and action.const is None and type(action).__name__ == "_StoreAction"
    ]
    assert bare == []


@pytest.mark.parametrize(
    "argv",
    [["--prompt"], ["--prompt", "x", "--no_repeat_ngram_size"], ["--prompt", "x", "--dtype"]],
    ids=" ".join,
)
def test_a_bare_value_flag_is_refused_in_one_line(argv: list[str]) -> None:
    generate = importlib.import_module("generate")
    with pytest.raises(ArgumentsError, match=f"argument {argv[-1]}: expected one argument"):
        generate.main(argv)


def test_a_bare_yes_no_flag_means_yes() -> None:
    arguments = importlib.import_module("arguments")
    (args,) = arguments.parse_args(arguments.Arguments, argv=["--distributed"])
    assert args.distributed is True
    (generation,) = arguments.parse_args(arguments.GenerationArguments, argv=["--compile"])
    assert generation.compile == "true"
