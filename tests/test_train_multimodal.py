"""train.py on a Gemma 3 multimodal checkpoint (Gemma3ForConditionalGeneration, whose
config keeps num_hidden_layers in its text_config): the engine decodes its text decoder,
so training it must run too, not fail with an AttributeError traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
