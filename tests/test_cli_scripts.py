"""The scripts, run for real in subprocesses on tiny models, offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_models import save_tiny_model

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_script(
    script: str, *args: object, stdin: str = "", timeout: int = 240
) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    env.update(OFFLINE_ENV)
    return subprocess.run(
        [sys.executable, str(REPOSITORY_ROOT / script), *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY_ROOT,
        timeout=timeout,
    )


def assert_one_line_error(process: subprocess.CompletedProcess, fragment: str) -> None:
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    errors = [line for line in process.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, process.stderr
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a context long enough for HumanEval prompts."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def eight_layer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 8 layers, for the original README's --exit_layer 8."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-8"), num_hidden_layers=8)


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def test_benchmark_compares_strategies_on_human_eval(
    long_context_model_dir: Path, tmp_path: Path
) -> None:
    process = run_script(
        "benchmark.py", "--model", long_context_model_dir, "--dataset", "human_eval",
        "--num_samples", 2, "--max_steps", 8, "--sample", "False",
        "--generation_strategy", "autoregressive,self_speculative",
        "--exit_layer", 2, "--num_speculations", 3, "--output_dir", tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "samples:" in process.stderr and "%|" in process.stderr  # the tqdm bar
    document = json.loads(only(list(tmp_path.glob("benchmark_*.json"))).read_text())
    assert {"arguments", "generation_configs", "metrics", "comparison", "environment"} <= set(
        document
    )
    assert document["arguments"]["generation_strategy"] == "autoregressive,self_speculative"
    assert document["num_samples"] == 2
    for strategy in ("autoregressive", "self_speculative"):
        metrics = document["metrics"][strategy]
        for key in (
            "rouge1", "rouge2", "rouge3", "rougeL", "bleu", "corpus_bleu", "exact_match",
            "edit_distance", "acceptance_rate", "total_time", "time_per_token",
            "tokens_per_second", "overall_tokens_per_second", "total_generated_tokens",
        ):  # fmt: skip
            assert key in metrics, key
    assert document["metrics"]["autoregressive"]["acceptance_rate"] is None
    assert document["generation_configs"][0]["exit_layer"] == 4  # the baseline is the full model
    comparison = document["comparison"]
    assert comparison["outputs_identical"] and comparison["num_mismatches"] == 0
    assert comparison["speedup"]["autoregressive"] == pytest.approx(1.0)
    assert document["environment"]["dtype"] == "float32"
    rows = [json.loads(line) for line in Path(document["samples_file"]).read_text().splitlines()]
    assert len(rows) == 4
    assert {row["generation_strategy"] for row in rows} == {"autoregressive", "self_speculative"}
    assert all(len(row["token_ids"]) == 8 for row in rows)


def test_benchmark_on_prompts_only_skips_quality_metrics(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(x):", "import")))
    process = run_script(
        "benchmark.py", "--model", tiny_model_dir, "--dataset", "custom_jsonl",
        "--data_path", data, "--max_steps", 4, "--output_dir", tmp_path / "logs",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "quality metrics are skipped" in process.stderr
    document = json.loads(only(list((tmp_path / "logs").glob("benchmark_*.json"))).read_text())
    assert document["quality_metrics"] == "skipped: no references"
    metrics = document["metrics"]["autoregressive"]
    assert metrics["num_samples"] == 2 and metrics["overall_tokens_per_second"] > 0
    assert "rougeL" not in metrics and "corpus_bleu" not in metrics


def test_correctness_passes_on_tiny_model(
    tiny_recommending_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    process = run_script(
        "correctness.py", "--model", tiny_recommending_model_dir, "--dataset", "custom_jsonl",
        "--data_path", prompts_file, "--max_steps", 12, "--output_dir", tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "0/3 outputs differ" in process.stderr
    document = json.loads(only(list(tmp_path.glob("correctness_*.json"))).read_text())
    assert document["num_samples"] == 3
    assert document["num_mismatches"] == 0 and document["mismatch_pct"] == 0.0
    assert document["mismatches"] == [] and document["passed"]
    assert document["generation_configs"][1]["exit_layer"] == 2  # the model's recommendation
    assert document["generation_configs"][1]["num_speculations"] == 3


def test_sweep_writes_csv_plot_and_resumes(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "prompts.jsonl"  # rewritten below
    data.write_text(prompts_file.read_text())
    common = (
        "--model", tiny_model_dir, "--dataset", "custom_jsonl", "--data_path", data,
        "--num_samples", 2, "--max_steps", 6, "--sample", "False", "--output_dir", tmp_path,
        "--exit_layer_first", 1, "--exit_layer_last", 2, "--num_speculations_first", 1,
    )  # fmt: skip
    first = run_script("sweep.py", *common, "--num_speculations_last", 2)
    assert first.returncode == 0, first.stderr
    csv_path = tmp_path / "sweep.csv"
    table = pd.read_csv(csv_path, dtype={"setting": str})
    for column in (
        "exit_layer",
        "num_speculations",
        "acceptance_rate",
        "total_time",
        "time_per_token",
        "tokens_per_second",
        "speedup",
    ):
        assert column in table.columns
    assert len(table) == 1 + 4  # baseline + 2 x 2 grid
    assert (tmp_path / "sweep.png").stat().st_size > 0
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert {"exit_layer", "num_speculations", "overall_tokens_per_second"} <= set(summary["best"])
    assert "best: self_speculative, exit_layer" in first.stderr

    second = run_script("sweep.py", *common, "--num_speculations_last", 3)
    assert second.returncode == 0, second.stderr
    # Speedups are ratios within one run: the baseline is measured again for the new points
    # (its earlier row stays the CSV's one).
    assert "4 already in" in second.stderr
    assert "baseline measured again for this run's points" in second.stderr
    table = pd.read_csv(csv_path, dtype={"setting": str})
    assert len(table) == 1 + 6  # only the two new points were run
    assert sorted(zip(table["exit_layer"][1:], table["num_speculations"][1:])) == [
        (e, k) for e in (1, 2) for k in (1, 2, 3)
    ]
    # Every speedup can be checked from its row: the baseline it divides by is a column (the
    # new points' is the one measured again, which no autoregressive row holds).
    rates = table["overall_tokens_per_second"] / table["baseline_tokens_per_second"]
    assert np.allclose(table["speedup"], rates)
    assert table["baseline_tokens_per_second"][0] == table["overall_tokens_per_second"][0]
    first_run, second_run = (
        table["baseline_tokens_per_second"][1:5],
        table["baseline_tokens_per_second"][5:],
    )
    assert first_run.nunique() == 1 and second_run.nunique() == 1
    assert first_run.iloc[0] == table["overall_tokens_per_second"][0]

    third = run_script("sweep.py", *common, "--num_speculations_last", 1)  # a smaller grid
    assert third.returncode == 0, third.stderr
    assert "2 grid points, 2 already in" in third.stderr
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted((row["exit_layer"], row["num_speculations"]) for row in summary["grid"]) == [
        (1, 1),
        (2, 1),
    ]  # this run's grid, not every point the CSV holds
    assert summary["best"]["num_speculations"] == 1

    # Other data under the same path: measured again, not taken from the old rows.
    data.write_text(prompts_file.read_text().splitlines()[-1] + "\n" + prompts_file.read_text())
    fourth = run_script("sweep.py", *common, "--num_speculations_last", 1)
    assert fourth.returncode == 0, fourth.stderr
    assert "2 grid points, 0 already in" in fourth.stderr


def test_sweep_refuses_a_tree_grid_too_deep_before_measuring(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    """Default trees deeper than 16 make more than 64 nodes: the sweep failed at that
    point, after measuring the ones before, and named a --tree_branching never given."""
    swept = run_script(
        "sweep.py", "--model", tiny_model_dir, "--dataset", "custom_jsonl",
        "--data_path", prompts_file, "--num_samples", 1, "--max_steps", 4, "--sample", "False",
        "--generation_strategy", "tree", "--exit_layer_first", 1, "--exit_layer_last", 1,
        "--num_speculations_first", 15, "--num_speculations_last", 17, "--output_dir", tmp_path,
    )  # fmt: skip
    assert swept.returncode == 2
    assert "num_speculations <= 16" in swept.stderr.strip().splitlines()[-1]
    assert "Traceback" not in swept.stderr
    assert (
        not (tmp_path / "sweep.csv").exists()
        or len(pd.read_csv(tmp_path / "sweep.csv", dtype={"setting": str})) == 0
    )


def test_sweep_compares_chains_and_trees_in_one_csv(
    tiny_model_dir: Path, prompts_file: Path, tmp_path: Path
) -> None:
    common = (
        "--model", tiny_model_dir, "--dataset", "custom_jsonl", "--data_path", prompts_file,
        "--num_samples", 2, "--max_steps", 6, "--sample", "False", "--output_dir", tmp_path,
        "--exit_layer_first", 1, "--exit_layer_last", 2, "--num_speculations_first", 1,
        "--num_speculations_last", 2,
    )  # fmt: skip
    both = run_script("sweep.py", *common, "--generation_strategy", "self_speculative,tree")
    assert both.returncode == 0, both.stderr
    table = pd.read_csv(tmp_path / "sweep.csv", dtype={"setting": str})
    points = sorted(
        zip(table["generation_strategy"], table["exit_layer"], table["num_speculations"])
    )
    grid = [(e, k) for e in (1, 2) for k in (1, 2)]
    assert points == sorted(
        [("autoregressive", 4, 0)]
        + [("self_speculative", e, k) for e, k in grid]
        + [("tree", e, k) for e, k in grid]
    )
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert set(summary["best_by_strategy"]) == {"self_speculative", "tree"}
    # One given tree: its depth is the only k, at each exit layer of the grid.
    given = run_script(
        "sweep.py", *common, "--generation_strategy", "tree", "--tree_branching", 2, 1, 1,
        "--output_file", tmp_path / "given.csv",
    )  # fmt: skip
    assert given.returncode == 0, given.stderr
    table = pd.read_csv(tmp_path / "given.csv", dtype={"setting": str})
    trees = table[table["generation_strategy"] == "tree"]
    assert sorted(zip(trees["exit_layer"], trees["num_speculations"])) == [(1, 3), (2, 3)]


def test_correctness_checks_trees(tiny_model_dir: Path, prompts_file: Path, tmp_path: Path):
    process = run_script(
        "correctness.py", "--model", tiny_model_dir, "--dataset", "custom_jsonl",
        "--data_path", prompts_file, "--num_samples", 3, "--max_steps", 12,
        "--generation_strategy", "tree", "--tree_branching", 2, 2, "--exit_layer", 2,
        "--output_dir", tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert "0/3 outputs differ (0.0%) between autoregressive and tree" in process.stderr
    document = json.loads(only(list(tmp_path.glob("correctness_*.json"))).read_text())
    assert document["generation_configs"][1]["tree_branching"] == [2, 2]
    assert document["passed"]


def test_generate_interactive_readme_command(eight_layer_model_dir: Path, tmp_path: Path) -> None:
    # The original README's command, on a model with 8 layers; prompts from stdin, then EOF.
    interactive = run_script(
        "generate.py", "--model", eight_layer_model_dir, "--sample", "True", "--max_steps", 512,
        "--generation_strategy", "self_speculative", "--exit_layer", 8, "--num_speculations", 6,
        "--streamer", "speculative", "--output_dir", tmp_path,
        stdin="def add(a, b):\nThe quick\\\nbrown fox\n",
    )  # fmt: skip
    assert interactive.returncode == 0, interactive.stderr
    answered = [
        line
        for line in interactive.stderr.splitlines()
        if "INFO generate:" in line and "tokens/s" in line
    ]
    assert len(answered) == 2, interactive.stderr  # two prompts answered
    # Exit layer 8 of 8 layers drafts with the whole model: that, once, is the only warning
    # besides the streamer's (standard output is a pipe here: no colours).
    warnings = [line for line in interactive.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, warnings
    assert "not a terminal" in warnings[0] and "exit_layer 8 is the full model" in warnings[1]
    document = json.loads(only(list(tmp_path.glob("generate_*.json"))).read_text())
    assert document["ended_by"] == "end of input"
    assert document["arguments"]["exit_layer"] == 8
    assert document["generation_config"]["num_speculations"] == 6
    assert [row["prompt"] for row in document["prompts"]] == [
        "def add(a, b):",
        "The quick\nbrown fox",
    ]
    assert all(row["text"] and row["num_generated_tokens"] > 0 for row in document["prompts"])
    assert document["environment"]["torch"]


def test_generate_speculative_streamer_into_a_pipe_writes_the_answer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Standard output a pipe: the answer without colour codes or rejected drafts, and one
    warning saying so (FORCE_COLOR brings the colours back)."""
    argv = [
        "generate.py", "--model", tiny_model_dir, "--prompt", "def add(a, b):", "--sample",
        "False", "--max_steps", 8, "--generation_strategy", "self_speculative",
        "--exit_layer", 1, "--num_speculations", 3, "--streamer", "speculative",
    ]  # fmt: skip
    process = run_script(*argv, "--output_dir", tmp_path)
    assert process.returncode == 0, process.stderr
    document = json.loads(only(list(tmp_path.glob("generate_*.json"))).read_text())
    assert "\033" not in process.stdout
    assert document["prompts"][0]["text"] in process.stdout
    warnings = [line for line in process.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "not a terminal" in warnings[0], process.stderr


def test_generate_one_prompt_writes_its_result(tiny_model_dir: Path, tmp_path: Path) -> None:
    process = run_script(
        "generate.py", "--model", tiny_model_dir, "--prompt", "def add(a, b):",
        "--sample", "False", "--max_steps", 8, "--output_dir", tmp_path,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    document = json.loads(only(list(tmp_path.glob("generate_*.json"))).read_text())
    (row,) = document["prompts"]
    assert row["prompt"] == "def add(a, b):" and row["num_generated_tokens"] == 8
    assert row["text"] in process.stdout


def test_generate_ctrl_c_exits_130_and_keeps_the_answers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Interactive, autoregressive with --streamer speculative (a one-line warning): Ctrl-C
    after one answer ends the session with status 130 and a document holding that answer."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    env.update(OFFLINE_ENV)
    process = subprocess.Popen(
        [sys.executable, str(REPOSITORY_ROOT / "generate.py"), "--model", str(tiny_model_dir),
         "--streamer", "speculative", "--max_steps", "4", "--output_dir", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=REPOSITORY_ROOT,
    )  # fmt: skip
    process.stdin.write("def add(a, b):\n")
    process.stdin.flush()  # stdin stays open: the session waits for the next prompt
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        written = list(tmp_path.glob("generate_*.json"))
        if written and json.loads(written[0].read_text())["prompts"]:
            break
        time.sleep(0.1)
    assert process.poll() is None, "the session ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    warnings = [line for line in stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "--streamer speculative" in warnings[0], stderr
    document = json.loads(only(list(tmp_path.glob("generate_*.json"))).read_text())
    assert document["ended_by"] == "interrupted"
    assert [row["prompt"] for row in document["prompts"]] == ["def add(a, b):"]


def test_eval_runs_local_tasks_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    process = run_script(
        "eval.py", "--model", tiny_model_dir, "--tasks", "layerskip_mc,layerskip_humaneval",
        "--limit", 2, "--gen_kwargs", "max_gen_toks=8", "--execute_code", "True",
        "--generation_strategy", "self_speculative", "--exit_layer", 2, "--num_speculations", 2,
        "--loglikelihood_at_exit_layer", "True", "--output_dir", tmp_path, "--sample", "True",
    )  # fmt: skip
    assert process.returncode == 0, process.stderr
    document = json.loads(only(list(tmp_path.glob("eval_*.json"))).read_text())
    assert document["loglikelihood_exit_layer"] == 2
    assert "acc,none" in document["results"]["layerskip_mc"]
    assert "pass@1,none" in document["results"]["layerskip_humaneval"]
    assert document["speed"]["num_samples"] == 2
    assert document["speed"]["acceptance_rate"] is not None
    # What generation ran with: the task's greedy decoding, --gen_kwargs' 8 tokens.
    (used,) = document["generation_configs_used"]
    assert (used["sample"], used["max_steps"]) == (False, 8)
    assert document["generation_config"]["sample"] is True  # the CLI's, which the task overrode
    rows = Path(document["samples_file"]).read_text().splitlines()
    assert len(rows) == 2


def test_eval_request_cache_answers_a_rerun_with_what_it_finished(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """--use_cache: a rerun (of an interrupted evaluation, say) generates only what the
    cache lacks and scores as a run without a cache does; another setting gets its own."""
    common = [
        "eval.py", "--model", tiny_model_dir, "--tasks", "layerskip_mc,layerskip_humaneval",
        "--gen_kwargs", "max_gen_toks=6", "--execute_code", "True", "--bootstrap_iters", 0,
    ]  # fmt: skip
    cache = tmp_path / "cache"

    def evaluate(limit: int, name: str, *extra: object) -> dict:
        output = tmp_path / name
        process = run_script(*common, "--limit", limit, "--output_dir", output, *extra)
        assert process.returncode == 0, process.stderr
        return json.loads(only(list(output.glob("eval_*.json"))).read_text())

    evaluate(1, "first", "--use_cache", cache)
    again = evaluate(2, "again", "--use_cache", cache)
    assert again["speed"]["num_samples"] == 1  # the first answer came from the cache
    fresh = evaluate(2, "fresh")
    assert fresh["speed"]["num_samples"] == 2
    assert again["results"] == fresh["results"]
    early = evaluate(1, "early", "--use_cache", cache, "--loglikelihood_exit_layer", 1)
    assert early["speed"]["num_samples"] == 1  # another setting: nothing answered from cache
    assert len(list(cache.glob("eval-*.db"))) == 2


def test_bad_inputs_fail_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A sample of the bad inputs as real processes (the rest: test_cli_errors.py)."""
    assert_one_line_error(
        run_script("benchmark.py", "--model", tiny_model_dir, "--dataset", "nope"),
        "unknown dataset 'nope'",
    )
    assert_one_line_error(
        run_script(
            "correctness.py", "--model", "facebook/layerskip-llama2-7B", "--output_dir", tmp_path
        ),
        "facebook/layerskip-llama2-7B",  # offline: not a local directory and not cached
    )


def test_interrupted_run_keeps_its_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C mid-run: one line on stderr, exit 130, the rows written so far are valid JSONL
    and no half-written result document is left."""
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"def f{i}(x):", "response": "x"}) + "\n" for i in range(40))
    )
    output = tmp_path / "logs"
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    env.update(OFFLINE_ENV)
    process = subprocess.Popen(
        [sys.executable, str(REPOSITORY_ROOT / "benchmark.py"), "--model", str(tiny_model_dir),
         "--dataset", "custom_jsonl", "--data_path", str(data), "--max_steps", "200",
         "--output_dir", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPOSITORY_ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        samples = list(output.glob("benchmark_*.samples.jsonl"))
        if samples and samples[0].read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert (
        "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "benchmark.py: interrupted"
    )
    rows = [
        json.loads(line)
        for line in only(list(output.glob("benchmark_*.samples.jsonl"))).read_text().splitlines()
    ]
    assert 1 <= len(rows) < 40
    assert not list(output.glob("benchmark_*.json"))
