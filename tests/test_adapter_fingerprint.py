"""train_adapter.py's weights fingerprint (the target cache's and the adapter checkpoint's):
a run with another --dtype, and a cache an earlier version wrote, were refused as "other
weights of the model (retrained or replaced since?)" though the model was the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from self_speculation import ConfigError
from self_speculation.adapter_training import MANIFEST_NAME, TargetSettings, compute_targets
from self_speculation.model_surgery import LayerwiseModel


def _arguments(tiny_model_dir: Path, tmp_path: Path) -> dict:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return dict(
        model=str(model), exit_layer=2, data=[str(corpus)], seq_len=32, max_target_tokens=512,
        held_out_blocks=2, batch_size=4, epochs=1, num_threads=1,
        cache_dir=str(tmp_path / "targets"),
    )  # fmt: skip


def test_another_dtype_is_named_not_taken_for_a_retrained_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from train_adapter import AdapterTrainArguments, train_adapter

    arguments = _arguments(tiny_model_dir, tmp_path)
    train_adapter(AdapterTrainArguments(output_dir=str(tmp_path / "first"), **arguments))
    with pytest.raises(ConfigError, match="targets computed with --dtype float32, not bfloat16"):
        train_adapter(
            AdapterTrainArguments(
                output_dir=str(tmp_path / "second"), dtype="bfloat16", **arguments
            )
        )
    arguments["cache_dir"] = str(tmp_path / "bfloat16_targets")
    with pytest.raises(ConfigError, match="continues a run with --dtype float32, not bfloat16"):
        train_adapter(
            AdapterTrainArguments(output_dir=str(tmp_path / "first"), dtype="bfloat16", **arguments)
        )


def test_a_cache_written_before_the_weights_were_recorded_is_taken_as_unchanged(
    tmp_path: Path,
) -> None:
    """As a checkpoint's settings are: what an earlier version did not record is unchanged."""
    layerwise = LayerwiseModel(make_tiny_model("llama_mha_untied", dtype=torch.float32))
    blocks = torch.randint(0, 300, (2, 8))
    settings = TargetSettings("m", [2], 8, 4, 2, "f", model_weights="12.5")
    assert compute_targets(layerwise, blocks, settings, tmp_path) == 2
    manifest = tmp_path / MANIFEST_NAME
    earlier = json.loads(manifest.read_text())
    del earlier["model_weights"]
    earlier.pop("dtype", None)
    manifest.write_text(json.dumps(earlier))
    assert compute_targets(layerwise, blocks, settings, tmp_path) == 2


def test_self_generated_chat_answers_are_the_models_own(
    tmp_path: Path, caplog, monkeypatch
) -> None:
    """train_adapter.py --chat_prompts N keeps the model's greedy answers in the target cache,
    named by N and --chat_max_steps only: a cache folder shared with another model (or the
    model retrained) handed the first model's answers to the second as its own text, and a
    damaged answers file was a JSONDecodeError traceback. The name now carries the weights
    fingerprint and dtype; a damaged file is generated again."""
    from types import SimpleNamespace

    import train_adapter

    calls = []

    class Stub:
        tokenizer = None

        def generate_batch(self, opened, config):
            calls.append(len(opened))
            return [SimpleNamespace(text=f"answer {len(calls)}") for _ in opened]

    args = SimpleNamespace(targets_dir=tmp_path, chat_max_steps=8, dtype="float32")
    monkeypatch.setattr(train_adapter, "user_turn", lambda tokenizer, prompt, tokenize: [1, 2])
    first = train_adapter._chat_responses(args, Stub(), ["a", "b"], "12.5")
    assert train_adapter._chat_responses(args, Stub(), ["a", "b"], "12.5") == first
    assert len(calls) == 1  # read back, not generated again
    other = train_adapter._chat_responses(args, Stub(), ["a", "b"], "99.25")
    assert len(calls) == 2 and other != first  # another model's answers are its own
    args.dtype = "bfloat16"
    train_adapter._chat_responses(args, Stub(), ["a", "b"], "12.5")
    assert len(calls) == 3
    for saved in tmp_path.glob("chat_*.json"):
        saved.write_text('["cut sh')
    with caplog.at_level("WARNING", logger="train_adapter"):
        assert train_adapter._chat_responses(args, Stub(), ["a", "b"], "12.5")
    assert len(calls) == 4 and "is damaged" in caplog.text
