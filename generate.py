"""Generate text from prompts, interactively or once, with any strategy.

    python generate.py --model M --sample True --max_steps 512 \
        --generation_strategy self_speculative --exit_layer 8 --num_speculations 6
    python generate.py --model M --prompt "def fibonacci(n):" \
        --generation_strategy self_speculative --sample False --max_steps 64

Without ``--prompt``: reads a prompt per line from standard input (a line ending in a
backslash continues on the next line), streams the answer to standard output and logs
tokens/s and the acceptance rate; end with Ctrl-D (EOF, exit status 0) or Ctrl-C (130).
``--streamer speculative`` shows accepted drafts in green and rejected drafts struck
through in red, on a terminal (``FORCE_COLOR=1`` elsewhere). Works under ``python`` and
under ``torchrun`` (one process).

After each answer, one line says what the strategy did: for self-speculation, the tokens
drafted by the early exit and accepted by the full model, tokens per full-model pass, and,
with ``--compare_autoregressive True``, the speed against plain decoding of the same prompt.
With ``--compile True`` the first prompt is decoded once, untimed, to compile the fast path
(a log line says so); tokens/s never include compiling.

Writes ``<output_dir>/generate_<time>.json``: the arguments, the resolved generation
config, the environment (with the decoding path that actually ran, and the compile time)
and, per prompt, the prompt, the generated text and its metrics (with
``--compare_autoregressive True``, ``autoregressive``: plain decoding's tokens/s, time,
token count, whether its tokens were the same, and the speedup). Prompts from standard
input also go to ``generate_<time>.samples.jsonl``, one row per answer as it is given, so
that a session killed (SIGTERM, SIGKILL) keeps every answer; the document is written
(atomically) after the first answer and when the session ends (end of input, Ctrl-C, a
closed output, an error), each write once, however many prompts are piped in.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import torch

from arguments import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    MAX_SEED,
    Arguments,
    GenerationArguments,
    arguments_dict,
    distributed_run,
    expected_tokens,
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
from self_speculation.benchmarking import (
    JsonlWriter,
    environment_info,
    full_model_config,
    run_files,
    write_json_atomic,
)
from self_speculation.errors import command_line_text, require_utf8
from self_speculation.loading import user_turn
from self_speculation.output_safety import refuse_output_dir_in_use
from self_speculation.streaming import colours_wanted

logger = logging.getLogger("generate")
MAX_LINE = 1 << 20  # characters of one input line; a longer one is no prompt


@dataclass
class GenerateArguments:
    """What to generate from and how to show it."""

    prompt: str | None = None
    """Generate once from this prompt (default: interactive)"""
    streamer: str = StreamerName.STANDARD.value
    """none, standard or speculative (drafts shown in colours on a terminal; FORCE_COLOR=1
    elsewhere, NO_COLOR=1 never)."""
    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template, if it has one (token healing off)."""
    compare_autoregressive: bool = False
    """Also decode each prompt autoregressively (untimed output) and report the speedup."""

    def __post_init__(self) -> None:
        valid = [name.value for name in StreamerName]
        if self.streamer not in valid:
            raise ConfigError(
                f"unknown streamer '{self.streamer}' (choose from {', '.join(valid)})"
            )
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("the prompt is empty")
        if self.prompt is not None:
            self.prompt = command_line_text(self.prompt)
            require_utf8(self.prompt, "--prompt", from_bytes=True)


class AnswerOutput:
    """Standard output that notes, rather than raises mid-answer, that its reader left
    (``| head -1``): the answer being generated is finished and kept in the result
    document (it was lost, and a one-prompt run wrote no document at all), then the run
    ends as a closed output does (exit status 141)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.reader_left = False

    def write(self, text: str) -> int:
        if not self.reader_left:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self.reader_left = True
        return len(text)

    def flush(self) -> None:
        if not self.reader_left:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.reader_left = True

    def isatty(self) -> bool:  # a caller's stdout may have none (colours_wanted allows it)
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())


def _as_utf8(line: str, encoding: str | None) -> str:
    """``line`` read in ``encoding`` with ``surrogateescape``, as UTF-8 where its bytes are:
    a stream in ASCII (``PYTHONIOENCODING=ascii``) read "café" as "caf" and two escaped
    bytes, and the prompt was refused as "byte 0xc3 is not UTF-8"."""
    if not encoding or not any("\udc80" <= character <= "\udcff" for character in line):
        return line  # decoded as it is (a latin-1 text that also reads as UTF-8 included)
    try:  # bytes that are not UTF-8 stay escaped: refused later, naming the first of them
        return line.encode(encoding, "surrogateescape").decode("utf-8", "surrogateescape")
    except (UnicodeError, LookupError):
        return line


def read_prompts(stream: TextIO | None = None) -> Iterator[str]:
    """Prompts from ``stream`` (default: the current ``sys.stdin``), one per line; a trailing
    backslash joins the next line (at the end of the input, it ends the prompt). A byte
    order mark opening the input is dropped."""
    stream = sys.stdin if stream is None else stream
    if hasattr(stream, "reconfigure"):  # undecodable bytes: a one-line error, not a crash
        stream.reconfigure(errors="surrogateescape")
    pending: list[str] = []
    first_line = True
    while True:
        if stream.isatty():
            sys.stderr.write("... " if pending else "\n>>> ")
            sys.stderr.flush()
        line = stream.readline(MAX_LINE + 1)  # /dev/zero: no newline, ever
        if len(line) > MAX_LINE:
            raise ConfigError(
                f"an input line is longer than {MAX_LINE} characters: binary input, not prompts?"
            )
        if "\0" in line:
            raise ConfigError("the input holds NUL bytes: binary input, not prompts")
        if not line:  # EOF: a prompt still waiting for its continuation is answered too
            if "".join(pending).strip():
                yield "\n".join(pending)
            return
        line = line.rstrip("\r\n")  # Windows line ends too
        line = _as_utf8(line, getattr(stream, "encoding", None))
        if first_line:  # a byte order mark (Notepad's UTF-8) is no prompt text, as in data files
            line, first_line = line.removeprefix("\ufeff"), False
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
    return user_turn(tokenizer, prompt, tokenize=True)


def autoregressive_config(generator: Generator, config: GenerationConfig) -> GenerationConfig:
    """Plain decoding (every layer, one token per step) with ``config``'s other settings."""
    return generator.resolve(full_model_config(config, generator.num_layers))


def _compile_first(
    generator: Generator, prompt: str | list[int], configs: list[GenerationConfig]
) -> None:
    """Compile the fast path's passes on ``prompt`` (a few tokens, untimed, discarded), so
    that no answer's tokens/s includes compiling."""
    for config in configs:
        if not config.compile:
            continue
        logger.info(
            "compiling the fast path for %s on this prompt first (not counted in tokens/s)",
            config.generation_strategy.value,
        )
        steps = min(config.max_steps, max(config.num_speculations, 0) + 2)
        generator.generate(prompt, dataclasses.replace(config, max_steps=steps))


def summary_line(
    result: GenerationResult,
    plain: GenerationResult | None = None,
    label: str = "self-speculative",
    drafters: str | None = None,
    sampled: bool = False,
) -> str:
    """One line on what the strategy (``label``) did with this prompt; ``drafters``: what
    drafted (default: the layers below ``result.exit_layer``); ``sampled``: the tokens
    were drawn (two strategies draw their own, so different tokens are no fault)."""
    count = result.num_generated_tokens
    speed = (
        f"{count} token{'' if count == 1 else 's'} in {result.total_time:.2f} s "
        f"({result.tokens_per_second:.1f} tokens/s, stop: {result.stop_reason})"
    )
    if not result.num_drafted:  # autoregressive, or ended before its first drafting step
        return f"{label if result.num_speculations > 0 else 'autoregressive'}: {speed}"
    line = (
        f"{label}: {speed}; {drafters or f'layers [0, {result.exit_layer})'} drafted "
        f"{result.num_drafted} tokens, the full model accepted {result.num_accepted} "
        f"({result.acceptance_rate:.0%}): {result.tokens_per_step:.2f} tokens per full-model "
        "pass (plain decoding: 1)"
    )
    if plain is None:
        return line + "; --compare_autoregressive True times plain decoding too"
    compared = comparison(result, plain)
    same = "same tokens" if compared["same_tokens"] else "different tokens"
    if sampled and not compared["same_tokens"]:  # as benchmark.py says of sampled outputs
        same += " (sampled: each strategy draws its own)"
    speedup = "n/a" if compared["speedup"] is None else f"{compared['speedup']:.2f}x"
    return line + f"; {speedup} plain decoding ({plain.tokens_per_second:.1f} tokens/s, {same})"


def _answer(
    generator: Generator,
    prompt: str,
    config: GenerationConfig,
    options: GenerateArguments,
    seed: int,
    output: TextIO,
    first: bool = False,
) -> tuple[GenerationResult, GenerationResult | None]:
    """The answer to ``prompt`` (streamed to ``output``), and with
    ``--compare_autoregressive True`` plain decoding's result for the same prompt."""
    # Undecodable input bytes fail this prompt only, not the interactive session.
    require_utf8(prompt, "the prompt", from_bytes=True)
    prompt_ids = _prompt_ids(generator, prompt, options.chat_template)
    speculative = config.generation_strategy.speculative
    compare = options.compare_autoregressive and speculative
    plain_config = autoregressive_config(generator, config) if compare else None
    if first:
        _compile_first(generator, prompt_ids, [config] + ([plain_config] if compare else []))
    streamer = build_streamer(options.streamer, generator.tokenizer, output)
    random = torch.Generator(device=generator.layerwise.device).manual_seed(seed)
    result = generator.generate(prompt_ids, config, streamer, random)
    if options.streamer == StreamerName.NONE.value:
        output.write(result.text + "\n")
        output.flush()
    plain = None
    if compare:  # timed with the same streamer's work (its text discarded), as the answer was
        random = torch.Generator(device=generator.layerwise.device).manual_seed(seed)
        silent = build_streamer(options.streamer, generator.tokenizer, io.StringIO())
        plain = generator.generate(prompt_ids, plain_config, silent, random)
    label = config.generation_strategy.value.replace("_", "-")
    drafters = None
    if config.tree_branching:
        label += " " + ",".join(map(str, config.tree_branching))
    if config.adaptive_exit_layers:
        exits = sorted({config.exit_layer, *config.adaptive_exit_layers})
        label += f" from exits {','.join(map(str, exits))}"
        drafters = "the early exits"  # each step's own (result.exit_layer: only the first)
    logger.info("%s", summary_line(result, plain, label, drafters, config.sample))
    if (
        result.stop_reason == "eos"
        and result.num_generated_tokens <= 1
        and not options.chat_template
        and getattr(generator.tokenizer, "chat_template", None) is not None
    ):  # an instruct model given a bare question often ends its turn at once
        logger.warning(
            "the answer ended at its first token (end of sequence); this model has a chat "
            "template: --chat_template True gives it the prompt as a chat turn"
        )
    return result, plain


def comparison(result: GenerationResult, plain: GenerationResult) -> dict:
    """What --compare_autoregressive measured, for the result rows: plain decoding's speed
    and tokens, and the speedup over it."""
    return {
        "tokens_per_second": plain.tokens_per_second,
        "total_time": plain.total_time,
        "num_generated_tokens": plain.num_generated_tokens,
        "same_tokens": plain.token_ids == result.token_ids,
        "speedup": (
            result.tokens_per_second / plain.tokens_per_second if plain.tokens_per_second else None
        ),
    }


def decoding_path(generator: Generator, config: GenerationConfig) -> dict:
    """The decoding path that ran (after compiling, not before) and the compile time."""
    reason = generator.fast_path_fallback(config)
    if not config.compile:
        path = "eager"
    elif reason is not None:
        path = f"eager (fast path off: {reason})"
    else:
        path = "fast (torch.compile)"
    return {"decoding_path": path, "compile_seconds": generator.compile_seconds}


def main(argv: list[str]) -> int:
    args, generation, options = parse_args(
        Arguments, GenerationArguments, GenerateArguments, argv=argv, prog="generate.py"
    )
    refuse_output_dir_in_use(args.output_dir)  # a sweep's folder: now, not once loaded
    facts = args.check_model(generation.config())  # before the weights load
    # One prompt: its tokens; prompts from standard input: not known up front.
    expected = None
    if options.prompt is not None:
        expected = expected_tokens(1, generation.max_steps, 1, facts)
    config = one_strategy(generation, "generate.py", expected)
    if (
        options.streamer == StreamerName.SPECULATIVE.value
        and config.generation_strategy is GenerationStrategyName.AUTOREGRESSIVE
    ):
        logger.warning(
            "--streamer speculative colours drafts, and --generation_strategy autoregressive "
            "drafts none: the output looks as with --streamer standard"
        )
    elif options.streamer == StreamerName.SPECULATIVE.value and not colours_wanted(sys.stdout):
        logger.warning(
            "--streamer speculative: standard output is not a terminal (or NO_COLOR is set), "
            "so it gets the plain text, as with --streamer standard; FORCE_COLOR=1 colours it"
        )
    if options.prompt is None and sys.stdin is None:  # started with standard input closed
        raise ConfigError("no standard input to read prompts from: give --prompt or pipe them in")
    with distributed_run(args, one_process="generate.py") as context:
        generator = args.load_generator(context)
        config = generator.resolve(config)
        # --chat_template True on a tokenizer without a template: prompts as written.
        chat_template_applied = options.chat_template and (
            getattr(generator.tokenizer, "chat_template", None) is not None
        )
        if chat_template_applied and config.token_healing:
            # The prompt ends in the template's generation prompt ("<|im_start|>assistant\n"),
            # the boundary the model was trained on, not a user's trailing whitespace:
            # healing it let the first token re-create the template's newline (one of
            # max_steps, counted in the metrics) or merge it away from what generate does.
            logger.info("--chat_template True: the chat prompts are not token-healed")
            config = dataclasses.replace(config, token_healing=False)
        files = run_files(args.output_dir, "generate", context)
        document = {
            "script": "generate.py",
            "arguments": arguments_dict(args, generation, options),
            "generation_config": vars(config),
            "chat_template_applied": chat_template_applied,
            "environment": environment_info(generator, context, [config]),
            "ended_by": None,
            "prompts": [],
        }

        output = AnswerOutput(sys.stdout)

        def answer(prompt: str, seed: int, rows: JsonlWriter | None = None) -> None:
            first = not document["prompts"]
            result, plain = _answer(generator, prompt, config, options, seed, output, first)
            # The seed it drew with: ``--prompt P --seed S`` gives the answer again (a
            # refused prompt uses up a seed, so a row's place does not tell it).
            row = {"prompt": prompt, "seed": seed, "text": result.text, **result.metrics()}
            if plain is not None:
                row["autoregressive"] = comparison(result, plain)
            document["prompts"].append(row)
            if rows is not None:
                rows.write(row)
            if output.reader_left:
                document["ended_by"] = "output closed"
            if first:  # the path that ran, known now; later answers only go to the rows
                document["environment"].update(decoding_path(generator, config))
                write_json_atomic(files.result, document)
            if output.reader_left:  # this answer is kept; no one reads the next
                raise BrokenPipeError(errno.EPIPE, "standard output closed")

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
        rows = JsonlWriter(files.samples)
        document["samples_file"] = str(files.samples)
        try:
            for number, prompt in enumerate(read_prompts()):
                try:
                    # Within --seed's range, so that --prompt P --seed S draws it again.
                    answer(prompt, (args.seed + number) % (MAX_SEED + 1), rows)
                except LayerSkipError as error:  # one bad prompt does not end the session
                    logger.error("%s", error)
                    document["failed_prompts"] = document.get("failed_prompts", 0) + 1
                    status = EXIT_ERROR  # ... but the exit status says some failed
            document["ended_by"] = "end of input"
        except KeyboardInterrupt:
            sys.stderr.write("\n")
            document["ended_by"] = "interrupted"
            status = EXIT_INTERRUPTED
        except LayerSkipError:  # input that is no prompts (NUL bytes, an endless line)
            document["ended_by"] = "unreadable input"
            raise
        except BrokenPipeError:  # the reader left (| head): the document says so, then quiet
            document["ended_by"] = "output closed"
            raise
        finally:  # however the session ends (short of a kill), the document holds every answer
            rows.close()
            if not rows.num_rows:  # no answer: no empty rows file beside the document
                files.samples.unlink(missing_ok=True)
                del document["samples_file"]
            if files.result.parent.is_dir():  # not recreated when the user deleted it
                write_json_atomic(files.result, document)
        answers = len(document["prompts"])
        logger.info("wrote %s (%d answer%s)", files.result, answers, "" if answers == 1 else "s")
        return status


if __name__ == "__main__":
    run_main(main, prog="generate.py")
