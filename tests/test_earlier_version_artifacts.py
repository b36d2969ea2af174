"""What earlier versions of the scripts left behind, read by this one."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pandas as pd


def test_a_sweep_an_earlier_version_ran_without_a_baseline_is_measured_again_with_one(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """Before --baseline False was keyed apart, its rows (no autoregressive row, no speedup)
    had the default run's key: a default rerun reused them, so their points had no speedup
    and the summary ranked only the points it added (a faster earlier point never won)."""
    sweep = importlib.import_module("sweep")
    argv = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path",
        str(prompts_file), "--num_samples", "1", "--max_steps", "4", "--sample", "False",
        "--exit_layer_first", "1", "--exit_layer_last", "1", "--num_speculations_first", "1",
        "--num_speculations_last", "1", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    csv_path = tmp_path / "sweep.csv"
    table = pd.read_csv(csv_path, dtype={"setting": str})
    # The same point as an earlier version's --baseline False run wrote it, under this key:
    # no autoregressive row, no speedup, and a rate no later point can reach.
    earlier = table[table["generation_strategy"] != "autoregressive"].copy()
    earlier["speedup"] = None
    earlier["overall_tokens_per_second"] = 1e9
    earlier.drop(columns=["overall_acceptance_rate", "baseline_tokens_per_second"]).to_csv(
        csv_path, index=False
    )

    assert sweep.main([*argv, "--exit_layer_last", "2"]) == 0
    resumed = pd.read_csv(csv_path, dtype={"setting": str})
    points = resumed[resumed["generation_strategy"] == "self_speculative"]
    assert sorted(zip(points["exit_layer"], points["speedup"].notna())) == [
        (1, False), (1, True), (2, True),
    ], resumed  # fmt: skip
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert all(row["speedup"] is not None for row in summary["grid"]), summary["grid"]
    assert summary["best"]["speedup"] is not None
    assert summary["best"]["overall_tokens_per_second"] < 1e9


def test_an_adapter_checkpoint_an_earlier_version_trained_in_another_dtype_is_named(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Checkpoints written before the dtype was recorded continued in any --dtype without a
    word (an adapter trained in bfloat16 went on in float32, its record saying float32);
    the adapter's saved weights say which dtype it was trained in."""
    import shutil

    import pytest
    import torch

    from self_speculation import ConfigError
    from train_adapter import CHECKPOINT_NAME, AdapterTrainArguments, train_adapter

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    arguments = dict(
        model=str(model), exit_layer=2, data=[str(corpus)], seq_len=32, max_target_tokens=512,
        held_out_blocks=2, batch_size=4, epochs=1, num_threads=1,
        output_dir=str(tmp_path / "adapter"),
    )  # fmt: skip
    train_adapter(
        AdapterTrainArguments(
            dtype="bfloat16", cache_dir=str(tmp_path / "bfloat16_targets"), **arguments
        )
    )
    # The checkpoint as an earlier version wrote it: no dtype, no weights fingerprint.
    path = tmp_path / "adapter" / CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    for name in ("dtype", "model_weights"):
        del state["settings"][name]
    torch.save(state, path)
    with pytest.raises(ConfigError, match="continues a run with --dtype bfloat16, not float32"):
        train_adapter(
            AdapterTrainArguments(cache_dir=str(tmp_path / "float32_targets"), **arguments)
        )
    # In its own dtype it continues.
    record = train_adapter(
        AdapterTrainArguments(
            dtype="bfloat16", cache_dir=str(tmp_path / "bfloat16_targets"), **arguments
        )
    )
    assert record["steps"] == record["total_steps"]
