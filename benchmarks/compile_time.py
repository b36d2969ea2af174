"""Time the fast path's compiles as a user's first and second runs meet them: the
autoregressive pass, then a greedy self-speculative step, in one process.

    python benchmarks/compile_time.py --cache_dir /tmp/cold   # cold
    python benchmarks/compile_time.py --cache_dir /tmp/cold   # second process

A fresh --cache_dir (inductor's TORCHINDUCTOR_CACHE_DIR) gives a cold compile; the same one
again, a second process on the same machine. Prints one line of seconds.
"""

from __future__ import annotations

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


@dataclass
class CompileTimeArguments:
    model: str = "models/layerskip-stdlib"  # a local directory, a .gguf file, a hub id or smollm2
    exit_layer: int = 7  # the self-speculative step's exit layer
    num_speculations: int = 3  # the self-speculative step's drafts
    cache_dir: str = ""  # inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR); "": its default


def main(argv: list[str] | None = None) -> int:
    arguments = simple_parsing.parse(
        CompileTimeArguments, args=argv, add_config_path_arg=False, allow_abbrev=False
    )
    if arguments.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = arguments.cache_dir
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(arguments.model)
    generator = Generator(model, tokenizer)
    loaded = time.perf_counter()
    seconds = {}
    for strategy in ("autoregressive", "self_speculative"):
        speculative = strategy == "self_speculative"
        config = GenerationConfig(
            max_steps=8,
            sample=False,
            compile=True,
            generation_strategy=strategy,
            exit_layer=arguments.exit_layer if speculative else UNSET,
            num_speculations=arguments.num_speculations,
        )
        before = generator.compile_seconds
        generator.generate("def f(x):", config)
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
    return 0


if __name__ == "__main__":
    run_main(main, prog="compile_time.py")
