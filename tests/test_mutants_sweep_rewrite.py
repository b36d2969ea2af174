"""A sweep CSV an earlier version wrote (without overall_acceptance_rate) is rewritten with
the new header when a sweep resumes it: every setting's rows, not only the resumed one's
(the shipped test has a single setting, so dropping the others went unnoticed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pandas as pd


def test_rewriting_an_earlier_csv_keeps_every_settings_rows(tmp_path: Path) -> None:
    sweep = importlib.import_module("sweep")
    csv_path = tmp_path / "sweep.csv"
    rows = [
        "autoregressive,4,0,,1.0,0.1,10.0,10.0,1.0,1.0,2,first",
        "self_speculative,1,2,0.5,0.8,0.08,12.5,12.5,1.5,1.25,2,first",
        "autoregressive,4,0,,2.0,0.2,5.0,5.0,1.0,1.0,2,second",
    ]
    csv_path.write_text("\n".join([",".join(sweep.EARLIER_COLUMNS), *rows]) + "\n")
    resumed = sweep._finished(csv_path, "second", repair=True)
    assert list(resumed["setting"]) == ["second"]
    rewritten = pd.read_csv(csv_path, dtype={"setting": str})
    assert list(rewritten.columns) == sweep.COLUMNS
    assert list(rewritten["setting"]) == ["first", "first", "second"]
    assert list(rewritten["tokens_per_second"]) == [10.0, 12.5, 5.0]
    assert rewritten["overall_acceptance_rate"].isna().all()
