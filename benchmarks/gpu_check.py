"""The GPU check in one command: the GPU tests, then ``benchmarks/engine.py`` on a random Llama
of Llama 3.2 1B's shape and on the shipped model, into one JSON document and one markdown
table.

    bash benchmarks/gpu_check.sh                    # CUDA, bf16: under 8 minutes on one H200
    bash benchmarks/gpu_check.sh --device cpu       # the same parts on a CPU (tiny Llama)
    bash benchmarks/gpu_check.sh --device cpu --quick True   # tiny sizes, traced only (CI)

Each part runs in its own process under a share of ``--time_budget``; a part that runs out
of time is stopped and marked ``timed_out`` (engine.py writes its JSON after every path,
so what it measured is kept), and the next part runs. Writes ``<output_dir>/gpu_check.json``
and ``<output_dir>/gpu_check.md``; the engine documents stay next to them.

What each engine run times (engine.py): ours eager and fast (compiled; CUDA graphs on CUDA),
autoregressive and self-speculative, one prompt at a time and in batches (1, 8, 32 on CUDA),
against transformers' greedy ``generate`` (dynamic cache; static cache + compile) and its
``assistant_early_exit``, with the weight-streaming floor from the bandwidth measured in the
same run (best of several measurements).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import simple_parsing

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

from arguments import run_main  # noqa: E402
from self_speculation import ConfigError  # noqa: E402
from self_speculation.benchmarking import write_json_atomic  # noqa: E402

# The engine's GPU tests: exactness, CUDA graphs captured and replayed, zero skips. (The
# training GPU tests, tests/test_train_gpu.py, run torchrun: `pytest -m gpu` runs them.)
GPU_TESTS = ["tests/test_engine_gpu.py"]


@dataclass
class CheckArguments:
    """What to check, where, and in how long."""

    device: str = "cuda"  # cuda or cpu
    output_dir: str = "logs/gpu_check"
    # Seconds for every part together (0: 480 on CUDA, 3600 on a CPU).
    time_budget: float = 0.0
    # torch.compile backend of the fast paths: inductor (what users run), or eager /
    # aot_eager (dynamo traces them, nothing is compiled: a quick check that they trace).
    compile_backend: str = "inductor"
    quick: bool = False  # the smallest sizes and the eager backend (the test suite's run)

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"--device must be cuda or cpu, got {self.device}")
        if self.time_budget < 0:
            raise ConfigError(f"--time_budget must be >= 0, got {self.time_budget}")
        if self.quick and self.compile_backend == "inductor":
            self.compile_backend = "eager"

    @property
    def budget(self) -> float:
        return self.time_budget or (480.0 if self.device == "cuda" else 3600.0)


@dataclass
class Part:
    """One command of the check and its share of the time budget."""

    name: str
    command: list[str]
    share: float  # fraction of the budget left when it starts (the last part: all of it)
    output: str | None = None  # the engine document it writes


def engine_runs(args: CheckArguments) -> list[tuple[str, list[str]]]:
    """(label, engine.py arguments) of the two engine runs."""
    common = ["--device", args.device, "--compile_backend", args.compile_backend]
    if args.device == "cuda":
        # Sized by the first run on an H200 (torch 2.11, 16 cores): each compiled pass shape
        # costs 18-40 s cold, a fast self-speculative path two of them (drafts, verify),
        # each batch size its own. So: every single-stream path and batches of 1 and 8 on
        # the 1B shape; then the shipped model's own paths as far as time allows.
        big = [
            "--model", "random-llama-1b", "--dtype", "bfloat16", "--num_prompts", "4",
            "--max_steps", "64", "--exit_layer", "4", "--num_speculations", "4",
            "--batch_sizes", "1", "8", "--batch_decoding", "eager", "fast",
            "--compile_smaller_batches", "False",
        ]  # fmt: skip
        shipped = [
            "--dtype", "bfloat16", "--num_prompts", "4", "--max_steps", "64",
            "--paths", "ours", "--skip_transformers", "True", "--batch_sizes", "1",
            "--trees", "2,1,1", "--adaptive", "True",
        ]  # fmt: skip
    elif args.quick:
        # Every path on the tiny Llama; the shipped model's eager paths (its fast paths
        # are the same code, and tracing its 16 layers for each pass takes a minute).
        big = [
            "--model", "random-llama-tiny", "--threads", "1", "--num_prompts", "1",
            "--max_steps", "4", "--exit_layer", "2", "--num_speculations", "2",
            "--batch_sizes", "1", "2", "--batch_decoding", "eager", "fast",
            "--compile_smaller_batches", "False",
        ]  # fmt: skip
        shipped = [
            "--threads", "1", "--num_prompts", "1", "--max_steps", "4", "--paths", "eager",
            "--batch_sizes", "1", "2", "--batch_decoding", "eager", "--trees", "2,1,1",
            "--adaptive", "True",
        ]  # fmt: skip
    else:
        big = [
            "--model", "random-llama-tiny", "--threads", "2", "--num_prompts", "2",
            "--max_steps", "16", "--exit_layer", "3", "--num_speculations", "3",
            "--batch_sizes", "1", "2", "--batch_decoding", "eager", "fast",
        ]  # fmt: skip
        shipped = [
            "--threads", "2", "--num_prompts", "2", "--max_steps", "16",
            "--batch_sizes", "1", "2", "--batch_decoding", "eager", "fast",
        ]  # fmt: skip
    big_label = "random-llama-1b" if args.device == "cuda" else "random-llama-tiny"
    return [(big_label, common + big), ("layerskip-stdlib", common + shipped)]


def plan(args: CheckArguments) -> list[Part]:
    out = Path(args.output_dir)
    python = sys.executable
    parts = [
        Part(
            "gpu tests",
            [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS],
            share=0.3,
        )
    ]
    runs = engine_runs(args)
    for index, (label, engine_args) in enumerate(runs):
        output = str(out / f"engine-{label}.json")
        parts.append(
            Part(
                f"engine {label}",
                [python, "benchmarks/engine.py", *engine_args, "--output", output],
                share=0.75 if index < len(runs) - 1 else 1.0,
                output=output,
            )
        )
    return parts


def run_part(part: Part, seconds: float, log: Path) -> dict:
    """Run ``part`` for at most ``seconds``; its output goes to ``log``."""
    started = time.perf_counter()
    with log.open("w") as stream:
        process = subprocess.Popen(
            part.command, cwd=REPOSITORY_ROOT, stdout=stream, stderr=subprocess.STDOUT
        )
        try:
            returncode = process.wait(timeout=max(seconds, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            returncode, timed_out = None, True
    lines = log.read_text(errors="replace").strip().splitlines()
    return {
        "name": part.name,
        "command": " ".join(part.command),
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - started,
        "time_limit_seconds": seconds,
        "log": str(log),
        "last_line": lines[-1] if lines else "",
    }


def device_info(device: str) -> dict:
    info = {"platform": platform.platform(), "load_average_1min": os.getloadavg()[0]}
    if device == "cuda" and shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        result = subprocess.run(query, capture_output=True, text=True, timeout=30)
        info["gpus"] = result.stdout.strip().splitlines()
    return info


def _blank(value) -> str:
    return "-" if value is None else str(value)


def markdown_table(document: dict) -> str:
    """The check's results as markdown: the parts, then per model its paths and batches."""
    lines = [
        f"# GPU check ({document['device']}, compile backend {document['compile_backend']})",
        "",
        "| part | status | seconds |",
        "|---|---|---|",
    ]
    for part in document["parts"]:
        status = (
            "timed out"
            if part["timed_out"]
            else ("ok" if part["returncode"] == 0 else f"exit {part['returncode']}")
        )
        lines.append(f"| {part['name']} | {status}: {part['last_line']} | {part['seconds']:.0f} |")
    for label, engine in document["engine"].items():
        if engine is None:
            lines += ["", f"## {label}: no results"]
            continue
        bandwidth = engine.get("bandwidth_bytes_per_second", 0) / 1e9
        measurements = len(engine.get("bandwidth_measurements_bytes_per_second", []))
        arguments = engine["arguments"]
        lines += [
            "",
            f"## {label} ({arguments['dtype']}, {arguments['num_prompts']} prompts, "
            f"{arguments['max_steps']} tokens, E={arguments['exit_layer']}, "
            f"k={arguments['num_speculations']})",
            "",
            f"Weight floor {engine['floor_ms_per_token']:.3f} ms/token: "
            f"{engine['weight_bytes_per_token'] / 1e6:.1f} MB per token at {bandwidth:.1f} GB/s "
            f"(best of {measurements} measurements in the run).",
            "",
            "| path | tok/s | ms/token | x floor | compile s | same tokens as the first path "
            "| self-speculation = its kind's autoregressive |",
            "|---|---|---|---|---|---|---|",
        ]
        floor = engine["floor_ms_per_token"]
        for path in engine.get("paths", []):
            lines.append(
                f"| {path['name']} | {path['tokens_per_second']:.1f} | "
                f"{path['ms_per_token']:.2f} | {path['ms_per_token'] / floor:.1f} | "
                f"{path['compile_or_first_call_seconds']:.1f} | "
                f"{path['identical_to_first_path']} | "
                f"{_blank(path.get('identical_to_same_kind_autoregressive'))} |"
            )
        if engine.get("batch"):
            lines += [
                "",
                "| batch | decoding | strategy | tok/s | acceptance | compile s |",
                "|---|---|---|---|---|---|",
            ]
            for row in engine["batch"]:
                acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
                lines.append(
                    f"| {row['batch_size']} | {row['decoding']} | {row['path']} | "
                    f"{row['tokens_per_second']:.1f} | {acceptance} | "
                    f"{row['compile_seconds']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = simple_parsing.parse(
        CheckArguments, args=argv, add_option_string_dash_variants=False, allow_abbrev=False
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    document: dict = {
        "device": args.device,
        "compile_backend": args.compile_backend,
        "arguments": dataclasses.asdict(args),
        "environment": device_info(args.device),
        "time_budget_seconds": args.budget,
        "parts": [],
        "engine": {},
    }
    json_path, table_path = out / "gpu_check.json", out / "gpu_check.md"
    deadline = time.perf_counter() + args.budget
    for part in plan(args):
        left = deadline - time.perf_counter()
        seconds = left * part.share
        print(f"gpu_check: {part.name} (at most {seconds:.0f} s)", flush=True)
        log = out / f"{part.name.replace(' ', '-')}.log"
        result = run_part(part, seconds, log)
        document["parts"].append(result)
        print(f"gpu_check: {part.name}: {result['last_line']}", flush=True)
        if part.output is not None:
            label = part.name.removeprefix("engine ")
            path = Path(part.output)
            document["engine"][label] = json.loads(path.read_text()) if path.exists() else None
        write_json_atomic(str(json_path), document)
        table_path.write_text(markdown_table(document))
    document["environment"]["load_average_1min_end"] = os.getloadavg()[0]
    write_json_atomic(str(json_path), document)
    table_path.write_text(markdown_table(document))
    print(table_path.read_text())
    print(f"gpu_check: wrote {json_path} and {table_path}")
    failed = [p["name"] for p in document["parts"] if p["timed_out"] or p["returncode"] != 0]
    if failed:
        print(f"gpu_check: did not finish cleanly: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main, prog="gpu_check.py")
