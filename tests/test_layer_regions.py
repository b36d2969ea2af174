"""With LAYERSKIP_LAYER_REGIONS=1 compiled passes trace a decoder layer once and call it
for every layer like it (``model_surgery._layer_region``, torch's
``nested_compile_region``), instead of tracing and compiling every layer instance
((k + 1) E + L - E of them in a self-speculative step): the graphs dynamo hands the
backend are read here, for the number of layer calls and of distinct layer graphs. The
tokens are eager decoding's, with regions and without (the default), and eager decoding
writes each layer's cache through the same one-layer view (``LayerColumns``).

Traced with a recording backend on dynamo's eager one (seconds).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_engine_gpu
import torch
from tiny_models import make_tiny_model, make_tiny_tokenizer, save_tiny_model
from torch._dynamo.utils import counters

from self_speculation import GenerationConfig, Generator, model_surgery, precompiled
from self_speculation.kv_cache import LayerColumns
from self_speculation.passes import COMPILE_BACKEND_VARIABLE, compile_options, missing_compiler

pytestmark = pytest.mark.skipif(
    model_surgery._layer_region is model_surgery._layer_call,
    reason="this torch has no reusable nested_compile_region (torch < 2.12)",
)

GRAPHS: list[torch.fx.GraphModule] = []


@torch._dynamo.register_backend(name="layerskip_recording")
def _recording(graph: torch.fx.GraphModule, example_inputs: list) -> object:
    GRAPHS.append(graph)
    return graph.forward


@pytest.fixture(autouse=True)
def recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "layerskip_recording")
    monkeypatch.setattr(model_surgery, "_REGIONS_SETTING", "1")  # LAYERSKIP_LAYER_REGIONS=1
    GRAPHS.clear()


def _layer_calls(graph: torch.fx.GraphModule) -> tuple[int, int]:
    """(invoke_subgraph calls, distinct subgraphs they call) in ``graph``."""
    calls = [
        node
        for node in graph.graph.nodes
        if node.op == "call_function" and "invoke_subgraph" in str(node.target)
    ]
    return len(calls), len({node.args[1] for node in calls})  # the subgraph's identifier


PROMPTS = ["def f(x):", "import os\nimport sys", "class A:"]
CASES = [
    # family, strategy settings, layer calls per step, distinct layer graphs at most
    ("llama_gqa_tied", dict(generation_strategy="autoregressive"), 4, 1),
    # (k + 1) one-row calls of layers [0, E) (k drafts, then the last draft), then k + 1
    # rows through layers [E, L): (k + 1) E + L - E calls, two shapes
    (
        "llama_gqa_tied",
        dict(generation_strategy="self_speculative", exit_layer=2, num_speculations=3),
        4 * 2 + 2,
        2,
    ),
    # sliding and full attention layers take masks of their own
    ("gemma3_text", dict(generation_strategy="autoregressive"), 4, 2),
    (
        "qwen2_moe",
        dict(generation_strategy="self_speculative", exit_layer=1, num_speculations=2),
        3 * 1 + 3,
        2,
    ),
]


@pytest.mark.parametrize(
    ("family", "settings", "calls", "distinct"), CASES, ids=lambda value: str(value)[:40]
)
def test_a_compiled_step_traces_each_kind_of_layer_once(
    family: str, settings: dict, calls: int, distinct: int
) -> None:
    generator = Generator(make_tiny_model(family), make_tiny_tokenizer())
    eager = GenerationConfig(max_steps=12, sample=False, compile=False, **settings)
    compiled = dataclasses.replace(eager, compile=True)
    expected = [generator.generate(prompt, eager).token_ids for prompt in PROMPTS]
    assert [generator.generate(prompt, compiled).token_ids for prompt in PROMPTS] == expected
    assert generator.fast_path_fallback(compiled) is None
    step = max(GRAPHS, key=lambda graph: _layer_calls(graph)[0])
    traced_calls, traced_graphs = _layer_calls(step)
    assert traced_calls == calls
    assert 1 <= traced_graphs <= distinct


def test_without_regions_every_layer_is_traced_and_the_tokens_are_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default (LAYERSKIP_LAYER_REGIONS unset): each layer inline."""
    monkeypatch.setattr(model_surgery, "_REGIONS_SETTING", "")
    generator = Generator(make_tiny_model("llama_gqa_tied"), make_tiny_tokenizer())
    settings = dict(generation_strategy="self_speculative", exit_layer=2, num_speculations=3)
    eager = GenerationConfig(max_steps=12, sample=False, compile=False, **settings)
    compiled = dataclasses.replace(eager, compile=True)
    expected = [generator.generate(prompt, eager).token_ids for prompt in PROMPTS]
    assert [generator.generate(prompt, compiled).token_ids for prompt in PROMPTS] == expected
    assert GRAPHS and all(_layer_calls(graph) == (0, 0) for graph in GRAPHS)


def test_the_cpu_passes_call_regions_from_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's C++ wrapper cannot call a region: it is on only where regions are off."""
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "inductor")
    cpu = torch.device("cpu")
    assert "cpp_wrapper" not in compile_options(cpu)["options"]
    monkeypatch.setattr(model_surgery, "_REGIONS_SETTING", "")
    assert compile_options(cpu)["options"]["cpp_wrapper"] is True


def test_a_layer_asking_for_another_layers_cache_is_refused() -> None:
    """Eager decoding checks the index each layer's attention asks for (a compiled region
    cannot: the check would make every layer's traced code its own)."""
    keys, values = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4)
    view = LayerColumns(keys, values, torch.tensor([[3]]), layer_idx=1)
    new = torch.ones(1, 2, 1, 4)
    written, _ = view.update(new, 2 * new, 1)
    assert written[0, :, 3].eq(1).all() and values[0, :, 3].eq(2).all()
    assert keys[0, :, [0, 1, 2, 4, 5, 6, 7]].eq(0).all()
    with pytest.raises(RuntimeError, match="asked for cache layer 0, not its own 1"):
        view.update(new, new, 0)


def test_the_gpu_tests_region_case_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check's region test, its body on the CPU (so that it cannot rot unseen)."""
    gpu_test = test_engine_gpu.test_cuda_layer_regions_equal_eager_without_skipped_graphs
    gpu_test(monkeypatch, device="cpu")
    assert any(_layer_calls(graph)[0] for graph in GRAPHS)


def test_compile_time_compares_regions_with_unrolled_layers(tmp_path: Path) -> None:
    """benchmarks/compile_time.py --compare_regions True: both compile times per strategy,
    then both decoding speeds over the same tokens (dynamo's eager backend: seconds)."""
    # room for the first HumanEval prompt in the tiny tokenizer's tokens (312)
    model = save_tiny_model(tmp_path / "model", max_position_embeddings=512)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compile_time.py"
    env = {**os.environ, COMPILE_BACKEND_VARIABLE: "eager"}
    run = [sys.executable, str(script), "--model", str(model), "--exit_layer", "2"]
    run += ["--num_speculations", "2", "--compare_regions", "True", "--max_steps", "4"]
    finished = subprocess.run(
        [*run, "--decode_prompts", "1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.strip().splitlines()
    for strategy in ("autoregressive", "self_speculative"):
        assert any(
            line.startswith(f"{strategy}: compile with regions") and "unrolled" in line
            for line in lines
        )
        assert any(
            line.startswith(f"{strategy}: regions") and "same tokens" in line for line in lines
        )
    refused = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "compile_time.py: error: --compare_regions True times decoding: give --decode_prompts N"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not precompiled.available() or missing_compiler(torch.device("cpu")) is not None,
    reason="no passes kept on disk here",
)
def test_inductor_passes_with_regions_are_kept_on_disk_and_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With inductor (what users run), a pass whose layers are regions is saved, and a
    second Generator (as a second process would) loads it instead of tracing; the tokens
    are eager decoding's. (The eager backend cannot save such passes, aot_eager's do not
    load back: with those, they are compiled per process.)"""
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "inductor")
    monkeypatch.setenv(precompiled.DIRECTORY_VARIABLE, str(tmp_path))
    model = make_tiny_model("llama_gqa_tied", dtype=torch.float32)
    eager = GenerationConfig(max_steps=8, sample=False, compile=False)
    compiled = dataclasses.replace(eager, compile=True)
    first = Generator(model, make_tiny_tokenizer())
    expected = first.generate(PROMPTS[0], eager).token_ids
    assert first.generate(PROMPTS[0], compiled).token_ids == expected
    assert first.fast_path_fallback(compiled) is None
    assert list(tmp_path.glob("decode_step-*.pt2"))
    graphs = counters["stats"]["unique_graphs"]
    second = Generator(model, make_tiny_tokenizer())
    assert second.generate(PROMPTS[0], compiled).token_ids == expected
    assert counters["stats"]["unique_graphs"] == graphs  # loaded, not traced
    monkeypatch.setenv(COMPILE_BACKEND_VARIABLE, "eager")
    assert not Generator(model, make_tiny_tokenizer())._passes(compiled)._keep_on_disk
