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
from self_speculation import ConfigError, GenerationConfig, Generator  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    arguments = simple_parsing.parse(
        CompileTimeArguments, args=argv, add_config_path_arg=False, allow_abbrev=False
    )
    if arguments.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = arguments.cache_dir
    if arguments.decode_prompts < 0 or arguments.max_steps < 1 or arguments.rounds < 1:
        raise ConfigError("decode_prompts must be >= 0, max_steps and rounds >= 1")
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
    if arguments.decode_prompts:
        compare_decoding(generator, model, tokenizer, configs, arguments)
    return 0


def compare_decoding(generator, model, tokenizer, configs, arguments) -> None:
    """Tokens per second through the passes kept on disk (``generator``) and through
    torch.compile's dispatch (a second Generator with them switched off), alternating."""
    from benchmarks.engine import human_eval_prompts  # noqa: PLC0415

    prompts = human_eval_prompts(arguments.decode_prompts)
    os.environ[PRECOMPILE_VARIABLE] = "0"
    try:
        dispatched = Generator(model, tokenizer)
        for config in configs.values():  # compiles here (warm cache), not in the timing
            dispatched.generate("def f(x):", dataclasses.replace(config, max_steps=8))
    finally:
        del os.environ[PRECOMPILE_VARIABLE]
    for strategy, config in configs.items():
        totals = {"kept on disk": [0, 0.0], "torch.compile dispatch": [0, 0.0]}
        outputs = {}
        for _ in range(arguments.rounds):
            for name, which in zip(totals, (generator, dispatched), strict=True):
                results = [which.generate(prompt, config) for prompt in prompts]
                totals[name][0] += sum(len(result.token_ids) for result in results)
                totals[name][1] += sum(result.total_time for result in results)
                outputs.setdefault(name, [result.token_ids for result in results])
        if len({str(tokens) for tokens in outputs.values()}) != 1:
            raise ConfigError(f"{strategy}: the two routes decoded different tokens")
        speeds = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
        kept, dispatch = speeds.values()
        print(
            f"{strategy}: kept on disk {kept:.1f} tok/s, torch.compile dispatch "
            f"{dispatch:.1f} tok/s, ratio {kept / dispatch:.3f} (same tokens; "
            f"{len(prompts)} prompts x {config.max_steps} tokens x {arguments.rounds} rounds)"
        )


if __name__ == "__main__":
    run_main(main, prog="compile_time.py")
