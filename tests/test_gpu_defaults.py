"""GPU defaults stated by --help must be the ones a script applies."""

from __future__ import annotations

import pytest


def _flag_help(text: str, flag: str, next_flag: str) -> str:
    """The help of ``flag`` in the options list (not the usage line)."""
    return " ".join(text.split(f"\n  {flag} [str]", 1)[1].split(f"\n  {next_flag}", 1)[0].split())


def test_correctness_help_states_its_float32_default_on_a_gpu(capsys) -> None:
    """correctness.py runs float32 when --dtype is not given, on a GPU too (it sets it
    before loading; docs/scripts.md says so), so its --help must not promise the other
    scripts' bfloat16 GPU default."""
    import correctness

    with pytest.raises(SystemExit) as exited:
        correctness.main(["--help"])
    assert exited.value.code == 0
    dtype_help = _flag_help(capsys.readouterr().out, "--dtype", "--device")
    assert "bfloat16 on a GPU" not in dtype_help
    assert "default: float32, on a GPU too" in dtype_help


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_the_default_dtype_is_float32_on_every_spelling_of_the_cpu(
    device: str, tiny_model_dir
) -> None:
    """--dtype left out means float32 on CPU and bfloat16 on a GPU (--help); ``--device
    cpu:0`` is the CPU too (check_device accepts it), so it must not get the GPU's bfloat16."""
    import torch

    from self_speculation import load_model_and_tokenizer
    from self_speculation.loading import resolve_dtype

    assert resolve_dtype(None, device) == torch.float32
    model, _ = load_model_and_tokenizer(str(tiny_model_dir), None, device)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
