"""The remembered Ctrl-C (errors.remembered_interrupt): run_main must install the handler
(nothing tested that it does: the other tests call the handler by hand), and the lm-eval
adapter's log-likelihood loops must raise one that a finalizer swallowed."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

import arguments
from self_speculation import GenerationConfig, Generator, errors, load_model_and_tokenizer
from self_speculation.eval_harness import LayerSkipLM


@dataclass
class Request:  # what lm-eval's Instance offers the model
    args: tuple


@pytest.fixture()
def restored_sigint():
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        errors._interrupted.clear()


def test_run_main_remembers_a_ctrl_c_that_is_swallowed(
    restored_sigint, monkeypatch, capsys
) -> None:
    """A real SIGINT whose KeyboardInterrupt something swallows (a finalizer) still ends the
    script as interrupted: run_main's handler remembers it."""

    def main(argv: list[str]) -> int:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # as Python does while a finalizer runs
        return 0

    monkeypatch.setattr(arguments.sys, "argv", ["x.py"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(SystemExit) as exited:
        arguments.run_main(main, "x.py")
    assert exited.value.code == 130
    assert "x.py: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["loglikelihood", "loglikelihood_rolling"])
def test_log_likelihoods_raise_a_swallowed_interrupt(
    restored_sigint, tiny_model_dir: Path, method: str
) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "float32", "cpu")
    generator = Generator(model, tokenizer)
    lm = LayerSkipLM(generator, generator.resolve(GenerationConfig(sample=False)), progress=False)
    request = Request(("The quick brown", " fox") if method == "loglikelihood" else ("a b c",))
    assert getattr(lm, method)([request])  # no interrupt: answered
    errors._interrupted.set()  # a SIGINT whose KeyboardInterrupt a finalizer swallowed
    with pytest.raises(KeyboardInterrupt):
        getattr(lm, method)([request])
