"""Time the fast path's compiles as a user's first and second runs meet them: the
autoregressive pass, then a greedy self-speculative step, in one process.

    python benchmarks/compile_time.py --cache_dir /tmp/cold   # cold
    python benchmarks/compile_time.py --cache_dir /tmp/cold   # second process

A fresh --cache_dir (inductor's TORCHINDUCTOR_CACHE_DIR) gives a cold compile; the same one
again, a second process on the same machine (which loads the passes kept on disk,
``self_speculation.precompiled``). Prints one line of seconds.

``--decode_prompts N`` then times decoding (first N HumanEval prompts, right-stripped, one
at a time) through the passes kept on disk against torch.compile's own dispatch of the
same compiled code, alternating, and checks that their tokens are equal: one line per
strategy with both speeds and their ratio.

``--compare_regions True`` compiles the passes with each decoder layer traced once
(``LAYERSKIP_LAYER_REGIONS=1``) first, then with every layer unrolled (the default: kernels
called from a C++ wrapper), and times decoding (the same prompts, alternating) through
both: both compile times per strategy, both speeds and their ratio. Run it on a fresh
--cache_dir: the unrolled passes compile second, on caches the first compile warmed (which
favours them).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import simple_parsing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from self_speculation import ConfigError, GenerationConfig, Generator, model_surgery  # noqa: E402
from self_speculation.config import UNSET  # noqa: E402
from self_speculation.loading import load_model_and_tokenizer  # noqa: E402
from self_speculation.passes import PRECOMPILE_VARIABLE  # noqa: E402


@dataclass
class CompileTimeArguments:
    """Cold and warm compile time of the fast path's passes."""

    model: str = "models/layerskip-stdlib"  # a local directory, a .gguf file, a hub id or smollm2
    exit_layer: int = 7  # the self-speculative step's exit layer
    num_speculations: int = 3  # the self-speculative step's drafts
    cache_dir: str = ""  # inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR); "": its default
    decode_prompts: int = 0  # then time decoding on this many HumanEval prompts (0: don't)
    max_steps: int = 128  # tokens per prompt when timing decoding
    rounds: int = 3  # alternating rounds when timing decoding
    compare_regions: bool = False  # then compile with every layer unrolled and time both


def main(argv: list[str] | None = None) -> int:
    arguments = simple_parsing.parse(
        CompileTimeArguments, args=argv, add_config_path_arg=False, allow_abbrev=False
    )
    if arguments.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = arguments.cache_dir
    if arguments.decode_prompts < 0 or arguments.max_steps < 1 or arguments.rounds < 1:
        raise ConfigError("decode_prompts must be >= 0, max_steps and rounds >= 1")
    if arguments.compare_regions and not arguments.decode_prompts:
        raise ConfigError("--compare_regions True times decoding: give --decode_prompts N")
    if arguments.compare_regions:
        model_surgery._REGIONS_SETTING = "1"  # what LAYERSKIP_LAYER_REGIONS=1 sets at import
        if not model_surgery.layer_regions():
            raise ConfigError("--compare_regions True: this torch has no reusable regions")
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(arguments.model)
    generator = Generator(model, tokenizer)
    loaded = time.perf_counter()
    seconds, configs = {}, {}
    for strategy in ("autoregressive", "self_speculative"):
        speculative = strategy == "self_speculative"
        config = GenerationConfig(
            max_steps=arguments.max_steps,
            sample=False,
            compile=True,
            generation_strategy=strategy,
            exit_layer=arguments.exit_layer if speculative else UNSET,
            num_speculations=arguments.num_speculations,
        )
        configs[strategy] = config
        before = generator.compile_seconds
        generator.generate("def f(x):", dataclasses.replace(config, max_steps=8))
        reason = generator.fast_path_fallback(config)
        if reason:
            raise ConfigError(f"the fast path fell back to eager decoding: {reason}")
        seconds[strategy] = generator.compile_seconds - before
    print(
        f"load {loaded - started:.1f} s; compile: autoregressive "
        f"{seconds['autoregressive']:.1f} s, self-speculative (E={arguments.exit_layer}, "
        f"k={arguments.num_speculations}) {seconds['self_speculative']:.1f} s, "
        f"in all {sum(seconds.values()):.1f} s"
    )
    if arguments.compare_regions:
        compare_regions(generator, model, tokenizer, configs, seconds, arguments)
    elif arguments.decode_prompts:
        compare_decoding(generator, model, tokenizer, configs, arguments)
    return 0


def compare_regions(generator, model, tokenizer, configs, seconds, arguments) -> None:
    """Compile time and tokens per second with each decoder layer traced once
    (``generator``) and with every layer unrolled (a second Generator, compiled here),
    alternating."""
    model_surgery._REGIONS_SETTING = ""  # the default: every layer unrolled
    unrolled = Generator(model, tokenizer)
    unrolled_seconds = {}
    for strategy, config in configs.items():
        before = unrolled.compile_seconds
        unrolled.generate("def f(x):", dataclasses.replace(config, max_steps=8))
        unrolled_seconds[strategy] = unrolled.compile_seconds - before
    for strategy in configs:
        print(
            f"{strategy}: compile with regions {seconds[strategy]:.1f} s, unrolled "
            f"{unrolled_seconds[strategy]:.1f} s"
        )
    routes = {"regions": (generator, "1"), "unrolled": (unrolled, "")}
    _time_routes(routes, configs, arguments)


def compare_decoding(generator, model, tokenizer, configs, arguments) -> None:
    """Tokens per second through the passes kept on disk (``generator``) and through
    torch.compile's dispatch (a second Generator with them switched off), alternating."""
    os.environ[PRECOMPILE_VARIABLE] = "0"
    try:
        dispatched = Generator(model, tokenizer)
        for config in configs.values():  # compiles here (warm cache), not in the timing
            dispatched.generate("def f(x):", dataclasses.replace(config, max_steps=8))
    finally:
        del os.environ[PRECOMPILE_VARIABLE]
    setting = model_surgery._REGIONS_SETTING
    routes = {"kept on disk": (generator, setting), "torch.compile dispatch": (dispatched, setting)}
    _time_routes(routes, configs, arguments)


def _time_routes(routes: dict[str, tuple[Generator, str]], configs: dict, arguments) -> None:
    """For each strategy, decode the first --decode_prompts HumanEval prompts through each
    route's Generator (under its LAYERSKIP_LAYER_REGIONS setting, should a prompt length
    compile) once untimed, then in alternating timed rounds; check that their tokens are
    equal, and print both speeds and their ratio."""
    from benchmarks.engine import human_eval_prompts  # noqa: PLC0415

    prompts = human_eval_prompts(arguments.decode_prompts)

    def decode(route: tuple[Generator, str], config: GenerationConfig) -> list:
        which, model_surgery._REGIONS_SETTING = route
        return [which.generate(prompt, config) for prompt in prompts]

    for strategy, config in configs.items():
        outputs = {
            name: [result.token_ids for result in decode(route, config)]
            for name, route in routes.items()
        }
        totals = {name: [0, 0.0] for name in routes}
        for _ in range(arguments.rounds):
            for name, route in routes.items():
                results = decode(route, config)
                totals[name][0] += sum(len(result.token_ids) for result in results)
                totals[name][1] += sum(result.total_time for result in results)
        if len({str(tokens) for tokens in outputs.values()}) != 1:
            raise ConfigError(f"{strategy}: the two routes decoded different tokens")
        (first, second), (a, b) = routes, [tokens / sec for tokens, sec in totals.values()]
        print(
            f"{strategy}: {first} {a:.1f} tok/s, {second} {b:.1f} tok/s, ratio {a / b:.3f} "
            f"(same tokens; {len(prompts)} prompts x {config.max_steps} tokens x "
            f"{arguments.rounds} rounds)"
        )


if __name__ == "__main__":
    run_main(main, prog="compile_time.py")
