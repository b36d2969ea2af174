"""eval.py --gen_kwargs values that generation cannot take were refused at the first
generation request: after the model loaded and every log-likelihood task before it ran (a
long evaluation's work, lost). They are refused before any task runs now."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from arguments import run_main
from self_speculation.eval_harness import LayerSkipLM


@pytest.mark.parametrize(
    ("gen_kwargs", "line"),
    [
        ("do_sample=maybe", "generation kwarg do_sample='maybe' is not true or false"),
        ("max_gen_toks=0", "generation kwarg max_gen_toks must be >= 1, got 0"),
        ("top_k=5.5", "generation kwarg top_k=5.5 is not an integer"),
    ],
)
def test_bad_gen_kwargs_are_refused_before_any_task_runs(
    gen_kwargs: str,
    line: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import eval as eval_script

    scored = []
    original = LayerSkipLM.loglikelihood

    def recorded(self, requests, *args, **kwargs):
        scored.append(len(requests))
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(LayerSkipLM, "loglikelihood", recorded)
    argv = ["--model", str(tiny_model_dir), "--tasks", "layerskip_mc", "layerskip_humaneval"]
    argv += ["--limit", "2", "--gen_kwargs", gen_kwargs, "--execute_code", "True"]
    argv += ["--output_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        run_main(eval_script.main, prog="eval.py")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"eval.py: error: {line}"
    assert scored == []  # layerskip_mc's questions were never scored
