"""Command-line arguments shared by the scripts, and the wrapper that runs a script's main.

The dataclasses are the CLI (the original tools' flag names and defaults; docs/differences.md).
Every script parses them with :func:`parse_args`; booleans are written ``--sample True`` /
``--sample False``; an unknown flag is an error. :func:`run_main` turns every error meant
for a user into one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
from simple_parsing import field as simple_field

# transformers imports torch._dynamo, which creates inductor's cache folder on import: a
# TORCHINDUCTOR_CACHE_DIR that cannot be created (a read-only or unmounted parent) was a
# traceback from every script before any flag was read (with --compile False too).
try:
    import torch._dynamo  # noqa: F401
except OSError as error:
    where = f"{error.filename}: " if error.filename else ""
    sys.stderr.write(
        f"{os.path.basename(sys.argv[0])}: error: torch's compile cache folder cannot be "
        f"created ({where}{error.strerror or error}); set TORCHINDUCTOR_CACHE_DIR to a "
        "writable folder\n"
    )
    raise SystemExit(2) from None

from self_speculation import (
    DEFAULT_MODEL,
    DTYPES,
    UNSET,
    ConfigError,
    GenerationConfig,
    GenerationStrategyName,
    Generator,
    LayerSkipError,
    load_model_and_tokenizer,
)
from self_speculation import distributed as dist
from self_speculation.cli import FlagParser, log_to_stderr
from self_speculation.draft import (
    load_draft_exit,
    rank_tokens,
    read_adapter_config,
    resolve_with_adapter,
)
from self_speculation.errors import ArgumentsError as ArgumentsError  # re-exported
from self_speculation.errors import (
    check_interrupted,
    command_line_text,
    expand_home,
    remembered_interrupt,
    require_thread_count,
    require_utf8,
)
from self_speculation.loading import (
    OWNED_FROM_PRETRAINED_KEYS,
    ModelFacts,
    check_device,
    check_model_args,
    check_model_source,
    default_device,
    inspect_model,
    is_gguf_file,
    resolve_dtype,
)
from self_speculation.output_safety import check_output_dir as check_output_dir  # re-exported
from self_speculation.passes import fast_path_measured

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_ERROR = 2  # a user error: bad flag, bad input, unreachable model or data
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as train.py
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a reader that left early
MAX_SEED = 2**32 - 1  # numpy's limit (lm-eval seeds numpy with it); torch takes it too
DEFAULT_NUM_THREADS = 1  # see Arguments.num_threads
# --compile auto: a first compile pays from this many generated tokens on (shipped model,
# 2-core CPU: about 90 s to compile, about 9 ms saved per token, README's results;
# docs/fast-path.md; 97.1 s and 8.3 ms on the first shipped model).
COMPILE_BREAK_EVEN_TOKENS = 12_000
# --compile's spellings (as simple-parsing reads booleans), and a bare --compile: true.
_COMPILE_SPELLINGS = {
    **dict.fromkeys(("true", "1", "yes", "y", "on"), "true"),
    **dict.fromkeys(("false", "0", "no", "n", "off"), "false"),
    "auto": "auto",
}


def expected_tokens(
    num_samples: int, max_steps: int, world_size: int = 1, model: ModelFacts | None = None
) -> int:
    """The most tokens one process generates per decoding path for ``--compile auto``: the
    largest share of ``num_samples`` (so that every process of a torchrun decides alike)
    x ``max_steps``, or x the context of ``model`` (``check_model``) where that is shorter:
    a prompt and its tokens fit in it. Each path (strategy, sweep point) compiles its own
    passes."""
    context = None if model is None else model.context_length
    per_sample = max_steps if context is None else min(max_steps, context)
    return -(-num_samples // max(world_size, 1)) * per_sample


def apply_num_threads(num_threads: int) -> None:
    """Set torch's CPU thread count (0: leave torch's default), before any torch work."""
    if num_threads and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


@dataclass
class Arguments:
    """Model, device and output settings common to every script."""

    model: str = DEFAULT_MODEL
    """Hub id, local directory, .gguf file, or "smollm2"."""
    model_args: str | None = None
    """Extra from_pretrained kwargs: JSON or "key=value,key=value"."""
    seed: int = 42
    """Seeds data shuffling, n-shot choice and sampling."""
    output_dir: str = "./logs"
    """Where result files are written (~ is expanded). A folder holding a model, an exit
    adapter, or a folder shipped under models/ is refused unless --overwrite True."""
    overwrite: bool = False
    """Write into --output_dir even when it holds a model, an exit adapter or earlier results."""
    num_threads: int = DEFAULT_NUM_THREADS
    """torch CPU threads (0: torch's default, one per core). 1 by default: decoding is a
    string of small products, and with anything else running, extra OpenMP threads spin
    against it (measured on a busy 2-core machine: 1 thread 35-48 tokens/s, 2 threads
    1.7-5 tokens/s). To use more, also set OMP_WAIT_POLICY=PASSIVE in the environment
    (2 threads then: 31-46 tokens/s on that machine)."""
    dtype: str | None = None
    """float32, bfloat16, float16, float64 (default: float32 on CPU, bfloat16 on a GPU)"""
    device: str | None = None
    """cpu, cuda, cuda:1 (default: cuda when available)"""
    distributed: bool | None = None
    """Shard samples across torchrun ranks (default: when launched by torchrun)."""
    draft_adapter: str | None = None
    """Exit adapter folder (made by train_adapter.py): drafts leave layer E through it."""
    draft_vocab_size: int = -1
    """Draft head over the N most frequent tokens only (0: the whole vocabulary; -1: the N
    the adapter was trained for, else 0); ranked by the adapter's list or --draft_vocab_corpus."""
    draft_vocab_corpus: list[str] | None = None
    """Globs of text files whose token counts rank the draft vocabulary."""

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("--model is empty (give a model folder, hub id or .gguf file)")
        if self.draft_vocab_size < -1:
            raise ConfigError(
                f"--draft_vocab_size must be >= 0 (or -1), got {self.draft_vocab_size}"
            )
        if self.draft_vocab_corpus and self.draft_vocab_size <= 0:
            raise ConfigError(
                "--draft_vocab_corpus ranks a draft vocabulary: give --draft_vocab_size N too"
            )
        if self.draft_adapter is not None:  # --draft_adapter=~/a reaches us unexpanded
            self.draft_adapter = expand_home(self.draft_adapter, "--draft_adapter")
            read_adapter_config(self.draft_adapter)  # a wrong path fails before any loading
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        check_device(self.device)
        require_thread_count(self.num_threads)
        self.output_dir = expand_home(self.output_dir, "--output_dir")  # as --model is
        check_output_dir(self.output_dir, overwrite=self.overwrite)
        for key in self.model_kwargs:  # also validates model_args now, not after loading data
            if key in OWNED_FROM_PRETRAINED_KEYS:
                raise ConfigError(
                    f"--model_args: '{key}' is set by {OWNED_FROM_PRETRAINED_KEYS[key]}, not here"
                )

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """``model_args`` as a dict: a JSON object, or ``key=value`` pairs split on commas."""
        text = (self.model_args or "").strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"--model_args is not valid JSON: {error}") from None
            if not isinstance(parsed, dict):
                raise ConfigError("--model_args must be a JSON object")
            return parsed
        kwargs: dict[str, Any] = {}
        for pair in text.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--model_args: expected key=value, got '{pair}'")
            try:
                kwargs[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                kwargs[key.strip()] = value.strip()
        return kwargs

    def check_model(self, *configs: GenerationConfig) -> ModelFacts | None:
        """Check the model's files and the generation settings against its config.json,
        before any weight is read: a wrong --exit_layer fails in a second, not after a load.
        None when the model is not a local directory (checked when loaded).

        Raises:
            ModelLoadError: a malformed config.json or weights file.
            ConfigError: settings outside the model's range, or unknown --model_args keys.
        """
        if self.model != "smollm2" and not is_gguf_file(self.model):
            # A mistyped path fails now, not after the data.
            check_model_source(self.model, self.model_kwargs.get("cache_dir"))
        facts = inspect_model(self.model, self.model_kwargs)
        if facts is None:
            return None
        check_model_args(self.model_kwargs, facts.config)
        adapter = read_adapter_config(self.draft_adapter) if self.draft_adapter else None
        # A multimodal config keeps the text decoder's width in its text_config.
        text_config = facts.config.get_text_config(decoder=True)
        hidden_size = getattr(text_config, "hidden_size", None)
        if (
            adapter is not None
            and facts.num_layers is not None
            and ((adapter.num_layers, adapter.hidden_size) != (facts.num_layers, hidden_size))
        ):
            raise ConfigError(
                f"--draft_adapter {self.draft_adapter} was trained for a model with "
                f"{adapter.num_layers} layers of width {adapter.hidden_size}; {self.model} has "
                f"{facts.num_layers} of width {hidden_size}"
            )
        for config in configs:
            if facts.num_layers is not None:
                resolve_with_adapter(
                    config,
                    facts.num_layers,
                    facts.recommended_exit_layer,
                    facts.recommended_num_speculations,
                    adapter.exit_layer if adapter else None,
                    adapter.num_speculations if adapter else None,
                )
            context = facts.context_length
            if context is not None and config.num_speculations >= context:
                raise ConfigError(
                    f"num_speculations must be below the model's context ({context} tokens), "
                    f"got {config.num_speculations}"
                )
            too_large = [
                token
                for token in config.stop_token_ids or []
                if facts.vocab_size is not None and token >= facts.vocab_size
            ]
            if too_large:
                raise ConfigError(
                    f"--stop_token_ids: {too_large[0]} is not a token id of this model "
                    f"(its vocabulary has ids 0..{facts.vocab_size - 1})"
                )
        return facts

    def placement_key(self) -> dict[str, str]:
        """The dtype and device kind the model will run in, for keys of stored results (a
        sweep's rows, eval.py's request cache): ``--dtype`` / ``--device`` left at their
        defaults mean float32 on a CPU machine and bfloat16 on a GPU one, whose results
        must not answer each other's. Empty for float32 on CPU, so that the keys of
        default CPU runs stay what they were."""
        device = torch.device(self.device or default_device()).type
        dtype = str(resolve_dtype(self.dtype, device)).removeprefix("torch.")
        return {} if (dtype, device) == ("float32", "cpu") else {"placement": f"{dtype} {device}"}

    def load_generator(self, context: dist.DistributedContext) -> Generator:
        """Seed torch with ``seed``, load the model onto this rank's device, wrap it in a
        :class:`Generator`.

        Raises:
            ModelLoadError: the model cannot be found or loaded.
        """
        torch.manual_seed(self.seed)
        model, tokenizer = load_model_and_tokenizer(
            self.model, self.dtype, dist.device_for(context, self.device), self.model_kwargs
        )
        generator = Generator(model, tokenizer)
        ranking = None
        if self.draft_vocab_corpus:
            ranking = corpus_token_ranking(tokenizer, self.draft_vocab_corpus, generator.layerwise)
        generator.draft = load_draft_exit(
            generator.layerwise, self.draft_adapter, self.draft_vocab_size, ranking
        )
        return generator


def corpus_token_ranking(tokenizer, patterns: Sequence[str], model) -> torch.Tensor:
    """Token ids ranked by their count over the files of ``patterns`` (most frequent first)."""
    from self_speculation.training.data import read_texts, resolve_files

    counts: list[int] = []
    for text in read_texts(resolve_files(patterns, flag="--draft_vocab_corpus")):
        counts.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not counts:
        raise ConfigError(f"--draft_vocab_corpus {' '.join(patterns)} holds no text")
    return rank_tokens(torch.tensor(counts), model.lm_head.weight.shape[0])


@dataclass
class GenerationArguments:
    """Generation flags; same names and defaults as ``self_speculation.GenerationConfig``.

    ``generation_strategy`` may list several strategies separated by commas
    (``autoregressive,self_speculative``) where a script can compare them.
    """

    max_steps: int = 512
    """Most tokens to generate."""
    exit_layer: int = UNSET
    """E: drafts (or early-exit decoding) use layers [0, E); -1: model default."""
    num_speculations: int = UNSET
    """Draft tokens per self-speculative step (adaptive: the most); -1: model default."""
    generation_strategy: str = GenerationStrategyName.AUTOREGRESSIVE.value
    """autoregressive, self_speculative (chains of k drafts), tree (token trees from the
    early exit) or adaptive (chains of 1, 2, 4 ... k drafts, chosen per step from
    the recent acceptance); benchmark.py and sweep.py take a
    comma-separated list to compare"""
    sample: bool = True
    """Sample (True) or greedy argmax (False)"""
    temperature: float = 0.6
    """Sampling temperature (the original tools' default)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0: off."""
    top_p: float = 0.9
    """Nucleus sampling threshold; 1.0: off."""
    no_repeat_ngram_size: int | None = None
    """Never repeat an n-gram of this size (transformers' no_repeat_ngram_size); 0: off, a
    checkpoint's own setting too; default: the checkpoint's (off when it has none)."""
    stop_words: list[str] | None = None
    """Stop once the output contains one of these (a special token's text, "<|im_end|>": at
    that token)."""
    stop_token_ids: list[int] | None = None
    """Extra end-of-sequence token ids."""
    draft_confidence_threshold: float = 0.0
    """Stop drafting once a draft's top probability is below this (0: off, as the original)."""
    compile: str = simple_field(default="auto", nargs="?", const="true")
    """Fast path: torch.compile the decoding passes (once per batch size, E and k; on CPU
    kept on disk, so a later process loads them): True, False or auto. auto compiles when
    a run's expected tokens per decoding path (prompts x max_steps or x the model's
    context where shorter, per process) reach
    12,000, where a first compile pays for itself with a margin (2-core CPU, the shipped
    model: about 90 s to compile its passes, about 9 ms saved per token, as 385 vs 85 tok/s
    autoregressive in the README's run: about 10,000; docs/fast-path.md); passes already
    compiled load in ~2 s and pay after ~250 tokens: give True then. generate.py counts its
    one prompt's; prompts from stdin and eval.py's requests (not known up front)
    stay eager under auto."""
    tree_branching: list[int] | None = None
    """tree: children per node at each depth, e.g. 2 2 1 (the depth stands for
    num_speculations); default: 2 2 then 1s to depth num_speculations."""
    adaptive_exit_layers: list[int] | None = None
    """adaptive: more exit layers to draft from, e.g. 5 7 (with --exit_layer), each step
    choosing the exit too; default: --exit_layer only."""
    token_healing: bool = True
    """Back the prompt up over a trailing whitespace token (newline, indentation) that longer
    tokens extend, and let the model choose that boundary; the text still follows the prompt.
    generate.py --chat_template True leaves it off (the template's own boundary)."""

    def __post_init__(self) -> None:
        names = self._strategy_names()
        valid = [strategy.value for strategy in GenerationStrategyName]
        for name in names:
            if name not in valid:
                raise ConfigError(
                    f"unknown generation_strategy '{name}' (choose from {', '.join(valid)})"
                )
        if not names:
            raise ConfigError("--generation_strategy is empty")
        if len(set(names)) != len(names):
            raise ConfigError(
                f"--generation_strategy lists a strategy twice: {self.generation_strategy}"
            )
        if self.stop_words:
            self.stop_words = [command_line_text(word) for word in self.stop_words]
        for word in self.stop_words or []:
            require_utf8(word, "--stop_words", from_bytes=True)
        spelling = str(self.compile).strip().lower()  # a Python bool too: "true", "false"
        if spelling in _COMPILE_SPELLINGS:
            self.compile = _COMPILE_SPELLINGS[spelling]
        else:
            raise ConfigError(f"--compile must be True, False or auto, got '{self.compile}'")
        self.configs()  # GenerationConfig validates the remaining values, per strategy

    def _strategy_names(self) -> list[str]:
        return [name.strip() for name in self.generation_strategy.split(",") if name.strip()]

    @property
    def strategies(self) -> list[GenerationStrategyName]:
        """The strategies named by ``generation_strategy``, in the order given."""
        return [GenerationStrategyName(name) for name in self._strategy_names()]

    def compile_for(self, expected_tokens: int | None) -> bool:
        """``--compile`` for a run expected to generate ``expected_tokens`` tokens per
        process (None: not known): auto compiles from COMPILE_BREAK_EVEN_TOKENS on."""
        if self.compile != "auto":
            return self.compile == "true"
        if not fast_path_measured():  # an older torch: compile only when asked to
            return False
        return expected_tokens is not None and expected_tokens >= COMPILE_BREAK_EVEN_TOKENS

    def announce_compile(self, expected_tokens: int | None) -> None:
        """Says in the log when ``--compile auto`` turns the fast path on, and why (staying
        eager, the default for short runs, is said at debug level only)."""
        if self.compile != "auto":
            return
        on = self.compile_for(expected_tokens)
        if not fast_path_measured():
            logger.info(
                "--compile auto: eager decoding (the fast path's speed was measured on torch "
                ">= 2.8, this is %s; --compile True uses it anyway)",
                torch.__version__,
            )
            return
        logger.log(
            logging.INFO if on else logging.DEBUG,
            "--compile auto: %s (%s tokens expected in this process; compiling pays from about %s)",
            "fast path on" if on else "eager decoding",
            "unknown" if expected_tokens is None else f"up to {expected_tokens:,}",
            f"{COMPILE_BREAK_EVEN_TOKENS:,}",
        )

    def config(
        self,
        strategy: GenerationStrategyName | str | None = None,
        expected_tokens: int | None = None,
    ) -> GenerationConfig:
        """The engine's config for ``strategy`` (default: the first one listed), for a run of
        ``expected_tokens`` generated tokens per process (None: not known; ``--compile auto``
        then stays eager)."""
        fields = {field.name for field in dataclasses.fields(GenerationConfig)}
        # Engine fields without a flag here keep GenerationConfig's defaults.
        values = {name: getattr(self, name) for name in fields if hasattr(self, name)}
        values["compile"] = self.compile_for(expected_tokens)
        values["generation_strategy"] = GenerationStrategyName(strategy or self.strategies[0])
        # Compared with adaptive or tree: their shape settings are theirs only.
        for owner, setting in (
            (GenerationStrategyName.ADAPTIVE, "adaptive_exit_layers"),
            (GenerationStrategyName.TREE, "tree_branching"),
        ):
            if values["generation_strategy"] is not owner and owner in self.strategies:
                values[setting] = None
        return GenerationConfig(**values)

    def configs(self, expected_tokens: int | None = None) -> list[GenerationConfig]:
        """One engine config per listed strategy (``expected_tokens``: see ``config``).

        When several strategies are compared, ``exit_layer`` / ``num_speculations`` are the
        self-speculative settings and ``autoregressive`` is the full model (the baseline);
        alone, ``autoregressive`` with ``--exit_layer E`` is early-exit decoding.
        """
        configs = [self.config(strategy, expected_tokens) for strategy in self.strategies]
        if len(configs) > 1:
            configs = [
                dataclasses.replace(config, exit_layer=UNSET, num_speculations=UNSET)
                if config.generation_strategy is GenerationStrategyName.AUTOREGRESSIVE
                else config
                for config in configs
            ]
        return configs


@dataclass
class BenchmarkArguments:
    """Which samples to run (the original tools' datasets, and custom JSONL)."""

    dataset: str = "human_eval"
    """One of cnn_dm_summarization, xsum_summarization, cnn_dm_lm, human_eval, top_v2, custom_jsonl."""
    data_path: str | None = None
    """Local copy: a JSONL file (or one JSON array of records) or a directory saved by datasets."""
    random_shuffle: bool = True
    """Shuffle (seeded) before taking num_samples."""
    num_samples: int | None = None
    """How many samples (default: all)"""
    n_shot: int = 0
    """Solved examples put before each prompt."""
    template: str | None = None
    """Format of each prompt, e.g. "Question: {message} Answer:" (the prompt goes at {message})."""
    prompt_field: str = "prompt"
    """custom_jsonl: field holding the prompt."""
    response_field: str = "response"
    """custom_jsonl: field holding the reference output."""
    rstrip_prompt: bool = False
    """Strip trailing whitespace from each final prompt. HumanEval prompts end in a newline,
    which BPE tokenizers usually merge with the next line's indentation: a prompt ending in
    a lone newline token puts small models off the text they were trained on."""

    def __post_init__(self) -> None:
        if self.data_path is not None and not self.data_path.strip():
            raise ConfigError("--data_path is empty (give a JSONL file or a saved dataset folder)")
        if self.data_path is not None:  # --data_path=~/x.jsonl reaches us unexpanded
            self.data_path = expand_home(self.data_path, "--data_path")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"--num_samples must be >= 1, got {self.num_samples}")
        if self.n_shot < 0:
            raise ConfigError(f"--n_shot must be >= 0, got {self.n_shot}")
        if self.template is not None and "{message}" not in self.template:
            raise ConfigError("--template must contain '{message}' where the prompt goes")
        if self.template is not None:
            self.template = command_line_text(self.template)
            require_utf8(self.template, "--template", from_bytes=True)


def parse_args(
    *classes: type,
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> tuple[Any, ...]:
    """Parse ``argv`` into one instance of each dataclass in ``classes`` (flat flag names).

    Raises:
        ArgumentsError: unknown flag, missing required flag or unparsable value.
        ConfigError: a value the dataclasses' ``__post_init__`` rejects.
    """
    parser = FlagParser(prog=prog, description=description)  # --max_step is not --max_steps
    for position, cls in enumerate(classes):
        parser.add_arguments(cls, dest=f"group{position}")
    namespace = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return tuple(getattr(namespace, f"group{position}") for position in range(len(classes)))


@contextlib.contextmanager
def distributed_run(
    args: Arguments, one_process: str | None = None
) -> Iterator[dist.DistributedContext]:
    """The run's place among torchrun's processes; the process group is torn down at the end.

    Args:
        args: the script's common arguments (``distributed``, ``device``).
        one_process: for a script that runs as one process only, its name: launched as
            several processes, it is then an error.

    Raises:
        ConfigError: ``--distributed`` contradicts the launch, or several processes run a
            ``one_process`` script.
    """
    if one_process is not None:  # before the process group: joining it waits for the others
        refuse_several_processes(one_process)
    apply_num_threads(args.num_threads)  # before the process group and the model
    context = dist.setup(args.distributed, args.device)
    try:
        yield context
    finally:
        dist.teardown(context)


def refuse_several_processes(script: str) -> None:
    """For a script that runs as one process only (e.g. every process would take its output
    folder's lock).

    Raises:
        ConfigError: it was launched as several processes (torchrun).
    """
    if dist.launch_environment()[1] > 1:
        raise ConfigError(
            f"{script} runs as one process: use python or torchrun --nproc_per_node 1"
        )


def one_strategy(
    generation: GenerationArguments, prog: str, expected_tokens: int | None = None
) -> GenerationConfig:
    """The one config of a script that runs a single ``--generation_strategy``
    (``expected_tokens``: see ``GenerationArguments.config``); says what ``--compile auto``
    decided.

    Raises:
        ConfigError: several strategies were listed.
    """
    if len(generation.strategies) > 1:
        raise ConfigError(f"{prog} takes one --generation_strategy")
    generation.announce_compile(expected_tokens)
    return generation.config(expected_tokens=expected_tokens)


def arguments_dict(*instances: Any) -> dict[str, Any]:
    """All fields of the argument dataclasses, flat, JSON-ready (as given on the CLI)."""
    merged: dict[str, Any] = {}
    for instance in instances:
        merged.update(dataclasses.asdict(instance))
    return merged


def setup_logging(rank: int | None = None) -> None:
    """INFO logs to stderr (rank-prefixed under torchrun); quieter third-party loggers."""
    log_to_stderr(logging.INFO, rank)
    # huggingface_hub logs each retry of an unreachable hub twice (its own handler, then
    # ours): 25-46 lines before the one-line error. The error says what failed.
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:  # an older hub without it: its warnings stay
        pass
    for noisy in (
        "httpx",
        "urllib3",
        "filelock",
        "fsspec",
        "datasets",
        "transformers",
        "lm_eval",
        "absl",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def error_line(error: BaseException) -> str:
    """``error`` as one line; an OSError as "<file>: <reason>" rather than "[Errno N] ..."."""
    if isinstance(error, OSError) and error.strerror:
        where = error.filename if error.filename is not None else ""
        target = f" -> {error.filename2}" if error.filename2 is not None else ""
        message = f"{where}{target}: {error.strerror}" if where else error.strerror
    else:
        message = str(error)
    return " ".join(message.split()) or type(error).__name__


def report_out_of_memory(error: BaseException, prog: str, hint: str) -> bool:
    """Write "``prog``: error: out of memory (...): ``hint``" for an allocation failure
    (torch.OutOfMemoryError on a GPU, "can't allocate memory" from the CPU allocator,
    MemoryError) and return True; return False (writing nothing) for anything else."""
    text = str(error)
    if not isinstance(error, MemoryError | torch.OutOfMemoryError) and (
        "can't allocate memory" not in text
    ):
        return False
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    sys.stderr.write(f"{prog}: error: out of memory ({first[:200]}): {hint}\n")
    return True


def report_lost_process(error: BaseException, prog: str) -> bool:
    """Write "``prog``: error: lost contact with another process of this run (...)" for a
    collective that failed because a peer under torchrun is gone (killed, or ended by its
    own error, which it reports itself), and return True; return False (writing nothing)
    for anything else. Without it the survivor's gloo traceback buried the peer's line."""
    reason = dist.lost_process(error)
    if reason is None:
        return False
    sys.stderr.write(
        f"{prog}: error: lost contact with another process of this run ({reason}); "
        "that process's own output says why it stopped\n"
    )
    return True


def usable_standard_streams() -> None:
    """Standard output and error that any text can be written to.

    A model writes any Unicode, and a stream whose encoding lacks a character
    (``PYTHONIOENCODING=ascii``, a latin-1 locale) raised UnicodeEncodeError mid-answer: a
    traceback, and no result document. Such characters are written as backslash escapes, as
    Python's own standard error does (the result document keeps the text as it is). A
    stream closed at start (``>&-``: some schedulers and daemons) is None in ``sys``, and
    the first answer raised AttributeError: it writes to os.devnull instead.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115
        elif getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def run_main(main: Callable[[list[str]], int | None], prog: str | None = None) -> NoReturn:
    """Run ``main(sys.argv[1:])`` and exit with its status.

    A :class:`LayerSkipError` (bad flag, bad input, unreachable model or data), an
    ``OSError`` (e.g. an ``--output_dir`` that cannot be written), running out of memory or
    Ctrl-C becomes ONE line on stderr and a non-zero exit status, with no traceback. A
    reader that closes standard output early (``| head``) ends the run quietly.
    """
    prog = prog or os.path.basename(sys.argv[0])
    usable_standard_streams()
    setup_logging()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, remembered_interrupt)
    try:
        status = main(sys.argv[1:])
        if not status:  # one swallowed by a finalizer after the last check: still Ctrl-C
            check_interrupted()
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    except (LayerSkipError, OSError) as error:
        sys.stderr.write(f"{prog}: error: {error_line(error)}\n")
        sys.exit(EXIT_ERROR)
    except (MemoryError, RuntimeError) as error:
        hint = "try a smaller --max_steps, fewer samples per batch or a lower-precision --dtype"
        if not (report_out_of_memory(error, prog, hint) or report_lost_process(error, prog)):
            raise
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(status or 0)
