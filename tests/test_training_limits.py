"""Recipe settings that train a model whose inference differs from what was trained: a
dropout rate of 1 (a layer never trains, yet runs at inference) and training sequences
longer than a continued model's context (positions decoding never reaches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model, save_tiny_model, write_python_corpus

import train
from self_speculation.errors import ConfigError
from self_speculation.training.config import LayerSkipArguments

ONE_STEP = ["--batch_size", "1", "--max_tokens", "32", "--bf16", "False", "--num_threads", "1"]


@pytest.mark.parametrize("shape", ["exponential", "uniform", "step"])
def test_a_dropout_rate_of_one_is_refused(shape: str) -> None:
    """At p_max 1 every shape's last layer (every layer, for uniform) is skipped by every
    sample: it gets no gradient, weight decay only shrinks it, and the exported model
    runs it untrained."""
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        LayerSkipArguments(layer_dropout_p_max=1.0, layer_dropout_shape=shape)
    LayerSkipArguments(layer_dropout_p_max=0.99, layer_dropout_shape=shape)  # still allowed


def test_a_dropout_rate_of_one_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    arguments = ["--preset", "tiny", "--data", "x", "--max_tokens", "9"]
    status = train.main([*arguments, "--layer_dropout_p_max", "1", "--output_dir", str(tmp_path)])
    assert status == 2
    # The last line (a logging handler an earlier in-process test left on a closed stream
    # may print its own complaint above it).
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("train.py: error: --layer_dropout_p_max must be in [0, 1)")


def test_at_a_rate_of_one_the_last_layer_gets_no_gradient() -> None:
    """The rate the refusal protects: at p_max 1 the last layer's weights see no gradient."""
    from self_speculation.training.layer_dropout import apply_layer_dropout

    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32).train()
    dropout = apply_layer_dropout(model, p_max=1.0)
    input_ids = torch.randint(3, 300, (4, 8))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    last = model.model.layers[-1].mlp.down_proj.weight.grad
    assert last is not None and not last.any()  # touched (zero) but never trained
    dropout.remove()


def test_a_sequence_longer_than_a_continued_models_context_is_refused(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """train_adapter.py refuses it; train.py trained positions 32..63 of a 32-token model
    without a word, whose generate.py then stops at 32 tokens."""
    corpus = write_python_corpus(tmp_path / "corpus")
    base = save_tiny_model(tmp_path / "base", max_position_embeddings=32)
    common = ["--model", str(base), "--data", f"{corpus}/*.py", *ONE_STEP]
    capsys.readouterr()  # save_pretrained's progress bar
    status = train.main([*common, "--seq_len", "64", "--output_dir", str(tmp_path / "long")])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # as above
    assert error.startswith(
        "train.py: error: --seq_len 64 is longer than the model's context (32 tokens"
    ), error
    assert not (tmp_path / "long" / "checkpoint").exists()
    # The model's own context is fine.
    status = train.main([*common, "--seq_len", "32", "--output_dir", str(tmp_path / "fits")])
    assert status == 0, capsys.readouterr().err[-2000:]
    assert (tmp_path / "fits" / "model.safetensors").is_file()


def _interrupt(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A Ctrl-C that reaches train.py's main as KeyboardInterrupt inside ``loop.<name>`` (a
    second Ctrl-C during a step or checkpoint, or one during the data or the export)."""
    from self_speculation.training import loop

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, name, interrupted)


def test_a_ctrl_c_after_a_checkpoint_says_what_resumes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """Interrupted while the finished run exported its model: the checkpoint is there and
    --resume True exports it; the line said "interrupted before training started"."""
    corpus = write_python_corpus(tmp_path / "corpus")
    common = ["--preset", "tiny", "--vocab_size", "300", "--seq_len", "32", *ONE_STEP]
    common += ["--data", f"{corpus}/*.py", "--output_dir", str(tmp_path / "run")]
    with monkeypatch.context() as patched:
        _interrupt(patched, "export_pretrained")
        assert train.main(common) == 130
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"train.py: interrupted: the last checkpoint in {tmp_path / 'run'} is kept (steps after "
        "it are lost); continue with --resume True"
    )
    assert train.main([*common, "--resume", "True"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_ctrl_c_before_any_checkpoint_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    _interrupt(monkeypatch, "load_texts")
    arguments = ["--preset", "tiny", "--data", "x", "--max_tokens", "9"]
    assert train.main([*arguments, "--output_dir", str(tmp_path / "run")]) == 130
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == "train.py: interrupted before the first checkpoint: nothing to resume"


def test_a_budget_below_one_step_and_a_warmup_past_the_run_are_said(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """--max_tokens 9 trained a whole step of 32 tokens, and the default --warmup_steps 100
    of a one-step run reached 1/100 of --learning_rate, both without a word."""
    corpus = write_python_corpus(tmp_path / "corpus")
    common = ["--preset", "tiny", "--vocab_size", "300", "--seq_len", "32", *ONE_STEP]
    common += ["--data", f"{corpus}/*.py", "--learning_rate", "0.001"]
    arguments = [*common, "--max_tokens", "9", "--output_dir", str(tmp_path / "short")]
    assert train.main(arguments) == 0
    error = caplog.text
    assert "--max_tokens 9 is less than one optimizer step (32 tokens): training one step" in error
    assert (
        "--warmup_steps 100 is longer than the run (1 steps): the learning rate peaks at 1e-05, "
        "not --learning_rate 0.001" in error
    )
    # A warmup the run completes, and a budget of whole steps: nothing said.
    arguments = [*common, "--warmup_steps", "2", "--max_tokens", "64"]
    caplog.clear()
    assert train.main([*arguments, "--output_dir", str(tmp_path / "fits")]) == 0
    error = caplog.text
    assert "--max_tokens" not in error and "--warmup_steps" not in error
