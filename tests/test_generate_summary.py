"""generate.py shows what self-speculation did in one line after the answer, and records the
decoding path that actually ran (after compiling), with compile time kept out of tokens/s."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

from self_speculation.passes import COMPILE_BACKEND_VARIABLE


def argv(model: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--prompt", "def fibonacci(n):", "--streamer", "none",
        "--generation_strategy", "self_speculative", "--exit_layer", "2",
        "--num_speculations", "3", "--sample", "False", "--max_steps", "12",
        "--output_dir", str(output), *extra,
    ]  # fmt: skip


def summary_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("self-spec")]


def test_one_line_says_what_self_speculation_did(
    tiny_model_dir: Path, tmp_path: Path, caplog, capsys
) -> None:
    generate = importlib.import_module("generate")
    caplog.set_level(logging.INFO, logger="generate")
    assert generate.main(argv(tiny_model_dir, tmp_path)) == 0
    (line,) = summary_lines(caplog)
    assert "drafted" in line and "accepted" in line and "tokens per full-model pass" in line
    assert "--compare_autoregressive True" in line  # where the speedup is shown

    caplog.clear()
    assert generate.main(argv(tiny_model_dir, tmp_path, "--compare_autoregressive", "True")) == 0
    (line,) = summary_lines(caplog)
    assert "x plain decoding" in line and "same tokens" in line
    document = json.loads(sorted(tmp_path.glob("generate_*.json"))[-1].read_text())
    assert document["environment"]["decoding_path"] == "eager"
    assert capsys.readouterr().out.strip()


def test_compiled_run_records_the_fast_path_after_compiling(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The document says "fast" (it said "eager", written before anything compiled), and
    the answer's time excludes compiling (compiled on the prompt first, untimed)."""
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")  # traced, not built: seconds
    generate = importlib.import_module("generate")
    caplog.set_level(logging.INFO)
    assert generate.main(argv(tiny_model_dir, tmp_path, "--compile", "True")) == 0
    document = json.loads(only(tmp_path.glob("generate_*.json")).read_text())
    environment = document["environment"]
    assert environment["decoding_path"] == "fast (torch.compile)"
    assert environment["compile_seconds"] > 0
    (answer,) = document["prompts"]
    assert answer["total_time"] < environment["compile_seconds"] or answer["total_time"] < 5
    messages = [record.getMessage() for record in caplog.records]
    first_compile = next(i for i, m in enumerate(messages) if " pass (" in m)  # passes.py
    assert any("compiling the fast path" in m for m in messages[:first_compile])


def only(paths) -> Path:
    (path,) = list(paths)
    return path


def test_result_files_say_eager_when_a_compiled_pass_fell_back(monkeypatch) -> None:
    """benchmark.py, sweep.py and correctness.py recorded "fast" whenever something had
    compiled, even after a later pass fell back to eager decoding (eager speeds, reported
    as the fast path's)."""
    from tiny_models import make_tiny_model, make_tiny_tokenizer

    from self_speculation import GenerationConfig, Generator
    from self_speculation.benchmarking import environment_info
    from self_speculation.distributed import DistributedContext

    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    config = GenerationConfig(sample=False, max_steps=4, compile=True)
    generator.generate("def f", config)
    assert environment_info(generator, DistributedContext())["decoding_path"] == (
        "fast (torch.compile)"
    )
    generator._passes(config)._fall_back("a later shape failed to compile")
    path = environment_info(generator, DistributedContext())["decoding_path"]
    assert path == "eager (fast path off: a later shape failed to compile)"


def test_compared_plain_decoding_does_the_streamers_work_without_printing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """--compare_autoregressive timed the self-speculative answer with its streamer and plain
    decoding without one, so the speedup line charged the streaming to one side only."""
    generate = importlib.import_module("generate")
    seen = []
    original = generate.Generator.generate

    def recording(self, prompt, config, streamer=None, *args, **kwargs):
        seen.append((config.generation_strategy.value, type(streamer).__name__))
        return original(self, prompt, config, streamer, *args, **kwargs)

    monkeypatch.setattr(generate.Generator, "generate", recording)
    arguments = argv(tiny_model_dir, tmp_path, "--compare_autoregressive", "True")
    arguments[arguments.index("none")] = "standard"
    assert generate.main(arguments) == 0
    assert seen == [("self_speculative", "TextStreamer"), ("autoregressive", "TextStreamer")]
    out = capsys.readouterr().out
    assert out.strip() and out.count(out.strip().splitlines()[0]) == 1  # the answer once


def test_adaptive_drafting_does_not_name_one_exit_as_the_drafter(
    tiny_model_dir: Path, tmp_path: Path, caplog
) -> None:
    """With several exits, each step drafts from its own: the line named only the first
    (``layers [0, 2) drafted``) beside a label listing all of them."""
    generate = importlib.import_module("generate")
    caplog.set_level(logging.INFO, logger="generate")
    extra = ("--generation_strategy", "adaptive", "--adaptive_exit_layers", "1", "3")
    assert generate.main(argv(tiny_model_dir, tmp_path, *extra)) == 0
    (line,) = [r.getMessage() for r in caplog.records if "drafted" in r.getMessage()]
    assert "from exits 1,2,3" in line and "the early exits drafted" in line
    assert "layers [0," not in line
