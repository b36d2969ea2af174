"""sweep.py's best point in a resumed sweep: rows measured in different runs (each against
its own autoregressive baseline, under its own load) are ranked by their speedups, which
are comparable, not by raw tokens/s, which are not."""

from __future__ import annotations

import csv
import importlib
import json
import logging
from pathlib import Path

import pandas as pd


def test_resumed_sweep_picks_the_best_speedup_not_the_best_raw_rate(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    sweep = importlib.import_module("sweep")
    argv = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path",
        str(prompts_file), "--num_samples", "1", "--max_steps", "4", "--sample", "False",
        "--exit_layer_first", "1", "--exit_layer_last", "2", "--num_speculations_first", "1",
        "--num_speculations_last", "1", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    csv_path = tmp_path / "sweep.csv"
    table = pd.read_csv(csv_path, dtype={"setting": str})
    assert list(zip(table["exit_layer"], table["num_speculations"])) == [(4, 0), (1, 1), (2, 1)]
    # As a resumed sweep leaves it: (1, 1) was measured in a first run on a busy machine
    # (baseline 20 tok/s, 30 tok/s: 1.5x), (2, 1) in a second, quiet one (baseline 60
    # tok/s, 66 tok/s: 1.1x). Exit 1 is the faster setting; its raw rate is the lower.
    table.loc[1, ["overall_tokens_per_second", "speedup"]] = [30.0, 1.5]
    table.loc[2, ["overall_tokens_per_second", "speedup"]] = [66.0, 1.1]
    with csv_path.open("w", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(table.columns)
        for row in table.itertuples(index=False):
            writer.writerow(["" if pd.isna(value) else value for value in row])
    assert sweep.main(argv) == 0  # every point done: nothing measured, the summary rewritten
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert (summary["best"]["exit_layer"], summary["best"]["speedup"]) == (1, 1.5)
    assert summary["best_by_strategy"]["self_speculative"]["exit_layer"] == 1


def test_best_row_falls_back_to_tokens_per_second_without_speedups() -> None:
    sweep = importlib.import_module("sweep")
    table = pd.DataFrame(
        {"overall_tokens_per_second": [10.0, 30.0, 20.0], "speedup": [None, None, None]}
    )
    assert sweep._best_row(table).name == 1
    table["speedup"] = [2.0, 1.0, 1.5]
    assert sweep._best_row(table).name == 0


def test_a_point_that_drafted_nothing_logs_acceptance_as_not_available(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, caplog
) -> None:
    """max_steps 1 ends every answer before its first drafting step: no acceptance to
    report, which the log said as "acceptance 0.000" (nothing accepted)."""
    sweep = importlib.import_module("sweep")
    caplog.set_level(logging.INFO, logger="sweep")
    argv = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path",
        str(prompts_file), "--num_samples", "1", "--max_steps", "1", "--sample", "False",
        "--exit_layer_first", "1", "--exit_layer_last", "1", "--num_speculations_first", "2",
        "--num_speculations_last", "2", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("self_speculative, exit_layer 1")
    ]
    assert len(lines) == 1 and "acceptance n/a" in lines[0], lines


def test_rows_carry_the_overall_acceptance_and_an_earlier_csv_takes_the_new_column(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """overall_acceptance_rate (accepted / drafted over all samples) is a column; a CSV
    written before it (the earlier header) is read, resumed and rewritten with it."""
    sweep = importlib.import_module("sweep")
    argv = [
        "--model", str(tiny_model_dir), "--dataset", "custom_jsonl", "--data_path",
        str(prompts_file), "--num_samples", "2", "--max_steps", "6", "--sample", "False",
        "--exit_layer_first", "1", "--exit_layer_last", "1", "--num_speculations_first", "2",
        "--num_speculations_last", "2", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    assert sweep.main(argv) == 0
    csv_path = tmp_path / "sweep.csv"
    table = pd.read_csv(csv_path, dtype={"setting": str})
    assert list(table.columns) == sweep.COLUMNS
    baseline, point = table.iloc[0], table.iloc[1]
    assert pd.isna(baseline["overall_acceptance_rate"])  # drafted nothing
    assert 0 <= point["overall_acceptance_rate"] <= 1
    # The same file as an earlier version wrote it: without the column (nor the later
    # baseline_tokens_per_second).
    table.drop(columns=["overall_acceptance_rate", "baseline_tokens_per_second"]).to_csv(
        csv_path, index=False
    )
    earlier, _ = sweep.read_sweep_csv(csv_path)
    assert earlier["overall_acceptance_rate"].isna().all() and len(earlier) == 2
    assert sweep.main([*argv, "--num_speculations_last", "3"]) == 0  # resumed: one point more
    resumed = pd.read_csv(csv_path, dtype={"setting": str})
    assert list(resumed.columns) == sweep.COLUMNS
    assert list(zip(resumed["exit_layer"], resumed["num_speculations"])) == [
        (4, 0), (1, 2), (1, 3),
    ]  # fmt: skip
    assert (
        resumed["overall_tokens_per_second"].iloc[1] == table["overall_tokens_per_second"].iloc[1]
    )
    assert 0 <= resumed["overall_acceptance_rate"].iloc[2] <= 1
