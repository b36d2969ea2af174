"""Stored results are keyed by the dtype and device kind the model runs in, also when
--dtype and --device are left at their defaults: those mean float32 on a CPU machine and
bfloat16 on a GPU one, and a sweep's rows or eval.py's request cache written by one must
not answer the other (both hashed the flags as given, None on each machine). The keys of
default CPU runs stay what they were."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import arguments
import sweep
from arguments import Arguments, BenchmarkArguments, GenerationArguments


def _keys(tiny_model_dir: Path, tmp_path: Path, **flags: str) -> tuple[str, str]:
    eval_script = importlib.import_module("eval")
    args = Arguments(model=str(tiny_model_dir), **flags)
    generation = eval_script.EvalGenerationArguments()
    evaluation = eval_script.EvalArguments(tasks=["layerskip_mc"], use_cache=str(tmp_path))
    cache = eval_script._cache_path(evaluation, args, generation, generation.config(), None)
    rows = sweep._setting_key(args, GenerationArguments(), BenchmarkArguments(), False, 1)
    return cache, rows


def test_default_flags_on_a_gpu_machine_key_apart_from_a_cpu_machine(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = _keys(tiny_model_dir, tmp_path)
    assert Arguments().placement_key() == {}  # the default CPU run's keys are unchanged
    monkeypatch.setattr(arguments, "default_device", lambda: "cuda")
    assert Arguments().placement_key() == {"placement": "bfloat16 cuda"}
    gpu = _keys(tiny_model_dir, tmp_path)
    assert gpu[0] != cpu[0] and gpu[1] != cpu[1]
    # On the GPU machine, float32 asked for keys apart from its default bfloat16 too.
    assert _keys(tiny_model_dir, tmp_path, dtype="float32") != gpu
