"""Hostile and mistaken inputs to every script: ONE line on stderr, exit status 2, no
traceback, and the result files already in --output_dir left exactly as they were.

Each case runs its script in a process of its own. Starting a Python interpreter that
imports torch and transformers takes seconds, so most cases run in a child forked from
this (already importing) test process, which then runs the script as ``__main__`` with its
own argv, standard streams and exit status; a few run in a fresh interpreter
(``python script.py``) to cover that path too.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
EXIT_ERROR = 2
# Lines a script may log besides its one error line: timestamped log records.
LOG_LINE_PREFIXES = ("INFO", "WARNING")


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


def _run_forked(
    script: str, argv: list[str], stdin: bytes | None, workdir: Path, timeout: float
) -> Completed:
    """Run ``script`` as ``__main__`` in a forked child, as ``python script ARGV`` would."""
    stdin_path, stdout_path, stderr_path = (workdir / name for name in ("in", "out", "err"))
    stdin_path.write_bytes(stdin or b"")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            os.chdir(REPOSITORY_ROOT)
            for fd, path, flags in (
                (0, stdin_path, os.O_RDONLY),
                (1, stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                (2, stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            ):
                opened = os.open(path, flags, 0o644)
                os.dup2(opened, fd)
                os.close(opened)
            sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8")  # noqa: SIM115
            if stdin is None:  # started with standard input closed, as with <&-
                os.close(0)
                sys.stdin = None
            sys.stdout = io.TextIOWrapper(
                open(1, "wb", closefd=False),  # noqa: SIM115
                encoding="utf-8",
                write_through=True,
            )
            sys.stderr = io.TextIOWrapper(
                open(2, "wb", closefd=False),  # noqa: SIM115
                encoding="utf-8",
                errors="backslashreplace",
                write_through=True,
            )
            sys.argv = [script, *argv]
            runpy.run_path(str(REPOSITORY_ROOT / script), run_name="__main__")
            code = 0
        except SystemExit as exit_request:
            status = exit_request.code
            code = status if isinstance(status, int) else (0 if status is None else 1)
        except BaseException:  # what the interpreter would print: a traceback, status 1
            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - nothing left to report to
                    pass
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{script} {argv} did not finish in {timeout} s")
        time.sleep(0.02)
    return Completed(
        os.waitstatus_to_exitcode(status),
        stdout_path.read_text(encoding="utf-8", errors="backslashreplace"),
        stderr_path.read_text(encoding="utf-8", errors="backslashreplace"),
    )


def run_script(
    script: str,
    argv: list[object],
    workdir: Path,
    stdin: bytes | None = b"",
    fresh_interpreter: bool = False,
    timeout: float = 300,
) -> Completed:
    """Run a script on ``argv`` (str() of each; bytes kept as they are) in a process of its
    own; ``stdin`` None: with standard input closed (forked runs only)."""
    arguments = [item if isinstance(item, bytes) else str(item) for item in argv]
    if fresh_interpreter:
        completed = subprocess.run(
            [sys.executable, script, *arguments],
            cwd=REPOSITORY_ROOT,
            input=stdin,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        return Completed(
            completed.returncode,
            completed.stdout.decode("utf-8", "backslashreplace"),
            completed.stderr.decode("utf-8", "backslashreplace"),
        )
    decoded = [os.fsdecode(item) if isinstance(item, bytes) else item for item in arguments]
    return _run_forked(script, decoded, stdin, workdir, timeout)


def assert_one_error_line(completed: Completed, script: str, fragment: str) -> str:
    """Exit 2; stderr is one ``<script>: error: ...`` line holding ``fragment``, with at most
    timestamped INFO/WARNING log records around it; no traceback."""
    stderr = completed.stderr
    assert completed.returncode == EXIT_ERROR, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(errors) == 1, stderr
    for line in stderr.splitlines():
        if not line.strip() or line in errors or re.search(r"\d+%\|", line):  # progress bars
            continue
        fields = line.split(" ", 2)
        assert len(fields) == 3 and fields[1] in LOG_LINE_PREFIXES, (
            f"stray line: {line!r}\n{stderr}"
        )
    assert fragment in errors[0], errors[0]
    return errors[0]


# --- fixtures ----------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


SWEEP_HEADER = (
    "generation_strategy,exit_layer,num_speculations,acceptance_rate,total_time,"
    "time_per_token,tokens_per_second,overall_tokens_per_second,tokens_per_step,speedup,"
    "num_samples,setting,overall_acceptance_rate"
)  # the previous version's header: read, and rewritten with this version's
SWEEP_COLUMNS = [*SWEEP_HEADER.split(","), "baseline_tokens_per_second"]
OVERALL_ACCEPTANCE = SWEEP_COLUMNS.index("overall_acceptance_rate")
SWEEP_ROWS = [
    "autoregressive,4,0,,0.02,0.008,125.0,125.0,1.0,1.0,2,abc123,",
    "self_speculative,1,1,1.0,0.02,0.007,130.0,130.0,2.0,1.04,2,abc123,1.0",
    "self_speculative,2,1,1.0,0.02,0.007,128.0,128.0,2.0,1.02,2,abc123,1.0",
]


@pytest.fixture()
def output_dir(tmp_path: Path) -> Path:
    """An --output_dir already holding the results of earlier runs."""
    directory = tmp_path / "logs"
    directory.mkdir()
    (directory / "benchmark_earlier.json").write_text(json.dumps({"metrics": {"x": 1.0}}) + "\n")
    (directory / "benchmark_earlier.samples.jsonl").write_text(
        "".join(json.dumps({"index": i, "prediction": "p"}) + "\n" for i in range(3))
    )
    (directory / "sweep.csv").write_text("\n".join([SWEEP_HEADER, *SWEEP_ROWS]) + "\n")
    return directory


def assert_results_intact(directory: Path, before: dict[str, str]) -> None:
    """The earlier results are byte for byte what they were, still valid, and nothing new
    (an empty samples file, a half-written document) was left behind."""
    assert _snapshot(directory) == before
    json.loads((directory / "benchmark_earlier.json").read_text())
    for line in (directory / "benchmark_earlier.samples.jsonl").read_text().splitlines():
        json.loads(line)
    rows = list(csv.reader((directory / "sweep.csv").open()))
    assert all(len(row) == 13 for row in rows)


def _copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def broken_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """Copies of the tiny 4-layer model, each broken in one way."""
    root = tmp_path_factory.mktemp("broken-models")
    models: dict[str, Path] = {}

    def variant(name: str) -> Path:
        models[name] = _copy_model(tiny_model_dir, root / name)
        return models[name]

    _edit_config(variant("more_layers"), num_hidden_layers=6)
    _edit_config(variant("fewer_layers"), num_hidden_layers=2)
    _edit_config(variant("other_shape"), intermediate_size=48)
    _edit_config(variant("other_vocab"), vocab_size=400)
    _edit_config(variant("zero_layers"), num_hidden_layers=0)
    weights = tiny_model_dir / "model.safetensors"
    data = weights.read_bytes()
    (variant("truncated") / "model.safetensors").write_bytes(data[: len(data) // 2])
    (variant("truncated_header") / "model.safetensors").write_bytes(data[:50])
    (variant("empty_weights") / "model.safetensors").write_bytes(b"")
    (variant("not_safetensors") / "model.safetensors").write_text("<html>404 Not Found</html>\n")
    broken_link = variant("broken_link") / "model.safetensors"
    broken_link.unlink()
    broken_link.symlink_to(root / "nowhere.safetensors")
    directory_weights = variant("directory_weights") / "model.safetensors"
    directory_weights.unlink()
    directory_weights.mkdir()
    (variant("no_weights") / "model.safetensors").unlink()
    unreadable = variant("unreadable") / "model.safetensors"
    unreadable.chmod(0)
    sharded = variant("missing_shard")
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    (variant("bad_json") / "config.json").write_text('{"model_type": "llama", ')
    (variant("no_config") / "config.json").unlink()
    (variant("list_config") / "config.json").write_text("[]")
    (variant("latin1_config") / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    (variant("bad_generation_config") / "generation_config.json").write_text("{oops")
    recommending = variant("text_exit_layer") / "generation_config.json"
    recommending.write_text(json.dumps({"exit_layer": "four", "num_speculations": 2}))
    _edit_config(variant("text_layer_count"), num_hidden_layers="4")
    (variant("broken_tokenizer") / "tokenizer.json").write_text('{"version": ')
    return models


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-data")
    files = {
        "good": b'{"prompt": "def add(a, b):", "response": " return a + b"}\n',
        "surrogate": b'{"prompt": "def f(\\ud800):", "response": "x"}\n',
        "latin1": b'{"prompt": "caf\xe9", "response": "x"}\n',
        "binary.py": b"\x7fELF\x00\x01\x02",
        "latin1.py": b"# caf\xe9\nx = 1\n",
        "latin1_text.jsonl": b'{"text": "caf\xe9"}\n',
        "surrogate_text.jsonl": b'{"text": "a\\udc80b"}\n',
        "text.py": b"def f(x):\n    return x + 1\n" * 4,
    }
    paths = {}
    for name, content in files.items():
        path = root / (name if "." in name else f"{name}.jsonl")
        path.write_bytes(content)
        paths[name] = path
    paths["a_file"] = root / "text.py"
    return paths


# --- the cases ---------------------------------------------------------------------------

GOOD = ["--dataset", "custom_jsonl", "--data_path", "DATA:good"]
REPORT = ["--data", "DATA:text.py", "--seq_len", 4, "--max_tokens", 8]

CASES = [
    # (id, script, arguments, fragment of the error line). MODEL:<variant> names a broken
    # copy of the tiny model, DATA:<name> a data file; --model defaults to the tiny model.
    # config.json against the weights
    ("more layers", "generate.py", ["--model", "MODEL:more_layers", "--prompt", "hi"],
     "config.json declares 6 decoder layers but the weights have none for layer(s) 4, 5"),
    ("fewer layers", "benchmark.py", ["--model", "MODEL:fewer_layers", *GOOD],
     "config.json declares 2 decoder layers but the weights also hold layer(s) 2, 3"),
    ("other shape", "generate.py", ["--model", "MODEL:other_shape", "--prompt", "hi"],
     "down_proj.weight has shape [32, 64] in the weights but config.json implies [32, 48]"),
    ("other vocab", "generate.py", ["--model", "MODEL:other_vocab", "--prompt", "hi"],
     "model.embed_tokens.weight has shape [320, 32] in the weights"),
    ("zero layers", "generate.py", ["--model", "MODEL:zero_layers", "--prompt", "hi"],
     "num_hidden_layers must be >= 1, got 0"),
    # weight files
    ("truncated weights", "generate.py", ["--model", "MODEL:truncated", "--prompt", "hi"],
     "model.safetensors is not a valid safetensors file"),
    ("truncated header", "benchmark.py", ["--model", "MODEL:truncated_header", *GOOD],
     "model.safetensors is not a valid safetensors file"),
    ("empty weights", "sweep.py", ["--model", "MODEL:empty_weights", *GOOD],
     "model.safetensors is not a valid safetensors file"),
    ("html weights", "correctness.py", ["--model", "MODEL:not_safetensors", *GOOD],
     "model.safetensors is not a valid safetensors file"),
    ("broken link", "generate.py", ["--model", "MODEL:broken_link", "--prompt", "hi"],
     "model.safetensors is a broken link"),
    ("weights are a directory", "generate.py",
     ["--model", "MODEL:directory_weights", "--prompt", "hi"], "is a directory, not a file"),
    ("no weights", "generate.py", ["--model", "MODEL:no_weights", "--prompt", "hi"],
     "holds no weights"),
    ("unreadable weights", "generate.py", ["--model", "MODEL:unreadable", "--prompt", "hi"],
     "model.safetensors: permission denied"),
    ("missing shard", "generate.py", ["--model", "MODEL:missing_shard", "--prompt", "hi"],
     "model-00002-of-00002.safetensors does not exist"),
    ("config not JSON", "eval.py", ["--model", "MODEL:bad_json", "--tasks", "layerskip_mc"],
     "config.json is not valid JSON (line 1"),
    ("no config", "generate.py", ["--model", "MODEL:no_config", "--prompt", "hi"],
     "has no config.json"),
    ("config a list", "generate.py", ["--model", "MODEL:list_config", "--prompt", "hi"],
     "config.json is not a JSON object"),
    ("config latin-1", "generate.py", ["--model", "MODEL:latin1_config", "--prompt", "hi"],
     "config.json is not a JSON text file (not UTF-8)"),
    ("generation config not JSON", "generate.py",
     ["--model", "MODEL:bad_generation_config", "--prompt", "hi"],
     "generation_config.json is not valid JSON"),
    ("exit layer as text", "generate.py", ["--model", "MODEL:text_exit_layer", "--prompt", "hi"],
     "generation_config.json: exit_layer must be a whole number >= 1, got 'four'"),
    ("layer count as text", "generate.py", ["--model", "MODEL:text_layer_count", "--prompt", "hi"],
     "config.json: Validation error for field 'num_hidden_layers'"),
    ("broken tokenizer", "generate.py", ["--model", "MODEL:broken_tokenizer", "--prompt", "hi"],
     "tokenizer.json is not valid JSON"),
    # --model_args, --device, --seed
    ("model_args unknown key", "generate.py", ["--prompt", "hi", "--model_args", "foo=1"],
     "--model_args: unknown key 'foo'"),
    ("model_args dtype", "benchmark.py", [*GOOD, "--model_args", '{"dtype": "float16"}'],
     "--model_args: 'dtype' is set by --dtype"),
    ("model_args device_map", "generate.py", ["--prompt", "hi", "--model_args", "device_map=cpu"],
     "'device_map' is set by --device"),
    ("model_args gguf_file", "generate.py", ["--prompt", "hi", "--model_args", "gguf_file=x"],
     "'gguf_file' is set by --model"),
    ("model_args more layers", "generate.py", ["--prompt", "hi", "--model_args", "num_hidden_layers=6"],
     "config.json with --model_args declares 6 decoder layers but the weights have none"),
    ("model_args other width", "generate.py", ["--prompt", "hi", "--model_args", "hidden_size=64"],
     "config.json with --model_args implies [320, 64]"),
    ("model_args mistyped field", "generate.py",
     ["--prompt", "hi", "--model_args", '{"rope_parameters": 5}'],
     "Validation error for field 'rope_parameters'"),
    ("unknown device", "generate.py", ["--prompt", "hi", "--device", "foo"],
     "unknown device 'foo' (valid here: cpu"),
    ("device type without device", "benchmark.py", [*GOOD, "--device", "mps"],
     "device 'mps' is not available"),
    ("absent GPU", "generate.py", ["--prompt", "hi", "--device", "cuda:64"], "cuda:64"),
    ("seed beyond 64 bits", "generate.py", ["--prompt", "hi", "--seed", 2**64 + 1],
     "--seed must be in [0, 4294967295]"),
    ("negative seed", "sweep.py", [*GOOD, "--seed", -1], "--seed must be in [0, 4294967295]"),
    # sampling settings
    ("tiny temperature", "generate.py", ["--prompt", "hi", "--sample", True, "--temperature", 1e-300],
     "temperature must be >= 0.0001 when sampling"),
    ("infinite temperature", "generate.py", ["--prompt", "hi", "--temperature", "inf"],
     "temperature must be a finite number, got inf"),
    ("nan temperature", "benchmark.py", [*GOOD, "--sample", False, "--temperature", "nan"],
     "temperature must be a finite number, got nan"),
    ("nan top_p", "generate.py", ["--prompt", "hi", "--top_p", "nan"],
     "top_p must be a finite number"),
    ("top_p above 1", "generate.py", ["--prompt", "hi", "--top_p", 1.5], "top_p must be in (0, 1]"),
    ("nan confidence", "generate.py", ["--prompt", "hi", "--draft_confidence_threshold", "nan"],
     "draft_confidence_threshold must be a finite number"),
    ("negative stop id", "generate.py", ["--prompt", "hi", "--stop_token_ids", -1],
     "stop_token_ids must be token ids (0 <= id < 2**62)"),
    ("stop id beyond vocab", "benchmark.py", [*GOOD, "--stop_token_ids", 1, 320],
     "--stop_token_ids: 320 is not a token id of this model (its vocabulary has ids 0..319)"),
    ("exit layer beyond model", "generate.py", ["--prompt", "hi", "--exit_layer", 9],
     "exit_layer must be in [1, 4] for this model, got 9"),
    ("drafts beyond the context", "generate.py",
     ["--prompt", "hi", "--generation_strategy", "self_speculative", "--exit_layer", 2,
      "--num_speculations", 10**9], "num_speculations must be below the model's context (256"),
    # checked before the weights load: this model's weights would be refused at load time
    ("needs an exit layer before loading", "generate.py",
     ["--model", "MODEL:more_layers", "--prompt", "hi", "--generation_strategy", "self_speculative"],
     "self_speculative needs --exit_layer (the model recommends none)"),
    ("exit layer checked before loading", "benchmark.py",
     ["--model", "MODEL:more_layers", *GOOD, "--exit_layer", 7], "exit_layer must be in [1, 6]"),
    ("negative max_steps", "generate.py", ["--prompt", "hi", "--max_steps", -3],
     "max_steps must be >= 1"),
    # eval.py
    ("negative num_fewshot", "eval.py", ["--tasks", "layerskip_mc", "--num_fewshot", -2],
     "--num_fewshot must be >= 0, got -2"),
    ("missing include_path", "eval.py",
     ["--tasks", "layerskip_mc", "--include_path", "/nonexistent/tasks"],
     "--include_path /nonexistent/tasks is not a directory"),
    ("nan limit", "eval.py", ["--tasks", "layerskip_mc", "--limit", "nan"], "--limit must be a number > 0"),
    ("fractional limit above 1", "eval.py", ["--tasks", "layerskip_mc", "--limit", 2.5],
     "--limit must be a whole number"),
    ("more shots than examples", "eval.py",
     ["--tasks", "layerskip_mc", "--limit", 1, "--num_fewshot", 10**5],
     "--num_fewshot 100000: a task has fewer examples to draw shots from"),
    ("request cache is a file", "eval.py", ["--tasks", "layerskip_mc", "--use_cache", "DATA:a_file"],
     "--use_cache must be a folder"),
    ("negative bootstrap", "eval.py", ["--tasks", "layerskip_mc", "--bootstrap_iters", -1],
     "--bootstrap_iters must be >= 0"),
    ("gen_kwargs without value", "eval.py", ["--tasks", "layerskip_mc", "--gen_kwargs", "max_gen_toks"],
     "--gen_kwargs: expected key=value"),
    ("gen_kwargs not a number", "eval.py", ["--tasks", "layerskip_mc", "--gen_kwargs", "temperature=hot"],
     "--gen_kwargs: temperature=hot is not a number"),
    ("sweep drafts beyond the context", "sweep.py", [*GOOD, "--num_speculations_last", 10**6],
     "--num_speculations_last must be below the model's context (256 tokens)"),
    ("loglikelihood exit beyond model", "eval.py",
     ["--tasks", "layerskip_mc", "--loglikelihood_exit_layer", 9],
     "loglikelihood exit layer must be in [1, 4] for this model, got 9"),
    # output paths
    ("output_dir is a file", "benchmark.py", [*GOOD, "--output_dir", "DATA:a_file"],
     "text.py is a file, not a directory"),
    ("output_dir under a file", "eval.py",
     ["--tasks", "layerskip_mc", "--output_dir", "DATA:a_file/sub"], "is a file, not a directory"),
    ("sweep output_file under a file", "sweep.py", [*GOOD, "--output_file", "DATA:a_file/s.csv"],
     "--output_file's folder"),
    ("sweep output_file is a directory", "sweep.py", [*GOOD, "--output_file", "OUTPUT"],
     "is a directory; --output_file must be a CSV file"),
    # text that is not UTF-8
    ("prompt argument not UTF-8", "generate.py", ["--prompt", b"caf\xe9"],
     "--prompt is not valid UTF-8 text (byte 0xe9 is not UTF-8"),
    ("JSONL lone surrogate", "benchmark.py", ["--dataset", "custom_jsonl", "--data_path", "DATA:surrogate"],
     "row 1: field 'prompt' is not valid UTF-8 text (lone surrogate \\ud800"),
    ("JSONL latin-1", "correctness.py",
     ["--dataset", "custom_jsonl", "--data_path", "DATA:latin1", "--exit_layer", 2, "--num_speculations", 2],
     "cannot read"),
    ("template not UTF-8", "benchmark.py", [*GOOD, "--template", b"\xff {message}"],
     "--template is not valid UTF-8 text"),
    ("stop word not UTF-8", "generate.py", ["--prompt", "hi", "--stop_words", b"\xff"],
     "stop_words is not valid UTF-8 text"),
    # layer_report.py
    ("report binary file", "layer_report.py", [*REPORT[2:], "--data", "DATA:binary.py"],
     "binary.py is a binary file (NUL byte at offset 4)"),
    ("report latin-1 code", "layer_report.py", [*REPORT[2:], "--data", "DATA:latin1.py"],
     "latin1.py is not UTF-8 text (byte 0xe9 at offset 5)"),
    ("report latin-1 JSONL", "layer_report.py", [*REPORT[2:], "--data", "DATA:latin1_text.jsonl"],
     "latin1_text.jsonl is not UTF-8 text"),
    ("report lone surrogate", "layer_report.py", [*REPORT[2:], "--data", "DATA:surrogate_text.jsonl"],
     "surrogate_text.jsonl:1: field 'text' is not valid UTF-8 text (lone surrogate \\udc80"),
    ("report unknown flag", "layer_report.py", [*REPORT, "--bogus", 1], "unrecognized arguments: --bogus"),
    ("report bad dtype", "layer_report.py", [*REPORT, "--dtype", "float8"], "unknown dtype 'float8'"),
    ("report negative seed", "layer_report.py", [*REPORT, "--seed", -4], "--seed must be in"),
    ("report truncated model", "layer_report.py", [*REPORT, "--model", "MODEL:truncated"],
     "not a valid safetensors file"),
    ("report output_dir is a file", "layer_report.py", [*REPORT, "--output_dir", "DATA:a_file"],
     "is a file, not a directory"),
]  # fmt: skip


def _substitute(argv: list, broken_models: dict, data_files: dict, output_dir: Path) -> list:
    substituted = []
    for item in argv:
        if isinstance(item, str) and item.startswith("MODEL:"):
            item = broken_models[item.removeprefix("MODEL:")]
        elif isinstance(item, str) and item.startswith("DATA:"):
            name, _, rest = item.removeprefix("DATA:").partition("/")
            item = data_files[name] / rest if rest else data_files[name]
        elif item == "OUTPUT":
            item = output_dir
        substituted.append(item)
    return substituted


@pytest.mark.parametrize(
    ("script", "argv", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0].replace(" ", "_") for case in CASES],
)
def test_bad_input_is_one_line(
    script: str,
    argv: list,
    fragment: str,
    tiny_model_dir: Path,
    broken_models: dict,
    data_files: dict,
    output_dir: Path,
    tmp_path: Path,
) -> None:
    if "permission denied" in fragment and os.geteuid() == 0:
        pytest.skip("root reads any file")
    arguments = _substitute(argv, broken_models, data_files, output_dir)
    if "--model" not in arguments:
        arguments = ["--model", tiny_model_dir, *arguments]
    if "--output_dir" not in arguments:
        arguments += ["--output_dir", output_dir]
    before = _snapshot(output_dir)
    completed = run_script(script, arguments, tmp_path)
    assert_one_error_line(completed, script, fragment)
    assert_results_intact(output_dir, before)


# --- sweep CSVs edited by hand or cut short -----------------------------------------------


def _sweep_arguments(tiny_model_dir: Path, data_files: dict, output_dir: Path) -> list:
    return [
        "--model", tiny_model_dir, "--dataset", "custom_jsonl", "--data_path", data_files["good"],
        "--max_steps", 3, "--sample", False, "--exit_layer_first", 1, "--exit_layer_last", 2,
        "--num_speculations_first", 1, "--num_speculations_last", 1, "--output_dir", output_dir,
    ]  # fmt: skip


HAND_EDITS = [
    # (id, how the third line (second row) is rewritten, fragment)
    ("non-integer exit layer", lambda row: row.replace(",1,1,", ",one,1,", 1),
     "line 3: exit_layer 'one' is not an integer"),
    ("fractional speculations", lambda row: row.replace(",1,1,", ",1,1.5,", 1),
     "line 3: num_speculations '1.5' is not an integer"),
    ("word for a number", lambda row: row.replace("130.0", "fast", 1),
     "line 3: tokens_per_second 'fast' is not a number"),
    ("missing field", lambda row: row.rsplit(",", 1)[0], "line 3: 12 fields, the header has 13"),
    ("unknown strategy", lambda row: "fast" + row.removeprefix("self_speculative"),
     "line 3: unknown generation_strategy 'fast'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "fragment"), [case[1:] for case in HAND_EDITS], ids=[case[0] for case in HAND_EDITS]
)
def test_hand_edited_sweep_csv_names_the_line(
    edit, fragment: str, tiny_model_dir: Path, data_files: dict, output_dir: Path, tmp_path: Path
) -> None:
    csv_path = output_dir / "sweep.csv"
    rows = list(SWEEP_ROWS)
    rows[1] = edit(rows[1])
    csv_path.write_text("\n".join([SWEEP_HEADER, *rows]) + "\n")
    before = csv_path.read_bytes()
    completed = run_script(
        "sweep.py", _sweep_arguments(tiny_model_dir, data_files, output_dir), tmp_path
    )
    assert_one_error_line(completed, "sweep.py", fragment)
    assert "fix or delete that line" in completed.stderr
    assert csv_path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"a,b\n1,2\n", "is not a sweep CSV (its header is not"),
        (SWEEP_HEADER.encode() + b"\n\xff\xfe,1\n", "is not a sweep CSV (not UTF-8 text"),
    ],
    ids=["other CSV", "binary CSV"],
)
def test_foreign_sweep_csv_is_refused(
    content: bytes,
    fragment: str,
    tiny_model_dir: Path,
    data_files: dict,
    output_dir: Path,
    tmp_path: Path,
) -> None:
    csv_path = output_dir / "sweep.csv"
    csv_path.write_bytes(content)
    completed = run_script(
        "sweep.py", _sweep_arguments(tiny_model_dir, data_files, output_dir), tmp_path
    )
    assert_one_error_line(completed, "sweep.py", fragment)
    assert csv_path.read_bytes() == content


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_sweep_output_file_that_is_not_a_regular_file_is_refused(
    kind: str, tiny_model_dir: Path, data_files: dict, output_dir: Path, tmp_path: Path
) -> None:
    """/dev/null failed at its first row (fsync) after the baseline ran; reading a FIFO
    waited forever."""
    target = Path("/dev/null") if kind == "device" else tmp_path / "pipe.csv"
    if kind == "fifo":
        os.mkfifo(target)
    arguments = [*_sweep_arguments(tiny_model_dir, data_files, output_dir), "--output_file"]
    completed = run_script("sweep.py", [*arguments, target], tmp_path, timeout=120)
    assert_one_error_line(completed, "sweep.py", f"{target} is not a regular file")


@pytest.mark.parametrize(
    ("script", "flag", "extra"),
    [
        ("benchmark.py", "--output_dir", []),
        ("generate.py", "--model", ["--prompt", "def"]),
        ("sweep.py", "--output_file", []),
        ("train.py", "--data", ["--preset", "tiny", "--max_tokens", "100"]),
    ],
)
def test_a_home_of_an_unknown_user_is_one_line(
    script: str, flag: str, extra: list, tmp_path: Path
) -> None:
    """pathlib's expanduser raises a RuntimeError for ~nosuchuser."""
    value = "~nosuchuser-layerskip/x"
    arguments = [*extra, flag, value]
    if flag != "--output_dir":
        arguments += ["--output_dir", tmp_path / "results"]
    completed = run_script(script, arguments, tmp_path)
    assert_one_error_line(completed, script, f"{flag} '{value}': '~nosuchuser-layerskip' names no")


def _sweep_table_of(data: bytes) -> list[list[str]]:
    return list(csv.reader(data.decode().splitlines()))[1:]


def _sweep_table(csv_path: Path) -> list[list[str]]:
    rows = list(csv.reader(csv_path.open(encoding="utf-8")))
    assert rows[0] == SWEEP_COLUMNS
    assert all(len(row) == len(SWEEP_COLUMNS) for row in rows), rows
    assert csv_path.read_bytes().endswith(b"\n")
    return rows[1:]


@pytest.mark.parametrize("cut", ["mid-row", "mid-header", "newline only", "last number"])
def test_sweep_resumes_from_a_csv_cut_short(
    cut: str, tiny_model_dir: Path, data_files: dict, tmp_path: Path
) -> None:
    """A kill during a write leaves an unfinished last line: the next run cuts it off and
    measures its point again, never glues a row onto it, and fills in the grid. A row cut
    inside its last number (baseline_tokens_per_second) still parses: it was kept, with the
    number cut short, and its point never measured again; a line without its newline is
    cut off whatever it holds."""
    output_dir = tmp_path / "logs"
    arguments = _sweep_arguments(tiny_model_dir, data_files, output_dir)
    first = run_script("sweep.py", arguments, tmp_path)
    assert first.returncode == 0, first.stderr
    csv_path = output_dir / "sweep.csv"
    whole = csv_path.read_bytes()
    assert len(_sweep_table(csv_path)) == 3  # baseline + (1, 1) + (2, 1)
    if cut == "mid-row":
        csv_path.write_bytes(whole[: whole.rstrip(b"\n").rfind(b"\n") + 30])
    elif cut == "mid-header":
        csv_path.write_bytes(whole[:25])
    elif cut == "last number":
        assert not whole.endswith(b",\n")  # the last row has a baseline rate
        csv_path.write_bytes(whole[:-3])
    else:
        csv_path.write_bytes(whole[:-1])

    second = run_script("sweep.py", arguments, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    rows = _sweep_table(csv_path)
    points = sorted((row[0], int(row[1]), int(row[2])) for row in rows)
    assert points == [
        ("autoregressive", 4, 0),
        ("self_speculative", 1, 1),
        ("self_speculative", 2, 1),
    ]
    assert "unfinished line, cut off" in second.stderr
    if cut in ("newline only", "last number"):
        assert "1 already in" in second.stderr  # the last point only is measured again
        overall = [float(row[OVERALL_ACCEPTANCE]) for row in rows if row[0] == "self_speculative"]
        assert overall == pytest.approx(
            [
                float(row[OVERALL_ACCEPTANCE])
                for row in _sweep_table_of(whole)
                if row[0] == "self_speculative"
            ]
        )


def test_sweep_csv_with_bom_and_blank_lines_is_resumed(
    tiny_model_dir: Path, data_files: dict, output_dir: Path, tmp_path: Path
) -> None:
    """What a spreadsheet or an editor leaves (a BOM, blank lines) is not an error."""
    csv_path = output_dir / "sweep.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbf" + "\n\n".join([SWEEP_HEADER, *SWEEP_ROWS]).encode() + b"\n\n"
    )
    completed = run_script(
        "sweep.py", _sweep_arguments(tiny_model_dir, data_files, output_dir), tmp_path
    )
    assert completed.returncode == 0, completed.stderr
    rows = [row for row in csv.reader(csv_path.open(encoding="utf-8-sig")) if row]
    assert len(rows) == 1 + 3 + 3 and all(len(row) == len(SWEEP_COLUMNS) for row in rows)


def test_jsonl_with_bom_is_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "notepad.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "def f():", "response": "x"}).encode())
    arguments = ["--model", tiny_model_dir, "--dataset", "custom_jsonl", "--data_path", data]
    arguments += ["--max_steps", 2, "--output_dir", tmp_path / "logs"]
    completed = run_script("benchmark.py", arguments, tmp_path)
    assert completed.returncode == 0, completed.stderr


# --- flags: whole names only, and --help says what they take -----------------------------

SCRIPTS = [
    "generate.py", "benchmark.py", "correctness.py", "sweep.py", "eval.py", "layer_report.py",
    "train.py",
]  # fmt: skip
ABBREVIATED = [
    # (script, good arguments, a prefix of one of the script's flags, a value for it)
    ("generate.py", ["--prompt", "hi"], "--max_step", 5),
    ("benchmark.py", GOOD, "--num_sample", 2),
    ("correctness.py", GOOD, "--num_sample", 2),
    ("sweep.py", GOOD, "--exit_layer_f", 1),
    ("eval.py", ["--tasks", "layerskip_mc"], "--lim", 2),
    ("layer_report.py", REPORT[:2], "--max_token", 8),
    # without a budget: the misspelt flag is named, not the budget its value would have set
    ("train.py", ["--preset", "tiny", "--data", "DATA:text.py"], "--max_token", 5),
]  # fmt: skip


@pytest.mark.parametrize(
    ("script", "argv", "prefix", "value"), ABBREVIATED, ids=[case[0] for case in ABBREVIATED]
)
def test_flag_prefix_is_an_unknown_flag(
    script: str, argv: list, prefix: str, value: object, tiny_model_dir: Path,
    data_files: dict, output_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """``--max_step`` is not taken for ``--max_steps``: one line naming it, exit status 2."""
    arguments = _substitute(
        [*argv, prefix, value, "--output_dir", output_dir], {}, data_files, output_dir
    )
    if script != "train.py":
        arguments = ["--model", tiny_model_dir, *arguments]
    before = _snapshot(output_dir)
    completed = run_script(script, arguments, tmp_path, timeout=60)
    line = assert_one_error_line(completed, script, f"unrecognized arguments: {prefix}")
    assert "(see --help)" in line
    assert_results_intact(output_dir, before)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_names_groups_and_defaults_once(script: str, tmp_path: Path) -> None:
    """``--help``: exit 0, groups titled for a user (not "GenerationArguments ['group1']"),
    no flag's default given twice."""
    completed = run_script(script, ["--help"], tmp_path, timeout=60)
    assert completed.returncode == 0, completed.stderr
    help_text = completed.stdout
    assert "usage: " + script in help_text
    assert "['" not in help_text and "Arguments" not in help_text, help_text
    assert "generation options" in help_text or script in ("layer_report.py", "train.py")
    flags = re.split(r"\n  (?=-)", help_text.split("\noptions:", 1)[1])
    for flag in flags:
        assert flag.count("(default") <= 1, flag


def test_train_help_lists_presets_and_an_unknown_one_is_one_line(tmp_path: Path) -> None:
    from self_speculation.training.presets import PRESETS

    completed = run_script("train.py", ["--help"], tmp_path, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert f"--preset {{{','.join(PRESETS)}}}" in completed.stdout
    completed = run_script(
        "train.py", ["--preset", "huge", "--data", "x", "--max_tokens", 10], tmp_path, timeout=60
    )
    assert_one_error_line(
        completed, "train.py", f"unknown preset 'huge' (choose from {', '.join(PRESETS)})"
    )


# --- the interactive loop and the fresh-interpreter path ---------------------------------


def test_interactive_session_survives_undecodable_stdin(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A prompt with bytes that are not UTF-8 fails alone, in one line; the session goes on
    (and its exit status says that a prompt failed)."""
    completed = run_script(
        "generate.py",
        ["--model", tiny_model_dir, "--max_steps", 2, "--sample", False, "--streamer", "none"],
        tmp_path,
        stdin=b"def add(a, b):\ncaf\xe9 \xff\xfe\nThe quick\n",
        fresh_interpreter=True,
    )
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "the prompt is not valid UTF-8 text (byte 0xe9" in errors[0]
    assert len(completed.stdout.splitlines()) == 2  # both good prompts were answered


def test_interactive_session_without_stdin_is_one_line(
    tiny_model_dir: Path, output_dir: Path, tmp_path: Path
) -> None:
    before = _snapshot(output_dir)
    completed = run_script(
        "generate.py", ["--model", tiny_model_dir, "--output_dir", output_dir], tmp_path, stdin=None
    )
    assert_one_error_line(completed, "generate.py", "no standard input to read prompts from")
    assert_results_intact(output_dir, before)


@pytest.mark.parametrize(
    ("script", "argv", "fragment"),
    [
        ("generate.py", ["--prompt", "hi", "--seed", 2**70], "--seed must be in"),
        ("benchmark.py", ["--model", "MODEL:more_layers", *GOOD], "declares 6 decoder layers"),
        ("layer_report.py", [*REPORT[2:], "--data", "DATA:binary.py"], "is a binary file"),
    ],
    ids=["generate", "benchmark", "layer_report"],
)
def test_fresh_interpreter_gives_the_same_one_line(
    script: str, argv: list, fragment: str, tiny_model_dir: Path, broken_models: dict,
    data_files: dict, output_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    arguments = _substitute(argv, broken_models, data_files, output_dir)
    if "--model" not in arguments:
        arguments = ["--model", tiny_model_dir, *arguments]
    before = _snapshot(output_dir)
    completed = run_script(
        script, [*arguments, "--output_dir", output_dir], tmp_path, fresh_interpreter=True
    )
    assert_one_error_line(completed, script, fragment)
    assert_results_intact(output_dir, before)


# --- the writers themselves ---------------------------------------------------------------


def test_rows_writer_never_touches_an_existing_file(tmp_path: Path) -> None:
    from self_speculation.benchmarking import JsonlWriter

    earlier = tmp_path / "run.samples.jsonl"
    earlier.write_text('{"index": 0}\n')
    with pytest.raises(FileExistsError):
        JsonlWriter(earlier)
    assert earlier.read_text() == '{"index": 0}\n'


def test_a_row_that_cannot_be_written_whole_is_cut_off_and_the_error_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from self_speculation import benchmarking
    from self_speculation.benchmarking import JsonlWriter, append_line

    path = tmp_path / "run.samples.jsonl"
    real_write = os.write
    full = {"disk": False}

    def write(descriptor: int, data: bytes) -> int:
        if full["disk"]:
            real_write(descriptor, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(benchmarking.os, "write", write)
    with JsonlWriter(path) as writer:
        writer.write({"index": 0, "prediction": "x" * 100})
        full["disk"] = True
        with pytest.raises(OSError, match="No space left") as raised:
            writer.write({"index": 1, "prediction": "y" * 100})
        assert raised.value.filename == str(path)
        full["disk"] = False
        writer.write({"index": 2})
    assert [row["index"] for row in map(json.loads, path.read_text().splitlines())] == [0, 2]

    monkeypatch.setattr(
        benchmarking.os, "fsync", lambda d: (_ for _ in ()).throw(OSError(22, "Invalid"))
    )
    with pytest.raises(OSError) as raised:
        append_line(tmp_path / "sweep.csv", "a,b")
    assert raised.value.filename == str(tmp_path / "sweep.csv")


@pytest.mark.parametrize(
    ("content", "complete", "after", "dropped"),
    [
        (b"h\nrow1\n", False, b"h\nrow1\n", None),  # whole: untouched
        (b"h\nrow1\nro", False, b"h\nrow1\n", "ro"),  # cut short: cut off
        (b"h\nrow1\nrow2", True, b"h\nrow1\nrow2\n", None),  # only the newline missing
        (b"hea", False, b"", "hea"),  # a header cut short
        (b"", False, b"", None),
    ],
    ids=["whole", "cut short", "newline missing", "header cut short", "empty"],
)
def test_repair_last_line(
    content: bytes, complete: bool, after: bytes, dropped: str | None, tmp_path: Path
) -> None:
    from self_speculation.benchmarking import append_line, repair_last_line

    path = tmp_path / "rows.csv"
    path.write_bytes(content)
    assert repair_last_line(path, is_complete=lambda line: complete) == dropped
    assert path.read_bytes() == after
    append_line(path, "next")
    assert path.read_bytes() == after + b"next\n"  # never glued onto a line
