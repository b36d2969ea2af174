"""The command line of ``train.py``: one dataclass per concern, validated on construction.

The dataclasses are the CLI (simple-parsing; booleans as ``--flag True``; an unknown flag is
an error). ``--recipe FILE`` reads a JSON recipe (``configs/recipe-*.json``): its ``flags``
are command-line flags given before the real ones, so the command line overrides them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import simple_parsing

from self_speculation.cli import FlagParser
from self_speculation.errors import ConfigError, expand_home, require_thread_count
from self_speculation.training.curriculum import Curriculum
from self_speculation.training.early_exit_loss import ExitScale
from self_speculation.training.layer_dropout import DropoutSchedule, DropoutShape
from self_speculation.training.presets import PRESETS

logger = logging.getLogger(__name__)

# While a command line is parsed: the flags only its --recipe file gave (``parse_config``).
_RECIPE_ONLY: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "recipe_only", default=frozenset()
)

MIN_VOCAB_SIZE = 300  # 256 byte tokens + the special tokens
MAX_VOCAB_SIZE = 2**20
MAX_SEED = 2**32 - 1  # as the other scripts (numpy's limit); torch overflows far above it


def _enum(enum_type: type, value: Any, flag: str) -> Any:
    try:
        return enum_type(value.value if isinstance(value, enum_type) else value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ConfigError(f"--{flag} must be one of {choices}, got '{value}'") from None


DEFAULT_VOCAB_SIZE = 4096


@dataclass
class ModelArguments:
    """What to train."""

    model: str | None = None  # existing model (local dir or hub id) to continue training
    preset: str | None = simple_parsing.field(
        default=None,
        metavar="{" + ",".join(PRESETS) + "}",
        help=f"architecture from scratch: {', '.join(PRESETS)}",
    )
    config_file: str | None = None  # architecture from scratch: a JSON config (model_type + fields)
    vocab_size: int = DEFAULT_VOCAB_SIZE  # tokenizer size when training from scratch
    seq_len: int = 512  # tokens per training sequence

    def __post_init__(self) -> None:
        chosen = [name for name in ("model", "preset", "config_file") if getattr(self, name)]
        if len(chosen) > 1:
            raise ConfigError(
                f"give only one of --model, --preset, --config_file (got {', '.join(chosen)})"
            )
        if self.model and self.vocab_size != DEFAULT_VOCAB_SIZE:
            raise ConfigError(
                f"--vocab_size {self.vocab_size} sizes a tokenizer trained from scratch (--preset, "
                "--config_file); --model continues with its own tokenizer"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            # Checked now, not after reading the data; a huge size makes the tokenizer
            # trainer abort the process trying to reserve memory for it.
            raise ConfigError(
                f"--vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] for a byte-level "
                f"BPE (256 bytes + specials), got {self.vocab_size}"
            )


@dataclass
class DataArguments:
    """What to train on."""

    data: list[str] = field(default_factory=list)  # globs of text/code/JSONL files ('**' recursive)
    exclude: list[str] = field(default_factory=list)  # globs of paths to leave out (held-out)
    text_field: str = "text"  # the JSONL / dataset field holding the text
    dataset: str | None = None  # a `datasets` dataset name (needs the network or its cache)
    dataset_config: str | None = None
    dataset_split: str = "train"

    def __post_init__(self) -> None:
        if not self.data and not self.dataset:
            raise ConfigError("no training data: give --data GLOB... or --dataset NAME")
        if not self.dataset and (self.dataset_config is not None or self.dataset_split != "train"):
            raise ConfigError(
                "--dataset_config and --dataset_split choose what --dataset loads; without "
                "--dataset they have no effect"
            )


@dataclass
class LayerSkipArguments:
    """The LayerSkip recipe (paper §4); p_max 0 and early_exit_loss False give plain training."""

    layer_dropout_p_max: float = 0.1  # largest per-layer skip probability; 0 disables
    layer_dropout_shape: str = DropoutShape.EXPONENTIAL.value
    """D(l), the skip probability over depth: uniform/linear/exponential/log/sin/sigmoid/step"""
    layer_dropout_schedule: str = DropoutSchedule.CONSTANT.value  # S(t): constant/exponential
    early_exit_loss: bool = True  # supervise early exits; False: last layer only
    early_exit_scale: str = ExitScale.LINEAR.value  # e(l): uniform/linear/sum/sqrt/inverse
    early_exit_e_scale: float = 1.0  # multiplier of the non-final exits' weights
    early_exit_curriculum: str = Curriculum.NONE.value  # none/rotational/gradual
    early_exit_rotation: int = 2  # R of the rotational curriculum
    early_exit_position_fraction: float = 0.125  # share of positions supervised at non-final exits

    def __post_init__(self) -> None:
        self.layer_dropout_shape = _enum(
            DropoutShape, self.layer_dropout_shape, "layer_dropout_shape"
        ).value
        self.layer_dropout_schedule = _enum(
            DropoutSchedule, self.layer_dropout_schedule, "layer_dropout_schedule"
        ).value
        self.early_exit_scale = _enum(ExitScale, self.early_exit_scale, "early_exit_scale").value
        self.early_exit_curriculum = _enum(
            Curriculum, self.early_exit_curriculum, "early_exit_curriculum"
        ).value
        if not 0.0 <= self.layer_dropout_p_max < 1.0:
            # At 1 every sample skips the last layer (every layer, uniform): it never trains,
            # yet the exported model runs it.
            raise ConfigError(
                f"--layer_dropout_p_max must be in [0, 1), got {self.layer_dropout_p_max}"
            )
        if not 0 <= self.early_exit_e_scale < math.inf:  # nan / inf: a NaN loss
            raise ConfigError(
                f"--early_exit_e_scale must be a finite number >= 0, got {self.early_exit_e_scale}"
            )
        if self.early_exit_rotation < 1:
            raise ConfigError(f"--early_exit_rotation must be >= 1, got {self.early_exit_rotation}")
        if not 0.0 < self.early_exit_position_fraction <= 1.0:
            raise ConfigError(
                f"--early_exit_position_fraction must be in (0, 1], got {self.early_exit_position_fraction}"
            )
        self._refuse_unused()

    def _refuse_unused(self) -> None:
        """A recipe setting that another one switches off would be ignored without a word
        (a curriculum with the early-exit loss off trains the last layer alone): refused,
        or, when only a --recipe file gave it and the command line switched it off (an
        ablation of a recipe), left at its default with a log line."""
        defaults = {item.name: item.default for item in fields(self)}
        for name, switch in unused_recipe_settings(vars(self)).items():
            if getattr(self, name) == defaults[name]:
                continue
            if name in _RECIPE_ONLY.get():
                logger.info(
                    "the recipe's --%s %s has no effect with %s: left at its default (%s)",
                    name, getattr(self, name), switch, defaults[name],
                )  # fmt: skip
                setattr(self, name, defaults[name])
            else:
                raise ConfigError(
                    f"--{name} {getattr(self, name)} has no effect with {switch}; "
                    f"leave it at its default ({defaults[name]}) or change that setting"
                )


def unused_recipe_settings(recipe: dict[str, Any]) -> dict[str, str]:
    """The recipe settings (``LayerSkipArguments`` fields) that others switch off, each with
    the flag that does; e.g. the curriculum when the early-exit loss is off."""
    unused = {}
    if not recipe.get("early_exit_loss", True):
        switch = "--early_exit_loss False (only the last layer's loss is trained)"
        for name in ("scale", "e_scale", "curriculum", "position_fraction"):
            unused[f"early_exit_{name}"] = switch
    if recipe.get("layer_dropout_p_max") == 0:
        switch = "--layer_dropout_p_max 0 (no layer is dropped)"
        unused.update(dict.fromkeys(("layer_dropout_shape", "layer_dropout_schedule"), switch))
    curriculum = recipe.get("early_exit_curriculum", Curriculum.NONE.value)
    if curriculum != Curriculum.ROTATIONAL.value:
        unused["early_exit_rotation"] = f"--early_exit_curriculum {curriculum}"
    return unused


@dataclass
class TrainingArguments:
    """How to train."""

    output_dir: str = "runs/train"
    # Without it, an output_dir holding a model, an adapter, a folder shipped under models/
    # or another run's files is refused (--resume True continues a run's own folder).
    overwrite: bool = False  # write into such an output_dir anyway (a new run starts over)
    seed: int = 42
    batch_size: int = 8  # sequences per micro-batch and process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_tokens: int = 0  # token budget (all processes); sets the schedule's length; 0: none
    max_minutes: float = 0.0  # wall-time budget; 0: none (alone: schedule from measured speed)
    device: str = "auto"  # auto (cuda when there is one), cpu, cuda; torchrun: one GPU per process
    bf16: bool = True  # bf16 autocast, fp32 weights and optimizer (a CPU without bf16: slower)
    fsdp: bool = False  # shard weights, gradients and optimizer state (FSDP2, per decoder layer)
    fsdp_cpu_offload: bool = False
    """with --fsdp True: keep the shards (and the optimizer) in CPU RAM"""
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    # torch CPU threads per process (0: torch's default, one per core). 1 by default: on a
    # shared machine more OpenMP threads spin against other work (10-60x slower decoding
    # measured); raise it on a machine of your own (OMP_WAIT_POLICY=PASSIVE when shared).
    num_threads: int = 1
    log_every: int = 10  # optimizer steps between log lines
    save_every_minutes: float = 10.0  # checkpoint interval; 0: only at the end (and on a signal)
    save_every_steps: int = 0  # also checkpoint every N optimizer steps; 0: off
    resume: bool = False  # continue from output_dir/checkpoint
    stop_after_steps: int = 0  # stop + checkpoint after N steps, schedule unchanged (0: off)
    exit_layer: int = -1
    """recommended exit layer for generation_config.json; -1: a continued model's, else
    max(1, L//4)"""
    num_speculations: int = -1
    """recommended draft length for generation_config.json; -1: a continued model's, else 4"""

    def __post_init__(self) -> None:
        self.output_dir = expand_home(self.output_dir, "--output_dir")  # as --model is
        for name in ("batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps",
            "max_tokens",
            "num_threads",
            "stop_after_steps",
            "save_every_steps",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_minutes", "save_every_minutes", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # nan would turn the budget or clipping off unseen
                raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_tokens == 0 and self.max_minutes == 0:
            raise ConfigError("give a budget: --max_tokens N and/or --max_minutes M")
        if not 0 < self.learning_rate < math.inf:
            raise ConfigError(
                f"--learning_rate must be a finite number > 0, got {self.learning_rate}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        require_thread_count(self.num_threads)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.num_speculations > 64:
            raise ConfigError(f"--num_speculations must be at most 64, got {self.num_speculations}")
        for name in ("exit_layer", "num_speculations"):
            if getattr(self, name) != -1 and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1 (or -1), got {getattr(self, name)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,4})?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ConfigError("--fsdp_cpu_offload True needs --fsdp True")


@dataclass
class TrainConfig:
    """Every setting of a training run."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    layerskip: LayerSkipArguments = field(default_factory=LayerSkipArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)


RECIPE_FLAG = "--recipe"
RECIPE_KEYS = frozenset({"description", "sources", "flags"})  # what a recipe file holds


def recipe_arguments(path: str) -> list[str]:
    """The command-line flags of a JSON recipe file: ``{"flags": {"name": value, ...}}``.

    Booleans become ``True``/``False``, lists several values of one flag.

    Raises:
        ConfigError: unreadable file, no ``flags`` object.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON, not UTF-8
        reason = "JSON nested too deeply" if isinstance(error, RecursionError) else error
        raise ConfigError(f"cannot read recipe {path}: {reason}") from None
    flags = document.get("flags") if isinstance(document, dict) else None
    if not isinstance(flags, dict):
        raise ConfigError(f"recipe {path} must hold a JSON object with a 'flags' object")
    unknown = sorted(set(document) - RECIPE_KEYS)
    if unknown:  # a flag written beside "flags" (or a typo) would be silently ignored
        raise ConfigError(
            f"recipe {path}: unknown key '{unknown[0]}' (a recipe holds "
            f"{', '.join(sorted(RECIPE_KEYS))}; flags go inside 'flags')"
        )
    arguments: list[str] = []
    for name, value in flags.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item is None or isinstance(item, dict | list):
                # str() would pass 'None' or a Python repr on as the flag's value
                raise ConfigError(
                    f"recipe {path}: flag '{name}' must be a string, number or boolean "
                    f"(or a list of them), got {json.dumps(value)}"
                )
        arguments.append(f"--{name}")
        arguments.extend(str(item) for item in values)
    return arguments


def _split_recipe(argv: list[str]) -> tuple[list[str], list[str]]:
    """The flags of ``argv``'s ``--recipe`` files, and the rest of ``argv``."""
    if RECIPE_FLAG not in argv and not any(a.startswith(RECIPE_FLAG + "=") for a in argv):
        return [], argv
    rest: list[str] = []
    recipe: list[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument == RECIPE_FLAG:
            if index + 1 >= len(argv):
                raise ConfigError("--recipe needs a file")
            recipe += recipe_arguments(argv[index + 1])
            index += 2
            continue
        if argument.startswith(RECIPE_FLAG + "="):
            recipe += recipe_arguments(argument.split("=", 1)[1])
        else:
            rest.append(argument)
        index += 1
    return recipe, rest


def _flag_names(argv: list[str]) -> set[str]:
    """The names of the flags in ``argv`` (``--name`` or ``--name=value``; ``--noname``
    names ``name`` too)."""
    names = {item[2:].split("=", 1)[0] for item in argv if item.startswith("--")}
    return names | {name[2:] for name in names if name.startswith("no")}


def parse_config(argv: list[str] | None = None, prog: str = "train.py") -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig`.

    Raises:
        ArgumentsError: unknown flag (prefixes are not taken for flags), unparsable value.
        ConfigError: a value the dataclasses' ``__post_init__`` rejects.
    """
    recipe, rest = _split_recipe(list(sys.argv[1:] if argv is None else argv))
    argv = recipe + rest
    recipe_only = _flag_names(recipe) - _flag_names(rest)
    parser = FlagParser(prog=prog)
    # Expanded above; declared for --help (the README's multi-GPU command uses it).
    parser.add_argument(
        RECIPE_FLAG,
        metavar="FILE",
        help="a JSON recipe (configs/recipe-*.json) whose flags come before the others given",
    )
    for name, kind in (
        ("model", ModelArguments),
        ("data", DataArguments),
        ("layerskip", LayerSkipArguments),
        ("training", TrainingArguments),
    ):
        parser.add_arguments(kind, dest=name)
    token = _RECIPE_ONLY.set(frozenset(recipe_only))
    try:
        arguments = parser.parse_args(argv)
    finally:
        _RECIPE_ONLY.reset(token)
    return TrainConfig(
        model=arguments.model,
        data=arguments.data,
        layerskip=arguments.layerskip,
        training=arguments.training,
    )
