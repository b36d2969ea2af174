"""Generate text from prompts, interactively or once, with any strategy.

    python generate.py --model M --sample True --max_steps 512 \
        --generation_strategy self_speculative --exit_layer 8 --num_speculations 6
    python generate.py --model M --prompt "def fibonacci(n):" \
        --generation_strategy self_speculative --sample False --max_steps 64

Without ``--prompt``: reads a prompt per line from standard input (a line ending in a
backslash continues on the next line), streams the answer to standard output and logs
tokens/s and the acceptance rate; end with Ctrl-D (EOF, exit status 0) or Ctrl-C (130).
``--streamer speculative`` shows accepted drafts in green and rejected drafts struck
through in red. Works under ``python`` and under ``torchrun`` (one process).

Writes ``<output_dir>/generate_<time>.json``: the arguments, the resolved generation
config, the environment and, per prompt, the prompt, the generated text and its metrics.
The document is rewritten (atomically) after every answer, so an interactive session that
ends, however it ends, keeps every answer given so far.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import torch

from arguments import (
    EXIT_INTERRUPTED,
    Arguments,
    GenerationArguments,
    arguments_dict,
    distributed_run,
    one_strategy,
    parse_args,
    run_main,
)
from self_speculation import (
    ConfigError,
    GenerationConfig,
    GenerationResult,
    GenerationStrategyName,
    Generator,
    LayerSkipError,
    StreamerName,
    build_streamer,
)
from self_speculation.benchmarking import environment_info, run_files, write_json_atomic
from self_speculation.errors import require_utf8

logger = logging.getLogger("generate")


@dataclass
class GenerateArguments:
    """What to generate from and how to show it."""

    prompt: str | None = None
    """Generate once from this prompt (default: interactive)"""
    streamer: str = StreamerName.STANDARD.value
    """none, standard or speculative (drafts shown in colours)."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template, if it has one."""

    def __post_init__(self) -> None:
        valid = [name.value for name in StreamerName]
        if self.streamer not in valid:
            raise ConfigError(
                f"unknown streamer '{self.streamer}' (choose from {', '.join(valid)})"
            )
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("the prompt is empty")
        if self.prompt is not None:
            require_utf8(self.prompt, "--prompt", from_bytes=True)


def read_prompts(stream: TextIO | None = None) -> Iterator[str]:
    """Prompts from ``stream`` (default: the current ``sys.stdin``), one per line; a trailing
    backslash joins the next line (at the end of the input, it ends the prompt)."""
    stream = sys.stdin if stream is None else stream
    if hasattr(stream, "reconfigure"):  # undecodable bytes: a one-line error, not a crash
        stream.reconfigure(errors="surrogateescape")
    pending: list[str] = []
    while True:
        if stream.isatty():
            sys.stderr.write("... " if pending else "\n>>> ")
            sys.stderr.flush()
        line = stream.readline()
        if not line:  # EOF: a prompt still waiting for its continuation is answered too
            if "".join(pending).strip():
                yield "\n".join(pending)
            return
        line = line.rstrip("\n")
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        prompt = "\n".join([*pending, line])
        pending = []
        if prompt.strip():
            yield prompt


def _prompt_ids(generator: Generator, prompt: str, chat_template: bool) -> str | list[int]:
    tokenizer = generator.tokenizer
    if not chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        logger.warning("the tokenizer has no chat template: using the prompt as it is")
        return prompt
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )


def _answer(
    generator: Generator,
    prompt: str,
    config: GenerationConfig,
    options: GenerateArguments,
    seed: int,
) -> GenerationResult:
    # Undecodable input bytes fail this prompt only, not the interactive session.
    require_utf8(prompt, "the prompt", from_bytes=True)
    streamer = build_streamer(options.streamer, generator.tokenizer)
    random = torch.Generator(device=generator.layerwise.device).manual_seed(seed)
    result = generator.generate(
        _prompt_ids(generator, prompt, options.chat_template), config, streamer, random
    )
    if options.streamer == StreamerName.NONE.value:
        sys.stdout.write(result.text + "\n")
        sys.stdout.flush()
    acceptance = result.acceptance_rate
    logger.info(
        "%d tokens in %.2f s: %.1f tokens/s%s (stop: %s)",
        result.num_generated_tokens,
        result.total_time,
        result.tokens_per_second,
        ""
        if acceptance is None
        else f", acceptance {acceptance:.2f}, {result.tokens_per_step:.2f} tokens/step",
        result.stop_reason,
    )
    return result


def main(argv: list[str]) -> int:
    args, generation, options = parse_args(
        Arguments, GenerationArguments, GenerateArguments, argv=argv, prog="generate.py"
    )
    config = one_strategy(generation, "generate.py")
    if (
        options.streamer == StreamerName.SPECULATIVE.value
        and config.generation_strategy is GenerationStrategyName.AUTOREGRESSIVE
    ):
        logger.warning(
            "--streamer speculative colours drafts, and --generation_strategy autoregressive "
            "drafts none: the output looks as with --streamer standard"
        )
    args.check_model(config)  # before the weights load
    if options.prompt is None and sys.stdin is None:  # started with standard input closed
        raise ConfigError("no standard input to read prompts from: give --prompt or pipe them in")
    with distributed_run(args, one_process="generate.py") as context:
        generator = args.load_generator(context)
        config = generator.resolve(config)
        files = run_files(args.output_dir, "generate", context)
        document = {
            "script": "generate.py",
            "arguments": arguments_dict(args, generation, options),
            "generation_config": vars(config),
            "environment": environment_info(generator, context),
            "ended_by": None,
            "prompts": [],
        }

        def answer(prompt: str, seed: int) -> None:
            result = _answer(generator, prompt, config, options, seed)
            document["prompts"].append({"prompt": prompt, "text": result.text, **result.metrics()})
            write_json_atomic(files.result, document)

        logger.info(
            "%s, exit_layer %d of %d%s",
            config.generation_strategy.value,
            config.exit_layer,
            generator.num_layers,
            f", num_speculations {config.num_speculations}" if config.num_speculations > 0 else "",
        )
        if options.prompt is not None:
            document["ended_by"] = "one prompt"
            answer(options.prompt, args.seed)
            logger.info("wrote %s", files.result)
            return 0
        status = 0
        try:
            for number, prompt in enumerate(read_prompts()):
                try:
                    answer(prompt, args.seed + number)
                except LayerSkipError as error:  # one bad prompt does not end the session
                    logger.error("%s", error)
            document["ended_by"] = "end of input"
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            document["ended_by"] = "interrupted"
            status = EXIT_INTERRUPTED
        write_json_atomic(files.result, document)
        logger.info("wrote %s (%d answers)", files.result, len(document["prompts"]))
        return status


if __name__ == "__main__":
    run_main(main, prog="generate.py")
