"""docs/scripts.md: layer_report.py's draft exit (--draft_adapter, or --exit_layer E
--draft_vocab_size N --draft_vocab_corpus GLOB...) is "checked before the per-layer table is
computed". An exit layer out of range was refused only after the whole per-layer table (every
exit over every block: minutes on a large model) had been computed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from arguments import EXIT_ERROR, run_main


def test_draft_exit_layer_out_of_range_is_refused_before_the_table(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    module = importlib.import_module("layer_report")
    computed = []

    def no_table(*args, **kwargs):
        computed.append(True)
        raise AssertionError("the per-layer table was computed before the exit was checked")

    monkeypatch.setattr(module, "exit_quality", no_table)
    data = tmp_path / "a.py"
    data.write_text("def add(a, b):\n    return a + b\n" * 50)
    out = tmp_path / "out"
    argv = [*("--model", tiny_model_dir, "--data", data, "--output_dir", out)]
    argv += ["--max_tokens", "64", "--exit_layer", "99", "--draft_vocab_size", "8"]
    argv += ["--draft_vocab_corpus", str(data)]
    monkeypatch.setattr(sys, "argv", ["layer_report.py", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, prog="layer_report.py")
    stderr = capsys.readouterr().err
    assert exit_info.value.code == EXIT_ERROR and "Traceback" not in stderr
    assert "--exit_layer must be in [1," in stderr.strip().splitlines()[-1]
    assert not computed
