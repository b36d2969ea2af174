"""A Ctrl-C that Python swallows: a KeyboardInterrupt raised while a finalizer runs
(``Exception ignored in ... __del__``, seen once in CI from the ``regex`` package) was lost,
and an interrupted benchmark ran to its end and exited 0. The scripts' SIGINT handler
remembers it; the next generation (or the end of the script) raises it again."""

from __future__ import annotations

import gc
import signal

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

import arguments
from self_speculation import GenerationConfig, Generator, errors

# The finalizer's ignored exception is what is being simulated, not a fault of the test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class InterruptedWhileFinalized:
    def __del__(self) -> None:
        errors.remembered_interrupt(signal.SIGINT, None)  # as if SIGINT arrived here


@pytest.fixture()
def swallowed_interrupt():
    try:
        InterruptedWhileFinalized()  # dropped at once: its KeyboardInterrupt is ignored
        gc.collect()
        yield
    finally:
        errors._interrupted.clear()


def test_the_next_generation_raises_a_swallowed_interrupt(swallowed_interrupt) -> None:
    generator = Generator(make_tiny_model("llama_mha_untied", dtype=torch.float32), IdTokenizer())
    with pytest.raises(KeyboardInterrupt):
        generator.generate([5, 7, 9], GenerationConfig(sample=False, max_steps=2))


def test_a_script_that_ends_after_a_swallowed_interrupt_exits_as_interrupted(
    swallowed_interrupt, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(arguments.sys, "argv", ["x.py"])
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exited:
            arguments.run_main(lambda argv: 0, "x.py")
    finally:
        signal.signal(signal.SIGINT, handler)
    assert exited.value.code == 130
    assert "x.py: interrupted" in capsys.readouterr().err


def test_without_an_interrupt_nothing_is_raised() -> None:
    errors.check_interrupted()
    generator = Generator(make_tiny_model("llama_mha_untied", dtype=torch.float32), IdTokenizer())
    assert generator.generate([5, 7, 9], GenerationConfig(sample=False, max_steps=2)).token_ids
