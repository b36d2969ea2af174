"""train.py and layer_report.py end to end, in subprocesses, on a tiny corpus and model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model, write_python_corpus
from transformers import GenerationConfig

import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--vocab_size", "300", "--seq_len", "32", "--batch_size", "4"]
QUICK = [
    "--warmup_steps",
    "2",
    "--log_every",
    "1",
    "--num_threads",
    "1",
    "--save_every_minutes",
    "0",
]
STEPS_6 = ["--max_tokens", str(6 * 4 * 32)]  # 6 optimizer steps of 4 sequences of 32 tokens
RECIPE = ["--layer_dropout_p_max", "0.5", "--early_exit_position_fraction", "0.25"]


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def losses(output_dir: Path) -> list[dict]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few small Python-like text files."""
    return write_python_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six steps from scratch with the recipe: an uninterrupted run."""
    output_dir = tmp_path_factory.mktemp("runs") / "scratch"
    result = run(
        "train.py",
        *TINY,
        *QUICK,
        *STEPS_6,
        *RECIPE,
        "--data",
        f"{corpus}/*.py",
        "--output_dir",
        str(output_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_from_scratch_writes_a_model_transformers_loads(trained: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = AutoModelForCausalLM.from_pretrained(trained)
    assert model.dtype == torch.bfloat16
    assert json.loads((trained / "config.json").read_text())["dtype"] == "bfloat16"
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    assert tokenizer("def f")["input_ids"][0] == tokenizer.bos_token_id
    assert len(tokenizer) <= model.config.vocab_size
    generation = GenerationConfig.from_pretrained(trained)
    assert (generation.exit_layer, generation.num_speculations) == (1, 4)
    records = losses(trained)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert set(records[0]["exit_losses"]) == {"1", "2", "3", "4"}
    assert records[-1]["tokens"] == 6 * 4 * 32


def test_resume_reproduces_the_uninterrupted_run(
    corpus: Path, trained: Path, tmp_path: Path
) -> None:
    common = [
        *TINY,
        *QUICK,
        *STEPS_6,
        *RECIPE,
        "--data",
        f"{corpus}/*.py",
        "--output_dir",
        str(tmp_path),
    ]
    first = run("train.py", *common, "--stop_after_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert [record["step"] for record in losses(tmp_path)] == [1, 2, 3]
    second = run("train.py", *common, "--resume", "True")
    assert second.returncode == 0, second.stderr[-3000:]
    keys = ("step", "tokens", "lr", "loss", "exit_losses")
    resumed = [{key: record[key] for key in keys} for record in losses(tmp_path)]
    uninterrupted = [{key: record[key] for key in keys} for record in losses(trained)]
    assert resumed == uninterrupted
    expected, actual = (
        load_file(trained / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_resume_with_a_larger_budget_extends_the_schedule(
    corpus: Path, trained: Path, tmp_path: Path
) -> None:
    """A finished run resumed with more --max_tokens trains on (it used to stop at once)."""
    import shutil

    from self_speculation.training.loop import lr_factor

    output_dir = tmp_path / "extended"
    shutil.copytree(trained, output_dir)
    common = [*TINY, *QUICK, *RECIPE, "--data", f"{corpus}/*.py", "--output_dir", str(output_dir)]
    longer = run("train.py", *common, "--max_tokens", str(9 * 4 * 32), "--resume", "True")
    assert longer.returncode == 0, longer.stderr[-3000:]
    records = losses(output_dir)
    assert [record["step"] for record in records] == list(range(1, 10))
    assert records[-1]["tokens"] == 9 * 4 * 32
    # Steps 7-9 follow the 9-step cosine (each record has the rate its step trained at).
    for record in records[6:]:
        expected = 1e-3 * lr_factor(record["step"] - 1, 2, 9, 0.1)  # tiny preset's peak rate
        assert record["lr"] == pytest.approx(expected, rel=1e-6)
    resumes = json.loads((output_dir / "train_config.json").read_text())["resumes"]
    assert [(entry["step"], entry["max_tokens"]) for entry in resumes] == [(6, 9 * 4 * 32)]

    spent = run("train.py", *common, "--max_tokens", str(3 * 4 * 32), "--resume", "True")
    assert spent.returncode != 0
    assert "already spent" in spent.stderr and "Traceback" not in spent.stderr
    assert len(losses(output_dir)) == 9


def test_a_step_split_into_micro_batches_trains_the_same_model(
    corpus: Path, trained: Path, tmp_path: Path
) -> None:
    """Layer dropout and position subsampling draw per sample, by its place in the step:
    batch 2 x 2 accumulation steps trains what batch 4 trains (up to summation order)."""
    split = run(
        "train.py",
        *TINY,
        *QUICK,
        *STEPS_6,
        *RECIPE,
        "--batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--data",
        f"{corpus}/*.py",
        "--output_dir",
        str(tmp_path),
    )
    assert split.returncode == 0, split.stderr[-3000:]
    for got, want in zip(losses(tmp_path), losses(trained), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-4), (got, want)
    expected, actual = (
        load_file(trained / "model.safetensors"),
        load_file(tmp_path / "model.safetensors"),
    )
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=2e-2, rtol=2e-2)


def test_a_resume_applies_its_own_learning_rate_and_weight_decay(
    corpus: Path, trained: Path, tmp_path: Path
) -> None:
    from self_speculation.training.loop import lr_factor

    common = [*TINY, *QUICK, *STEPS_6, *RECIPE, "--data", f"{corpus}/*.py"]
    first = tmp_path / "first"
    stopped = run("train.py", *common, "--output_dir", str(first), "--stop_after_steps", "3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    decayed = tmp_path / "decayed"
    shutil.copytree(first, decayed)

    slower = run(
        "train.py", *common, "--output_dir", str(first), "--resume", "True",
        "--learning_rate", "2e-4",
    )  # fmt: skip
    assert slower.returncode == 0, slower.stderr[-3000:]
    records = losses(first)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    for record in records[3:]:
        assert record["lr"] == pytest.approx(2e-4 * lr_factor(record["step"] - 1, 2, 6, 0.1))

    more_decay = run(
        "train.py", *common, "--output_dir", str(decayed), "--resume", "True",
        "--weight_decay", "0.9",
    )  # fmt: skip
    assert more_decay.returncode == 0, more_decay.stderr[-3000:]
    keys = ("step", "lr")
    assert [{k: r[k] for k in keys} for r in losses(decayed)] == [
        {k: r[k] for k in keys} for r in losses(trained)
    ]
    expected, actual = (
        load_file(trained / "model.safetensors"),
        load_file(decayed / "model.safetensors"),
    )
    weights = [name for name in expected if expected[name].dim() >= 2]
    assert any(not torch.equal(expected[name], actual[name]) for name in weights)


def test_a_time_budget_resume_uses_its_new_budget(corpus: Path, tmp_path: Path) -> None:
    common = [*TINY, *QUICK, "--data", f"{corpus}/*.py", "--output_dir", str(tmp_path)]
    first = run("train.py", *common, "--max_minutes", "0.08")
    assert first.returncode == 0, first.stderr[-3000:]
    done = losses(tmp_path)[-1]["step"]
    assert done > 10  # the horizon was estimated from the speed (after 10 steps)

    longer = run("train.py", *common, "--max_minutes", "0.2", "--resume", "True")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "schedule horizon" in longer.stderr
    assert losses(tmp_path)[-1]["step"] > done

    spent = run("train.py", *common, "--max_minutes", "0.001", "--resume", "True")
    assert spent.returncode != 0
    assert "already spent" in spent.stderr and "Traceback" not in spent.stderr


def test_a_resume_without_its_token_budget_trains_to_its_time_budget(
    corpus: Path, tmp_path: Path
) -> None:
    """A run with both budgets stopped at its tokens; resumed with the same --max_minutes
    and no --max_tokens, its horizon comes from the time budget, not the old tokens."""
    common = [*TINY, *QUICK, "--data", f"{corpus}/*.py", "--output_dir", str(tmp_path)]
    first = run("train.py", *common, *STEPS_6, "--max_minutes", "0.15")
    assert first.returncode == 0, first.stderr[-3000:]
    assert losses(tmp_path)[-1]["step"] == 6

    resumed = run("train.py", *common, "--max_minutes", "0.15", "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "schedule horizon" in resumed.stderr
    assert losses(tmp_path)[-1]["step"] > 6


def test_a_continued_model_keeps_its_generation_settings(corpus: Path, tmp_path: Path) -> None:
    """Its own stop ids (an instruct model's end of turn) and sampling settings reach the
    trained model's generation_config.json, beside the recommended exit; on resume too."""
    save_tiny_model(tmp_path / "base", "qwen2")
    own = GenerationConfig(eos_token_id=[1, 7], do_sample=True, temperature=0.7)
    own.save_pretrained(tmp_path / "base")
    common = [
        *("--model", str(tmp_path / "base"), "--data", f"{corpus}/*.py", "--seq_len", "32"),
        *("--batch_size", "4", "--max_tokens", str(4 * 4 * 32), "--bf16", "False", *QUICK),
        *("--output_dir", str(tmp_path / "run")),
    ]
    first = run("train.py", *common, "--stop_after_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run("train.py", *common, "--resume", "True")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert (saved["eos_token_id"], saved["temperature"]) == ([1, 7], 0.7)
    assert saved["exit_layer"] >= 1


def test_a_continued_models_config_stop_ids_are_kept(corpus: Path, tmp_path: Path) -> None:
    """Stop ids listed only in config.json (no generation_config.json of its own: a model
    converted from GGUF, an older save) reached the trained model's generation_config.json
    as the tokenizer's one EOS, so the trained model ran past the others."""
    save_tiny_model(tmp_path / "base", "qwen2")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "eos_token_id": [1, 7]}))
    (tmp_path / "base" / "generation_config.json").unlink(missing_ok=True)
    result = run(
        "train.py",
        *("--model", str(tmp_path / "base"), "--data", f"{corpus}/*.py", "--seq_len", "32"),
        *("--batch_size", "4", "--max_tokens", str(2 * 4 * 32), "--bf16", "False", *QUICK),
        *("--output_dir", str(tmp_path / "run")),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [1, 7]


def test_a_tokenizer_larger_than_the_model_is_one_line(corpus: Path, tmp_path: Path) -> None:
    save_tiny_model(tmp_path / "base", "qwen2", vocab_size=40)  # its tokenizer has more ids
    result = run(
        "train.py",
        *("--model", str(tmp_path / "base"), "--data", f"{corpus}/*.py", "--seq_len", "32"),
        *("--max_tokens", "512", "--bf16", "False", "--output_dir", str(tmp_path / "run")),
    )
    assert result.returncode == 2
    assert "embeddings for ids 0..39 only" in result.stderr and "Traceback" not in result.stderr


def test_a_mistyped_model_makes_no_output_folder(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "qwen-base").mkdir()
    result = run(
        "train.py",
        *("--model", str(tmp_path / "qwen-bas"), "--data", f"{corpus}/*.py"),
        *("--max_tokens", "512", "--output_dir", str(tmp_path / "qwen-base-ls")),
    )
    assert result.returncode == 2 and "qwen-base-ls" not in result.stderr
    assert not (tmp_path / "qwen-base-ls").exists()


def test_continue_a_saved_model_on_jsonl_and_report(
    tiny_model_dir: Path, trained: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"line {n} of some text\n" * 8}) + "\n" for n in range(40))
    )
    output_dir = tmp_path / "continued"
    result = run(
        "train.py",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--seq_len",
        "32",
        "--batch_size",
        "2",
        "--max_tokens",
        "192",
        "--bf16",
        "False",
        "--early_exit_curriculum",
        "rotational",
        *QUICK,
        "--output_dir",
        str(output_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = losses(output_dir)
    assert [sorted(map(int, r["exit_losses"])) for r in records[:2]] == [[2, 4], [1, 3, 4]]
    report_dir = tmp_path / "report"
    result = run(
        "layer_report.py",
        "--model",
        str(trained),
        "--compare",
        str(output_dir),
        "--data",
        str(data),
        "--seq_len",
        "32",
        "--max_tokens",
        "256",
        "--num_threads",
        "1",
        "--output_dir",
        str(report_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((report_dir / "layer_report.json").read_text())
    assert [len(section["exits"]) for section in report["models"]] == [4, 4]
    assert report["models"][0]["exits"][-1]["agreement"] == 1.0
    assert (report_dir / "layer_report.png").stat().st_size > 1000
    # An automatic --seq_len never reads more than --max_tokens.
    small = run("layer_report.py", "--model", str(trained), "--data", str(data),
                "--max_tokens", "10", "--num_threads", "1", "--output_dir", str(tmp_path / "small"))  # fmt: skip
    assert small.returncode == 0, small.stderr[-3000:]
    (section,) = json.loads((tmp_path / "small" / "layer_report.json").read_text())["models"]
    assert 0 < section["tokens"] <= 10
    # Each mean is over the next-token predictions: a block of n tokens makes n - 1.
    assert section["predictions"] == section["tokens"] - 1


def test_torchrun_two_processes(corpus: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            str(ROOT / "train.py"),
            *TINY,
            *QUICK,
            "--max_tokens",
            str(4 * 2 * 4 * 32),
            *RECIPE,
            "--data",
            f"{corpus}/*.py",
            "--output_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["tokens"] for record in losses(tmp_path)] == [256, 512, 768, 1024]
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["--preset", "tiny", "--data", "/nonexistent/**/*.py", "--max_tokens", "10"],
            "no data files match",
        ),
        (["--preset", "huge", "--data", "x", "--max_tokens", "10"], "unknown preset 'huge'"),
        (
            ["--preset", "tiny", "--data", "x", "--max_tokens", "10", "--frobnicate", "1"],
            "unrecognized arguments",
        ),
        (["--preset", "tiny", "--data", "x"], "give a budget"),
        (
            ["--preset", "tiny", "--data", "x", "--max_tokens", "9", "--early_exit_scale", "cubic"],
            "--early_exit_scale must be one of",
        ),
        (
            ["--preset", "tiny", "--model", "m", "--data", "x", "--max_tokens", "9"],
            "give only one of",
        ),
        (
            ["--preset", "tiny", "--data", "x", "--max_tokens", "9", "--device", "tpu"],
            "--device must be auto, cpu, cuda or cuda:N",
        ),
        # a ValueError traceback on a CUDA machine; accepted as the CPU elsewhere
        (
            ["--preset", "tiny", "--data", "x", "--max_tokens", "9", "--device", "cuda:abc"],
            "--device must be auto, cpu, cuda or cuda:N, got 'cuda:abc'",
        ),
        (
            ["--preset", "tiny", "--data", "x", "--max_tokens", "9", "--device", "cpu:abc"],
            "--device must be auto, cpu, cuda or cuda:N, got 'cpu:abc'",
        ),
        (
            ["--preset", "tiny", "--data", "x", "--max_tokens", "9", "--fsdp_cpu_offload", "True"],
            "--fsdp_cpu_offload True needs --fsdp True",
        ),
        (
            ["--recipe", "/nonexistent/recipe.json", "--data", "x", "--max_tokens", "9"],
            "cannot read recipe /nonexistent/recipe.json",
        ),
    ],
)
def test_bad_input_is_one_line_and_nonzero(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    status = train.main([*arguments, "--output_dir", str(tmp_path)])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error


def test_bad_input_in_a_subprocess(tmp_path: Path) -> None:
    missing = run(
        "train.py",
        "--preset",
        "tiny",
        "--data",
        str(tmp_path / "*.txt"),
        "--max_tokens",
        "10",
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert lines == [f"train.py: error: no data files match {tmp_path / '*.txt'}"]
    resume = run(
        "train.py",
        "--preset",
        "tiny",
        "--data",
        str(ROOT / "train.py"),
        "--max_tokens",
        "10",
        "--resume",
        "True",
        "--output_dir",
        str(tmp_path / "none"),
    )
    assert (
        resume.returncode != 0
        and "does not exist" in resume.stderr
        and "Traceback" not in resume.stderr
    )


def test_time_budget_starts_the_schedules_at_their_beginning(corpus: Path, tmp_path: Path) -> None:
    """With --max_minutes alone the horizon T is unknown for the first steps: the exponential
    dropout warm-up must start at S(0) = 0 and the gradual curriculum at the last exit alone
    (not at full p_max with every exit on, as `T = 1` gave)."""
    result = run(
        "train.py",
        *TINY,
        *QUICK,
        "--max_minutes",
        "10",
        "--stop_after_steps",
        "3",
        "--layer_dropout_p_max",
        "0.5",
        "--layer_dropout_schedule",
        "exponential",
        "--early_exit_curriculum",
        "gradual",
        "--data",
        f"{corpus}/*.py",
        "--output_dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = losses(tmp_path)
    assert [record["step"] for record in records] == [1, 2, 3]
    assert all(set(record["exit_losses"]) == {"4"} for record in records), records
    assert all(record["layer_dropout_scale"] == 0.0 for record in records), records


def test_recipe_files_are_flags_the_command_line_overrides(tmp_path: Path) -> None:
    from self_speculation.training.config import parse_config

    recipe = tmp_path / "recipe.json"
    recipe.write_text(
        json.dumps(
            {
                "flags": {
                    "model": "some/model",
                    "learning_rate": 2e-5,
                    "bf16": False,
                    "data": ["a", "b"],
                }
            }
        )
    )
    config = parse_config(["--recipe", str(recipe), "--learning_rate", "1e-4", "--max_tokens", "9"])
    assert config.model.model == "some/model" and config.data.data == ["a", "b"]
    assert config.training.learning_rate == 1e-4 and config.training.bf16 is False
    shipped = sorted((ROOT / "configs").glob("recipe-*.json"))
    assert len(shipped) >= 2
    for path in shipped:
        config = parse_config(["--recipe", str(path), "--data", "x"])
        assert config.model.model and config.layerskip.layer_dropout_p_max > 0, path
        assert config.training.max_tokens > 0, path


def test_resume_refuses_other_settings_damage_and_recovers_a_half_replaced_checkpoint(
    corpus: Path, tmp_path: Path
) -> None:
    """What a user can do to a stopped run: resume with other settings (refused: the data
    position would mean nothing), damage a checkpoint file (one line), be killed while a
    checkpoint replaces the previous one (recovered), leave log lines after the checkpoint
    (cut back)."""
    common = [*TINY, *QUICK, *STEPS_6, "--data", f"{corpus}/*.py", "--output_dir", str(tmp_path)]
    first = run("train.py", *common, "--stop_after_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "checkpoint"
    for changed, name in (
        (["--seq_len", "64"], "--seq_len"),
        (["--seed", "7"], "--seed"),
        (["--layer_dropout_p_max", "0.5"], "--layer_dropout_p_max"),
        (["--batch_size", "2"], "global batch"),
    ):
        result = run("train.py", *common, *changed, "--resume", "True")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert name in result.stderr.strip().splitlines()[-1]
    backup = tmp_path.parent / "backup"
    shutil.copytree(checkpoint, backup)
    (checkpoint / "trainer_state.pt").write_text("garbage")
    result = run("train.py", *common, "--resume", "True")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is damaged or incomplete" in result.stderr.strip().splitlines()[-1]
    # Killed after the previous checkpoint moved aside, before the new one moved in.
    shutil.rmtree(checkpoint)
    shutil.copytree(backup, tmp_path / "checkpoint.old")
    shutil.copytree(backup, tmp_path / "checkpoint.tmp")
    with (tmp_path / "train_log.jsonl").open("a") as log:  # logged after the checkpoint
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    result = run("train.py", *common, "--resume", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["step"] for record in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "checkpoint.old").exists()
    assert not (tmp_path / "checkpoint.tmp").exists()


def test_a_diverging_run_stops_in_one_line_and_keeps_its_checkpoint(
    corpus: Path, tmp_path: Path
) -> None:
    common = [*TINY, *QUICK, "--data", f"{corpus}/*.py", "--output_dir", str(tmp_path)]
    result = run("train.py", *common, "--max_tokens", str(40 * 4 * 32), "--learning_rate", "1e4",
                 "--warmup_steps", "1", "--max_grad_norm", "0", "--save_every_steps", "1")  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "training diverged at step" in result.stderr.strip().splitlines()[-1]
    text = (tmp_path / "train_log.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert not (tmp_path / "model.safetensors").exists()  # no model from NaN weights
    assert (tmp_path / "checkpoint" / "trainer_state.pt").is_file()
