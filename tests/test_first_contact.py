"""First contact: what the README shows is what a fresh clone prints, and the log lines a
newcomer reads are accurate (grammar, every file named, required flags asked for)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from test_cli_scripts import REPOSITORY_ROOT, assert_one_line_error, run_script
from test_readme import README, fenced_blocks, readme_commands

from self_speculation import DEFAULT_MODEL, GenerationConfig, Generator, load_model_and_tokenizer


def readme_main_output() -> tuple[str, list[str]]:
    """The README's shown answer (stdout) and its log lines (stderr)."""
    (block,) = [b for b in fenced_blocks(README.read_text(), "text") if "INFO generate:" in b]
    lines = block.splitlines()
    logs = [line for line in lines if re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    answer_lines = [line for line in lines if line not in logs]
    return "\n".join(answer_lines), logs


def test_readme_shows_the_main_commands_actual_answer() -> None:
    """Greedy fp32 on the shipped model: the README's answer is exact, so it must match."""
    (command,) = [c for c in readme_commands() if c.startswith("python generate.py --prompt")][:1]
    words = shlex.split(command)
    flags = dict(zip(words[2::2], words[3::2]))
    assert flags["--sample"] == "False"
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, device="cpu")
    torch.set_num_threads(1)
    result = Generator(model, tokenizer).generate(
        flags["--prompt"],
        GenerationConfig(
            generation_strategy=flags["--generation_strategy"],
            sample=False,
            max_steps=int(flags["--max_steps"]),
            no_repeat_ngram_size=int(flags["--no_repeat_ngram_size"]),
        ),
    )
    answer, logs = readme_main_output()
    assert result.text.rstrip("\n") == answer.rstrip("\n")
    (summary,) = [line for line in logs if "tokens per full-model pass" in line]
    drafted, accepted = map(
        int, re.search(r"drafted (\d+) tokens.*accepted (\d+)", summary).groups()
    )
    assert (result.num_drafted, result.num_accepted) == (drafted, accepted)
    assert f"{result.tokens_per_step:.2f} tokens per full-model pass" in summary
    assert f"{result.num_generated_tokens} tokens in" in summary


def test_readme_names_the_method_line_by_its_place() -> None:
    """The README explains one log line by its place among the shown log lines."""
    _, logs = readme_main_output()
    words = {1: "first", 2: "second", 3: "third", 4: "fourth"}
    place = next(i for i, line in enumerate(logs, 1) if "tokens per full-model pass" in line)
    text = README.read_text()
    said = re.search(r"The (\w+) log line is the\s+method at work", text)
    assert said, "README no longer explains the method's log line"
    expected = "last" if place == len(logs) else words[place]
    assert said.group(1) == expected, f"README says {said.group(1)}, it is the {expected}"


def test_generate_from_stdin_counts_one_answer_in_the_singular(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    process = run_script(
        "generate.py", "--model", tiny_model_dir, "--sample", "False", "--max_steps", 4,
        "--output_dir", tmp_path, stdin="def add(a, b):\n",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "(1 answer)" in process.stderr, process.stderr


def test_sweep_log_names_every_file_it_wrote(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    process = run_script(
        "sweep.py", "--model", tiny_model_dir, "--dataset", "custom_jsonl", "--data_path",
        prompts_file, "--num_samples", 1, "--max_steps", 4, "--sample", "False",
        "--output_dir", tmp_path, "--exit_layer_first", 1, "--exit_layer_last", 1,
        "--num_speculations_first", 1, "--num_speculations_last", 1,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    (best,) = [line for line in process.stderr.splitlines() if "INFO sweep: best:" in line]
    for name in ("sweep.csv", "sweep.json", "sweep.png"):
        assert (tmp_path / name).is_file()
        assert str(tmp_path / name) in best, best


def test_train_adapter_asks_for_a_missing_exit_layer(tmp_path: Path) -> None:
    process = run_script(
        "train_adapter.py", "--output_dir", tmp_path / "adapter", "--data", "x.py", timeout=120
    )
    assert_one_line_error(process, "give --exit_layer")


def test_train_adapter_help_marks_its_required_flags() -> None:
    process = run_script("train_adapter.py", "--help", timeout=120)
    assert process.returncode == 0
    help_text = re.sub(r"\s+", " ", process.stdout)
    for flag in ("--output_dir", "--exit_layer"):
        described = help_text.split(f"{flag} ", 2)[2][:60]  # after the usage line
        assert described.startswith("str Required") or described.startswith("int Required"), (
            flag,
            described,
        )


@pytest.mark.parametrize("requirement", ["ruff"])
def test_the_linter_that_ci_enforces_is_pinned(requirement: str) -> None:
    """.ci/run fails on any format difference; an unpinned ruff changes its format over time."""
    lines = (REPOSITORY_ROOT / "requirements-dev.txt").read_text().splitlines()
    (line,) = [line for line in lines if re.match(rf"{requirement}\b", line)]
    assert re.match(rf"{requirement}==[\d.]+", line), line
