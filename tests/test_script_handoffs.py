"""Handoffs between runs and scripts: what one run leaves behind, used by the next."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pandas as pd


def tiny_sweep_argv(model: Path, prompts_file: Path, output_dir: Path) -> list[str]:
    """A one-sample sweep of the tiny model over k = 1 (give --exit_layer_last)."""
    return [
        "--model", str(model), "--dataset", "custom_jsonl", "--data_path",
        str(prompts_file), "--num_samples", "1", "--max_steps", "4", "--sample", "False",
        "--exit_layer_first", "1", "--num_speculations_first", "1",
        "--num_speculations_last", "1", "--output_dir", str(output_dir),
    ]  # fmt: skip


def test_sweep_resumed_with_baseline_off_does_not_rank_against_earlier_speedups(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """A sweep continued with --baseline False measured its new points without a speedup,
    and the summary then ranked only the earlier run's points (those with one): the new
    points could never be the best. A changed --baseline is another setting."""
    sweep = importlib.import_module("sweep")
    argv = tiny_sweep_argv(tiny_model_dir, prompts_file, tmp_path)
    assert sweep.main([*argv, "--exit_layer_last", "1"]) == 0
    assert sweep.main([*argv, "--exit_layer_last", "2", "--baseline", "False"]) == 0
    summary = json.loads((tmp_path / "sweep.json").read_text())
    grid = pd.DataFrame(summary["grid"])
    assert sorted(grid["exit_layer"]) == [1, 2]
    # One run's rows: all without a speedup, ranked by tokens/s.
    assert grid["speedup"].isna().all(), summary["grid"]
    best = grid.loc[grid["overall_tokens_per_second"].idxmax()]
    assert summary["best"]["exit_layer"] == best["exit_layer"]


def test_train_resume_takes_the_same_model_and_data_spelled_otherwise(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A resume compared --model and --data as strings: the same model folder given with a
    trailing slash, through a symlink or from another working directory, or the same glob
    made absolute, was refused as another model or other data."""
    from tiny_models import write_python_corpus

    train = importlib.import_module("train")
    write_python_corpus(tmp_path / "corpus")
    (tmp_path / "link").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    flags = ["--seq_len", "32", "--batch_size", "4", "--warmup_steps", "2", "--num_threads", "1"]
    flags += ["--save_every_minutes", "0", "--bf16", "False", "--max_tokens", str(4 * 4 * 32)]
    assert train.main([*flags, "--model", "link", "--data", "corpus/*.py",
                       "--output_dir", "run", "--stop_after_steps", "2"]) == 0  # fmt: skip
    assert train.main([*flags, "--model", f"{tiny_model_dir}/",
                       "--data", str(tmp_path / "corpus" / "*.py"),
                       "--output_dir", f"{tmp_path / 'run'}/", "--resume", "True"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 4


def test_sweep_rerun_with_the_model_and_data_spelled_otherwise_skips_finished_points(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path, monkeypatch
) -> None:
    """The setting key hashed --model and --data_path as written: the same folder with a
    trailing slash, through a symlink or relative to another directory measured every point
    again instead of skipping them."""
    sweep = importlib.import_module("sweep")
    (tmp_path / "model").symlink_to(tiny_model_dir)
    grid = [
        "--dataset", "custom_jsonl", "--num_samples", "1", "--max_steps", "4", "--sample",
        "False", "--exit_layer_first", "1", "--exit_layer_last", "1",
        "--num_speculations_first", "1", "--num_speculations_last", "1",
    ]  # fmt: skip
    out = ["--output_dir", str(tmp_path / "out")]
    assert sweep.main([*grid, *out, "--model", str(tiny_model_dir), "--data_path",
                       str(prompts_file)]) == 0  # fmt: skip
    rows = (tmp_path / "out" / "sweep.csv").read_text().splitlines()
    monkeypatch.chdir(tmp_path)
    assert sweep.main([*grid, *out, "--model", "model/", "--data_path",
                       prompts_file.name]) == 0  # fmt: skip
    assert (tmp_path / "out" / "sweep.csv").read_text().splitlines() == rows


def test_eval_request_cache_is_the_same_file_for_the_model_spelled_otherwise(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """eval.py --use_cache: one request cache file per setting, which took the --model
    string: a rerun with the same model spelled otherwise found none of its answers."""
    from arguments import Arguments

    eval_script = importlib.import_module("eval")
    (tmp_path / "model").symlink_to(tiny_model_dir)
    generation = eval_script.EvalGenerationArguments()
    evaluation = eval_script.EvalArguments(tasks=["layerskip_mc"], use_cache=str(tmp_path))
    config = generation.config()
    paths = {
        eval_script._cache_path(evaluation, Arguments(model=model), generation, config, None)
        for model in (str(tiny_model_dir), f"{tiny_model_dir}/", str(tmp_path / "model"))
    }
    assert len(paths) == 1, paths


def test_train_adapter_rerun_takes_its_target_cache_with_the_model_spelled_otherwise(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The target cache's manifest recorded --model as written, so rerunning an interrupted
    train_adapter.py with the same model folder spelled otherwise (a trailing slash, a
    symlink, another working directory) was refused: "holds targets for other settings"
    (the adapter checkpoint itself already compared real paths)."""
    from train_adapter import AdapterTrainArguments, train_adapter

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    (tmp_path / "link").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    arguments = dict(
        output_dir=str(tmp_path / "adapter"), exit_layer=2, data=[str(corpus)], seq_len=32,
        max_target_tokens=512, held_out_blocks=2, batch_size=4, epochs=1, num_threads=1,
    )  # fmt: skip
    first = train_adapter(AdapterTrainArguments(model="link", **arguments))
    again = train_adapter(AdapterTrainArguments(model=f"{tiny_model_dir}/", **arguments))
    assert again["steps"] == first["steps"] > 0


def test_train_adapter_refuses_to_continue_with_another_held_out_split(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """--held_out_blocks was not part of the adapter checkpoint's settings: a rerun with more
    held-out blocks continued training on a shorter training set, and its "after" agreement
    was measured on blocks the adapter had been trained on."""
    import pytest

    from self_speculation import ConfigError
    from train_adapter import AdapterTrainArguments, train_adapter

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    arguments = dict(
        model=str(tiny_model_dir), output_dir=str(tmp_path / "adapter"), exit_layer=2,
        data=[str(corpus)], seq_len=32, max_target_tokens=512, batch_size=4, epochs=1,
        num_threads=1,
    )  # fmt: skip
    train_adapter(AdapterTrainArguments(held_out_blocks=2, **arguments))
    with pytest.raises(ConfigError, match="--held_out_blocks 2, not 6"):
        train_adapter(AdapterTrainArguments(held_out_blocks=6, **arguments))


def test_draft_adapter_written_with_a_tilde_is_found(tmp_path: Path, monkeypatch) -> None:
    """--output_dir=~/x, --data_path=~/x and --model=~/x are expanded (the shell leaves a
    "~" after "=" alone); --draft_adapter=~/a was not: "is not an adapter folder"."""
    from arguments import Arguments

    layer_report = importlib.import_module("layer_report")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"exit_layer": 2, "num_layers": 4, "hidden_size": 32, "init_layer": 3}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HOME", str(tmp_path))
    arguments = Arguments(draft_adapter="~/adapter", output_dir=str(tmp_path / "out"))
    assert arguments.draft_adapter == str(adapter)
    report = layer_report.ReportConfig(
        data=["x.py"], draft_adapter="~/adapter", output_dir=str(tmp_path / "out")
    )
    assert report.draft_adapter == str(adapter)


def test_continued_training_keeps_the_models_recommended_exit_and_k(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """train.py --model M (continued pretraining) replaced M's recommended exit_layer and
    num_speculations (a sweep's choice: the shipped model's 7 and 3) with max(1, L//4) and
    4, which every script then used by default; flags given still win."""
    import shutil

    from tiny_models import write_python_corpus

    train = importlib.import_module("train")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    generation = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    generation.update(exit_layer=2, num_speculations=3)  # as train.py writes it, hand-edited
    (model / "generation_config.json").write_text(json.dumps(generation))
    write_python_corpus(tmp_path / "corpus")
    flags = ["--model", str(model), "--data", str(tmp_path / "corpus/*.py")]
    flags += ["--seq_len", "32", "--batch_size", "4", "--num_threads", "1", "--bf16", "False"]
    flags += ["--save_every_minutes", "0", "--max_tokens", str(4 * 32)]

    def recommended(output_dir: Path) -> tuple[int, int]:
        config = json.loads((output_dir / "generation_config.json").read_text())
        return config["exit_layer"], config["num_speculations"]

    assert train.main([*flags, "--output_dir", str(tmp_path / "kept")]) == 0
    assert recommended(tmp_path / "kept") == (2, 3)
    assert train.main([*flags, "--output_dir", str(tmp_path / "given"), "--exit_layer", "3",
                       "--num_speculations", "5"]) == 0  # fmt: skip
    assert recommended(tmp_path / "given") == (3, 5)


def test_train_adapter_refuses_targets_and_checkpoints_of_a_model_retrained_in_place(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The target cache and the adapter checkpoint were keyed by the model's location: a
    model retrained (or replaced) in the same folder reused the old model's cached layer-E
    states and last-layer targets, and went on training the old model's adapter, silently."""
    import shutil

    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    from self_speculation import ConfigError
    from train_adapter import AdapterTrainArguments, train_adapter

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    arguments = dict(
        model=str(model), exit_layer=2, data=[str(corpus)], seq_len=32, max_target_tokens=512,
        held_out_blocks=2, batch_size=4, epochs=1, num_threads=1,
        cache_dir=str(tmp_path / "targets"),
    )  # fmt: skip
    train_adapter(AdapterTrainArguments(output_dir=str(tmp_path / "first"), **arguments))
    retrained = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        retrained.lm_head.weight.mul_(1.5)
    retrained.save_pretrained(model)
    with pytest.raises(ConfigError, match="holds targets computed from other weights"):
        train_adapter(AdapterTrainArguments(output_dir=str(tmp_path / "second"), **arguments))
    arguments["cache_dir"] = str(tmp_path / "fresh_targets")
    with pytest.raises(ConfigError, match="continues a run on other weights of --model"):
        train_adapter(AdapterTrainArguments(output_dir=str(tmp_path / "first"), **arguments))
    # Targets computed again from the new weights: a new adapter trains.
    fresh = train_adapter(AdapterTrainArguments(output_dir=str(tmp_path / "third"), **arguments))
    assert fresh["steps"] > 0
