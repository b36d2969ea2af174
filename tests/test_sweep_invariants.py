"""sweep.py resumed with a larger grid: only the new points are measured, each against a
baseline measured in the same run (not the earlier run's, measured under other load)."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import pandas as pd
from test_script_handoffs import tiny_sweep_argv


def test_a_resumed_sweeps_new_points_have_speedups_over_its_own_baseline(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    sweep = importlib.import_module("sweep")
    argv = tiny_sweep_argv(tiny_model_dir, prompts_file, tmp_path)
    assert sweep.main([*argv, "--exit_layer_last", "1"]) == 0
    csv_path = tmp_path / "sweep.csv"
    table = pd.read_csv(csv_path, dtype={"setting": str})
    # The earlier run's baseline, as a machine a million times faster measured it.
    table.loc[0, "overall_tokens_per_second"] *= 1e6
    with csv_path.open("w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(table.columns)
        for row in table.itertuples(index=False):
            writer.writerow(["" if pd.isna(value) else value for value in row])
    assert sweep.main([*argv, "--exit_layer_last", "2"]) == 0
    resumed = pd.read_csv(csv_path, dtype={"setting": str})
    assert list(zip(resumed["exit_layer"], resumed["num_speculations"])) == [
        (4, 0),
        (1, 1),
        (2, 1),
    ]  # the finished point is not measured again
    assert resumed["speedup"].iloc[1] == table["speedup"].iloc[1]
    assert 0.01 < resumed["speedup"].iloc[2] < 100  # over a baseline measured now
