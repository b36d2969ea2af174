"""The fastest a batched step could be on this machine: each product at its best rate.

A decoding step of a Llama-shaped model is, arithmetically, its linear products (seven
per layer, and the head) and its attention products. This script times each product of
one step in isolation, at the step's exact shapes, on the faster of BLAS
(``torch.nn.functional.linear``) and the few-row kernel (``cpu_kernels``), best of
``--repeats``, and adds them up; norms, rotary, masks, softmax, cache writes and the
decoding loop count as free. That sum bounds a step's pass time from below. A second
timing runs the step's products back to back on each layer's own weights and cache
buffers (``StepSequence``): weights then come from memory as in a real step, which the
first timing, repeating one product, never sees; the larger of the two is the bound.

With an ``engine.py`` result (``--engine_json``), it bounds that run's batched
self-speculation: its prefill (the first B prompts, padded) and its row-steps at their
products' best time, everything else free, against the issue's targets (4x the run's
batch-1 self-speculation, 1.2x its batch-B autoregressive decoding, measured or bounded
the same way), and says how many tokens a row-step would have to yield to reach each
(and the draft acceptance rate that would give them).

    python benchmarks/batch_bound.py --engine_json logs/engine-batch-shedding.json
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import simple_parsing
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from self_speculation import ConfigError, load_model_and_tokenizer  # noqa: E402
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.cpu_kernels import MAX_ROWS, load_few_row_kernel  # noqa: E402
from self_speculation.errors import json_refusal, require_thread_count, whole_number  # noqa: E402
from self_speculation.output_safety import check_output_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import DEFAULT_MODEL, human_eval_prompts  # noqa: E402

logger = logging.getLogger("batch_bound")


@dataclass
class BoundArguments:
    """The model, step shapes and (optionally) the engine run to bound."""

    model: str = DEFAULT_MODEL
    batch_size: int = 8
    exit_layer: int = 5
    num_speculations: int = 5
    # Cache columns a step's attention reads. Default: with --engine_json, the mean a step
    # of the run needs (the padded prompts + half the new tokens; the engine reads the
    # whole capacity, so this bound is below it); otherwise 287 (the shipped model's
    # batch-8 capacity for 128 tokens).
    columns: int | None = None
    engine_json: str | None = None  # an engine.py result with batch rows to bound
    repeats: int = 200
    output: str | None = None  # write the bound (and the run's, with --engine_json) as JSON
    threads: int = 2  # 0: torch's default

    def __post_init__(self) -> None:
        for flag, value, most in (
            ("--batch_size", self.batch_size, 1024),
            ("--exit_layer", self.exit_layer, None),
            ("--num_speculations", self.num_speculations, 64),
            ("--columns", 1 if self.columns is None else self.columns, None),  # and the context
            ("--repeats", self.repeats, 100_000),
        ):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
            if most is not None and value > most:
                raise ConfigError(f"{flag} must be at most {most}, got {value}")
        require_thread_count(self.threads, "--threads")
        if self.engine_json is not None and not Path(self.engine_json).is_file():
            raise ConfigError(f"--engine_json: no such file: {self.engine_json}")
        if self.output is not None:  # ~ expanded
            self.output = str(
                check_output_file(self.output, "batch_bound", ("arguments", "step_seconds"))
            )


def best_seconds(function, repeats: int) -> float:
    """The fastest of ``repeats`` calls (after three warm-up calls)."""
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


class ProductTimer:
    """Best time of ``x @ w.T`` for each (rows, weight) shape, over the backends."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.kernel = load_few_row_kernel()
        self.cache: dict[tuple, float] = {}
        self.fastest: dict[tuple, object] = {}  # (rows, out, in) -> the faster backend

    def linear(self, rows: int, weight: torch.Tensor) -> float:
        key = ("linear", rows, *weight.shape)
        if key not in self.cache:
            x = torch.randn(rows, weight.shape[1])
            backends = [torch.nn.functional.linear]
            if self.kernel and rows <= MAX_ROWS:
                backends.append(torch.ops.layerskip.few_row_linear)
            times = [
                best_seconds(lambda backend=backend: backend(x, weight), self.repeats)
                for backend in backends
            ]
            self.cache[key] = min(times)
            self.fastest[key] = backends[times.index(min(times))]
        return self.cache[key]

    def backend(self, rows: int, weight: torch.Tensor):
        """The faster backend for this shape (timing it first if needed)."""
        self.linear(rows, weight)
        key = ("linear", rows, *weight.shape)
        return self.fastest[key]

    def attention(self, batch: int, kv_heads: int, queries: int, columns: int, dim: int):
        """The two products of grouped attention: scores, then the weighted values."""
        key = ("attention", batch, kv_heads, queries, columns, dim)
        if key not in self.cache:
            q = torch.randn(batch * kv_heads, queries, dim)
            k = torch.randn(batch * kv_heads, dim, columns)
            p = torch.randn(batch * kv_heads, queries, columns)
            v = torch.randn(batch * kv_heads, columns, dim)
            self.cache[key] = best_seconds(lambda: torch.bmm(q, k), self.repeats) + best_seconds(
                lambda: torch.bmm(p, v), self.repeats
            )
        return self.cache[key]


def layer_weights(model) -> list[list[torch.Tensor]]:
    """The seven product weights of each decoder layer ([out, in] each), layer by layer.

    Raises:
        ConfigError: the layers have other projections than a Llama's.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    head = getattr(model, "lm_head", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers) or head is None:
        raise ConfigError("batch_bound.py times Llama-shaped decoders (model.layers, lm_head)")
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    names += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    all_weights = []
    for layer in layers:
        weights = []
        for name in names:
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(getattr(module, "weight", None), torch.Tensor):
                raise ConfigError(
                    f"the model's layers have no {name} (batch_bound.py times Llama-shaped layers)"
                )
            weights.append(module.weight.detach())
        all_weights.append(weights)
    return all_weights


def attention_shape(config) -> tuple[int, int, int]:
    """(KV heads, query heads per KV head, head size) of a Llama-shaped config."""
    kv_heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, config.num_attention_heads // kv_heads, dim


def step_bounds(model, args: BoundArguments, timer: ProductTimer) -> dict[str, float]:
    """Seconds of products in one autoregressive and one self-speculative step."""
    config = model.config
    weights = layer_weights(model)[0]
    head = model.lm_head.weight.detach()
    kv_heads, groups, dim = attention_shape(config)
    layers, batch, exit_layer, k = (
        config.num_hidden_layers,
        args.batch_size,
        args.exit_layer,
        args.num_speculations,
    )

    def layer(rows_per_sequence: int) -> float:
        rows = batch * rows_per_sequence
        products = sum(timer.linear(rows, weight) for weight in weights)
        attention = timer.attention(batch, kv_heads, groups * rows_per_sequence, args.columns, dim)
        return products + attention

    one, verified = layer(1), layer(k + 1)
    head_one, head_verified = timer.linear(batch, head), timer.linear(batch * (k + 1), head)
    autoregressive = layers * one + head_one
    drafts = k * (exit_layer * one + head_one)
    verification = exit_layer * one + (layers - exit_layer) * verified + head_verified
    return {
        "autoregressive_step": autoregressive,
        "self_speculative_drafts": drafts,
        "self_speculative_verification": verification,
        "self_speculative_step": drafts + verification,
        "layer_one_position": one,
        "layer_verified_positions": verified,
    }


class StepSequence:
    """A step's products back to back, in the step's order, on each layer's own weights
    and its own cache buffers: what the step reads comes from memory as it does in a real
    step, not from a CPU cache that one product repeated ``--repeats`` times keeps warm
    (the shipped model's weights and a batch's caches are several times the L3 cache).

    Each product runs on its faster backend (``ProductTimer``). The Python and dispatch
    cost of the calls is measured on one-element operands and taken off, so the result
    is still a lower bound on a step that makes these products.
    """

    def __init__(self, model, args: BoundArguments, timer: ProductTimer) -> None:
        self.weights = layer_weights(model)
        self.head = model.lm_head.weight.detach()
        self.args, self.timer = args, timer
        self.kv_heads, self.groups, self.dim = attention_shape(model.config)
        rows = args.batch_size * self.kv_heads
        self.caches = [
            (torch.randn(rows, self.dim, args.columns), torch.randn(rows, args.columns, self.dim))
            for _ in self.weights
        ]  # keys (transposed) and values of each layer
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}

    def _input(self, rows: int, width: int) -> torch.Tensor:
        if (rows, width) not in self.inputs:
            self.inputs[rows, width] = torch.randn(rows, width)
        return self.inputs[rows, width]

    def _calls(self, first: int, end: int, positions: int, head: bool) -> list:
        """(function, operands) of layers [first, end) at ``positions`` per row (+ head)."""
        batch = self.args.batch_size
        rows = batch * positions
        queries = self._input(batch * self.kv_heads, self.groups * positions * self.dim)
        queries = queries.view(batch * self.kv_heads, self.groups * positions, self.dim)
        calls = []
        for layer in range(first, end):
            for weight in self.weights[layer]:
                backend = self.timer.backend(rows, weight)
                calls.append((backend, (self._input(rows, weight.shape[1]), weight)))
            keys, values = self.caches[layer]
            scores = self._input(batch * self.kv_heads, self.groups * positions * keys.shape[2])
            scores = scores.view(batch * self.kv_heads, self.groups * positions, keys.shape[2])
            calls += [(torch.bmm, (queries, keys)), (torch.bmm, (scores, values))]
        if head:
            backend = self.timer.backend(rows, self.head)
            calls.append((backend, (self._input(rows, self.head.shape[1]), self.head)))
        return calls

    def _seconds(self, calls: list) -> float:
        def run() -> None:
            for function, operands in calls:
                function(*operands)

        one = torch.ones(1, 1)

        def dispatch() -> None:
            for _ in calls:
                torch.nn.functional.linear(one, one)

        repeats = max(3, self.args.repeats // 10)
        return max(0.0, best_seconds(run, repeats) - best_seconds(dispatch, repeats))

    def bounds(self, model) -> dict[str, float]:
        """Seconds of one autoregressive and one self-speculative step, sequenced."""
        layers = model.config.num_hidden_layers
        exit_layer, k = self.args.exit_layer, self.args.num_speculations
        autoregressive = self._calls(0, layers, 1, head=True)
        drafts = k * self._calls(0, exit_layer, 1, head=True)
        verification = self._calls(0, exit_layer, 1, head=False)
        verification += self._calls(exit_layer, layers, k + 1, head=True)
        return {
            "sequenced_autoregressive_step": self._seconds(autoregressive),
            "sequenced_self_speculative_step": self._seconds(drafts + verification),
        }


def prefill_bound(model, widths: list[int], args: BoundArguments, timer: ProductTimer) -> float:
    """Seconds of products in the prefills of batches padded to ``widths`` (each of
    ``--batch_size`` rows): every layer's products over all positions, causal attention
    over the prompt, the head at the last position."""
    config = model.config
    weights = layer_weights(model)[0]
    kv_heads, groups, dim = attention_shape(config)
    total = 0.0
    for width in widths:
        rows = args.batch_size * width
        products = sum(timer.linear(rows, weight) for weight in weights)
        # Causal: half the score matrix is needed; price half of the full products.
        attention = timer.attention(args.batch_size, kv_heads, groups * width, width, dim) / 2
        total += config.num_hidden_layers * (products + attention)
        total += timer.linear(args.batch_size, model.lm_head.weight.detach())
    return total


def _same(name: str, measured: object, given: object) -> bool:
    """Whether an engine run's setting is ours (model directories compare as paths)."""
    if measured == given:
        return True
    if name != "model" or not isinstance(measured, str):
        return False
    return Path(measured).is_dir() and Path(measured).resolve() == Path(str(given)).resolve()


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def batch_rows(engine: dict, batch: int) -> dict[tuple[int, str], dict]:
    """The engine result's batch rows by (batch size, path), checked for what the bound
    needs: both strategies at ``batch``, self-speculation at batch 1."""
    found = engine.get("batch")
    rows = {
        (row.get("batch_size"), row.get("path")): row
        for row in (found if isinstance(found, list) else [])
        if isinstance(row, dict)
    }
    needed = [(batch, "autoregressive"), (batch, "self_speculative"), (1, "self_speculative")]
    fields = ("row_steps", "tokens", "seconds", "tokens_per_second")
    missing = [
        key for key in needed if not all(_finite(rows.get(key, {}).get(name)) for name in fields)
    ]
    if missing:
        raise ConfigError(
            f"--engine_json has no batch rows with step counts for {missing} "
            f"(run engine.py with --batch_sizes 1 {batch})"
        )
    return rows


def bound_run(engine: dict, bounds: dict[str, float], batch: int, prefill: float) -> dict:
    """The fastest the engine run's batched self-speculation (and autoregressive
    decoding) could be: its prefill and its row-steps at their products' best time,
    everything else free.

    A row-step (one row through one step) is priced at the full batch's per-row cost,
    the cheapest per row (smaller batches, to which a batch shrinks as rows finish, cost
    more per row), so this is a lower bound on the time and an upper bound on the speed.
    """
    rows = batch_rows(engine, batch)
    autoregressive, speculative = rows[batch, "autoregressive"], rows[batch, "self_speculative"]
    # Both timings bound a step from below; the larger is the tighter bound.
    speculative_step = max(
        bounds["self_speculative_step"], bounds.get("sequenced_self_speculative_step", 0.0)
    )
    autoregressive_step = max(
        bounds["autoregressive_step"], bounds.get("sequenced_autoregressive_step", 0.0)
    )
    steps_seconds = speculative["row_steps"] * speculative_step / batch
    best = speculative["tokens"] / (prefill + steps_seconds)
    # The same bound for autoregressive decoding: the ratio the arithmetic alone allows.
    autoregressive_seconds = autoregressive["row_steps"] * autoregressive_step / batch
    best_autoregressive = autoregressive["tokens"] / (prefill + autoregressive_seconds)
    # The last target holds autoregressive decoding to its own bound too: the two
    # strategies share every pass's machinery, so what makes one faster serves both.
    targets = {
        "4x_batch1": 4 * rows[1, "self_speculative"]["tokens_per_second"],
        "1.2x_autoregressive": 1.2 * autoregressive["tokens_per_second"],
        "1.2x_autoregressive_bound": 1.2 * best_autoregressive,
    }
    needed = {
        f"needed_tokens_per_row_step_{name}": needed_tokens_per_row_step(
            speculative["tokens"], target, prefill, speculative_step / batch
        )
        for name, target in targets.items()
    }
    return {
        "measured_autoregressive_tok_s": autoregressive["tokens_per_second"],
        "measured_self_speculative_tok_s": speculative["tokens_per_second"],
        "measured_batch1_self_speculative_tok_s": rows[1, "self_speculative"]["tokens_per_second"],
        "prefill_products_seconds": prefill,
        "steps_products_seconds": steps_seconds,
        "measured_seconds": speculative["seconds"],
        "bound_self_speculative_tok_s": best,
        "bound_autoregressive_tok_s": best_autoregressive,
        "bound_ratio": best / best_autoregressive,
        "target_4x_batch1_tok_s": targets["4x_batch1"],
        "target_1.2x_autoregressive_tok_s": targets["1.2x_autoregressive"],
        "row_steps": speculative["row_steps"],
        "tokens_per_row_step": speculative["tokens"] / speculative["row_steps"],
        **needed,
    }


def needed_tokens_per_row_step(
    tokens: float, target: float, prefill: float, row_step_seconds: float
) -> float:
    """Tokens each row-step must yield for the bound to reach ``target`` tok/s: with
    T per row-step the run takes prefill + tokens / T * row_step_seconds. Infinite when
    the prefill alone takes longer than the target allows."""
    spare = tokens / target - prefill
    return tokens * row_step_seconds / spare if spare > 0 else math.inf


def acceptance_for(tokens_per_step: float, k: int) -> float:
    """The draft acceptance rate a (each draft kept with probability a, independently)
    at which a step of k drafts yields ``tokens_per_step`` on average:
    (1 - a^(k+1)) / (1 - a). Infinite beyond k + 1 (no acceptance gives that)."""
    if tokens_per_step > k + 1:
        return math.inf
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(middle**i for i in range(k + 1)) < tokens_per_step:
            low = middle
        else:
            high = middle
    return high


def main(argv: list[str] | None = None) -> int:
    args = simple_parsing.parse(
        BoundArguments, args=argv, add_option_string_dash_variants=False, allow_abbrev=False
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    engine = None
    if args.engine_json is not None:
        text = Path(args.engine_json).read_bytes()
        try:
            engine = json.loads(text)  # bytes: not UTF-8 is a ValueError too, not a traceback
        except (ValueError, RecursionError) as error:
            raise ConfigError(f"--engine_json: {json_refusal(error)}") from None
        if not isinstance(engine, dict):
            raise ConfigError("--engine_json: not an engine.py result (expected an object)")
        batch_rows(engine, args.batch_size)
        measured = engine.get("arguments")
        measured = measured if isinstance(measured, dict) else {}
        for name in ("model", "exit_layer", "num_speculations"):
            if name in measured and not _same(name, measured[name], getattr(args, name)):
                raise ConfigError(
                    f"--engine_json measured {name} = {measured[name]!r}; pass "
                    f"--{name} {measured[name]} to bound that run (got {getattr(args, name)!r})"
                )
        engine_steps = measured.get("max_steps", 128)
        if not whole_number(engine_steps, 1):
            raise ConfigError(
                f"--engine_json: max_steps must be a positive integer, got {engine_steps!r}"
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, "float32", "cpu")
    layer_weights(model)  # a Llama-shaped decoder, or a one-line error before any timing
    layers = model.config.num_hidden_layers
    if not 1 <= args.exit_layer < layers:
        raise ConfigError(f"--exit_layer must be in [1, {layers}), got {args.exit_layer}")
    widths = []
    if engine is not None:
        # engine.py's batch rows decode its first batch_size prompts, padded to the longest.
        prompts = human_eval_prompts(args.batch_size)
        widths = [max(len(tokenizer(prompt)["input_ids"]) for prompt in prompts)]
        if args.columns is None:
            args.columns = widths[0] + engine_steps // 2
    if args.columns is None:
        args.columns = 287
    context = getattr(model.config, "max_position_embeddings", None)
    if context and args.columns > context + 2 * (args.num_speculations + 1):
        raise ConfigError(
            f"--columns must be at most the model's context ({context}), got {args.columns}"
        )
    load = os.getloadavg()[0]
    timer = ProductTimer(args.repeats)
    with torch.no_grad():
        bounds = step_bounds(model, args, timer)
        bounds |= StepSequence(model, args, timer).bounds(model)
    document = {
        "benchmark": "batch_bound",
        "arguments": vars(args),
        "load_average_1min_start": load,
        "step_seconds": bounds,
    }
    print(f"attention reads {args.columns} columns per step")
    for name, seconds in bounds.items():
        print(f"{name}: {seconds * 1e3:.2f} ms (products only, best rates)")
    if engine is not None:
        with torch.no_grad():
            prefill = prefill_bound(model, widths, args, timer)
        run = bound_run(engine, bounds, args.batch_size, prefill)
        for name in ("tokens_per_row_step", *(key for key in run if key.startswith("needed_"))):
            run[name.replace("tokens_per_row_step", "implied_acceptance")] = acceptance_for(
                run[name], args.num_speculations
            )
        document["run"] = run
        for name, value in run.items():
            print(f"{name}: {value:.3g}" if isinstance(value, float) else f"{name}: {value}")
    print(f"load average at the start: {load:.2f}")
    if args.output:
        write_json_atomic(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
