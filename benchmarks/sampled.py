"""Sampled decoding on the fast path, measured in one run: the compiled step that warps,
draws, accepts and keeps the books inside its one call ("one call") against the design
before it ("per pass": the compiled passes with the sampling, acceptance and books run
eagerly between them), for plain and self-speculative decoding, alternating rounds; with
fast greedy decoding and transformers' sampled ``generate`` for reference.

    python benchmarks/sampled.py                    # shipped model, 10 HumanEval prompts
    python benchmarks/sampled.py --num_prompts 20 --rounds 3 --output logs/sampled.json

Both designs draw the same tokens for a seed (``DecodingState.uniforms``): the script
checks it and says so. Prints one line per path (median tok/s over the rounds) and the
one-call / per-pass ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import simple_parsing
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from benchmarks.engine import human_eval_prompts  # noqa: E402
from self_speculation import ConfigError, GenerationConfig, Generator  # noqa: E402
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.generator import synchronize  # noqa: E402
from self_speculation.loading import load_model_and_tokenizer  # noqa: E402
from self_speculation.output_safety import check_output_file  # noqa: E402
from self_speculation.strategies import GenerationStrategy  # noqa: E402

logger = logging.getLogger("sampled")


@dataclass
class SampledArguments:
    """Sampled decoding, one compiled call per step against one call per pass."""

    model: str = "models/layerskip-stdlib"  # a local directory, a .gguf file, a hub id or smollm2
    num_prompts: int = 10  # first HumanEval prompts, right-stripped
    max_steps: int = 128  # tokens per prompt
    exit_layer: int = 7
    num_speculations: int = 3
    temperature: float = 0.6
    top_p: float = 0.9
    rounds: int = 3  # alternating rounds of every path
    threads: int = 2  # torch threads (0: torch's default)
    skip_transformers: bool = False  # leave out transformers' sampled generate
    output: str = ""  # a JSON file for the results ("": none)


@contextlib.contextmanager
def _per_pass():
    """The design before the one-call sampled step: sampling outside the compiled passes."""
    original = GenerationStrategy._compiled_sampled
    GenerationStrategy._compiled_sampled = property(lambda self: False)
    try:
        yield
    finally:
        GenerationStrategy._compiled_sampled = original


def _decode(generator: Generator, config: GenerationConfig, prompts: list[str]) -> tuple:
    """(tok/s, acceptance, token ids per prompt) of one pass over ``prompts``, seeded."""
    tokens = seconds = drafted = accepted = 0
    token_ids = []
    device = generator.layerwise.device  # a seed's numbers are drawn where the model runs
    for seed, prompt in enumerate(prompts):
        random = torch.Generator(device=device).manual_seed(seed)
        result = generator.generate(prompt, config, generator=random)
        tokens += result.num_generated_tokens
        seconds += result.total_time
        drafted += result.num_drafted
        accepted += result.num_accepted
        token_ids.append(result.token_ids)
    return tokens / seconds, accepted / drafted if drafted else None, token_ids


def _transformers_rate(model, tokenizer, prompts: list[str], args: SampledArguments) -> float:
    tokens, seconds = 0, 0.0
    device = model.device
    for seed, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        torch.manual_seed(seed)
        synchronize(device)
        started = time.perf_counter()
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_steps,
            do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        synchronize(device)
        seconds += time.perf_counter() - started
        tokens += output.shape[1] - ids.shape[1]
    return tokens / seconds


def main(argv: list[str] | None = None) -> int:
    args = simple_parsing.parse(
        SampledArguments, args=argv, add_config_path_arg=False, allow_abbrev=False
    )
    if args.num_prompts < 1 or args.max_steps < 1 or args.rounds < 1 or args.threads < 0:
        raise ConfigError("num_prompts, max_steps and rounds must be >= 1, threads >= 0")
    if args.output:  # before any work: never over a file that is not an earlier result
        # ~ expanded: the file checked is the file written (it went to a folder named "~")
        args.output = str(
            check_output_file(
                args.output, "sampled", ("arguments", "tokens_per_second", "same_tokens")
            )
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    generator = Generator(model, tokenizer)
    prompts = human_eval_prompts(args.num_prompts)
    common = dict(max_steps=args.max_steps, compile=True, top_k=0)
    speculative = dict(
        generation_strategy="self_speculative",
        exit_layer=args.exit_layer,
        num_speculations=args.num_speculations,
    )
    sampled = dict(sample=True, temperature=args.temperature, top_p=args.top_p)
    paths = {}  # name -> (config, design)
    for strategy, settings in (("autoregressive", {}), ("self_speculative", speculative)):
        config = GenerationConfig(**common, **sampled, **settings)
        paths[f"sampled {strategy}, one call"] = (config, contextlib.nullcontext)
        paths[f"sampled {strategy}, per pass"] = (config, _per_pass)
        greedy = GenerationConfig(**common, sample=False, **settings)
        paths[f"greedy {strategy}"] = (greedy, contextlib.nullcontext)
    for name, (config, design) in paths.items():  # warm-up: every compile, untimed
        with design():
            generator.generate(prompts[0], config)
        if generator.fast_path_fallback(config):
            raise ConfigError(f"{name}: {generator.fast_path_fallback(config)}")
    rates = {name: [] for name in paths}
    acceptance, tokens = {}, {}
    for _ in range(args.rounds):
        for name, (config, design) in paths.items():
            with design():
                rate, acceptance[name], tokens[name] = _decode(generator, config, prompts)
            rates[name].append(rate)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    if not args.skip_transformers:
        generator.model.generation_config.top_k = None
        medians["transformers sampled generate (dynamic cache)"] = _transformers_rate(
            generator.model, tokenizer, prompts, args
        )
    document = {
        "benchmark": "sampled",
        "arguments": dataclasses.asdict(args),
        "tokens_per_second": medians,
        "rounds": rates,
        "acceptance": acceptance,
        "same_tokens": {
            strategy: tokens[f"sampled {strategy}, one call"]
            == tokens[f"sampled {strategy}, per pass"]
            for strategy in ("autoregressive", "self_speculative")
        },
    }
    for name, rate in medians.items():
        rate_acceptance = acceptance.get(name)
        extra = "" if rate_acceptance is None else f", acceptance {rate_acceptance:.3f}"
        print(f"{name}: {rate:.1f} tok/s{extra}")
    for strategy in ("autoregressive", "self_speculative"):
        one, per = (
            medians[f"sampled {strategy}, one call"],
            medians[f"sampled {strategy}, per pass"],
        )
        print(
            f"{strategy}: one call / per pass {one / per:.2f}x; same tokens for a seed: "
            f"{document['same_tokens'][strategy]}"
        )
    speculative_ratio = (
        medians["sampled self_speculative, one call"] / medians["sampled autoregressive, one call"]
    )
    print(f"sampled self-speculative / autoregressive (one call): {speculative_ratio:.2f}x")
    if args.output:
        write_json_atomic(args.output, document)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
