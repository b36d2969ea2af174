"""train.py on a Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration, whose
config keeps num_hidden_layers in its text_config): the engine decodes its text decoder,
so training it must run too, not fail with an AttributeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, write_python_corpus

ROOT = Path(__file__).resolve().parent.parent


def test_train_continues_a_gemma3_multimodal_model(tmp_path: Path) -> None:
    save_tiny_model(tmp_path / "base", "gemma3_multimodal")
    corpus = write_python_corpus(tmp_path / "corpus")
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "--model", str(tmp_path / "base"),
            "--data", f"{corpus}/*.py", "--seq_len", "32", "--batch_size", "4",
            "--max_tokens", "256", "--bf16", "False", "--warmup_steps", "1",
            "--num_threads", "1", "--save_every_minutes", "0",
            "--output_dir", str(tmp_path / "run"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("family", "loaded_as"),
    [
        ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
        ("gemma3_multimodal", "Gemma3ForConditionalGeneration"),
    ],
)
def test_train_continues_and_resumes_a_multimodal_model(
    family: str, loaded_as: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Qwen2.5-VL loads by AutoModelForImageTextToText: the resume rebuilt it with
    AutoModelForCausalLM ("Unrecognized configuration class"), and so did the export. Both
    resumes failed on the optimizer state of the vision tower, which text gives no
    gradient ("checkpoint ... is damaged"): it is frozen now, and exported as it was."""
    import train
    from self_speculation import load_model_and_tokenizer

    save_tiny_model(tmp_path / "base", family)
    corpus = write_python_corpus(tmp_path / "corpus")
    arguments = ["--model", str(tmp_path / "base"), "--data", f"{corpus}/*.py"]
    arguments += ["--seq_len", "32", "--batch_size", "2", "--max_tokens", "192", "--bf16", "False"]
    arguments += [
        "--warmup_steps",
        "1",
        "--num_threads",
        "1",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert train.main([*arguments, "--stop_after_steps", "1"]) == 0
    assert train.main([*arguments, "--resume", "True"]) == 0
    assert "resumed at step 1" in caplog.text
    model, _ = load_model_and_tokenizer(str(tmp_path / "run"))
    base, _ = load_model_and_tokenizer(str(tmp_path / "base"))
    assert type(model).__name__ == loaded_as
    vision = [name for name, _ in base.named_parameters() if "vision" in name or "visual" in name]
    assert vision
    for name in vision:  # bf16 export of fp32 weights: equal to bf16 rounding
        torch.testing.assert_close(
            model.get_parameter(name).float(),
            base.get_parameter(name).to(torch.bfloat16).float(),
        )
