"""The LayerSkip training loop behind ``train.py``: config dataclasses and :func:`train`.

The config dataclasses are the command line (simple-parsing; booleans as ``--flag True``).
The loop wires the training pieces together: :func:`apply_layer_dropout` (paper §4.1),
:func:`active_exits` (§4.2 curriculum) and :class:`LayerSkipObjective` (§4.2 early-exit loss),
with AdamW, linear warm-up + cosine decay, gradient accumulation, bf16 autocast, a token
and/or time budget, DDP, and checkpoints that resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import simple_parsing
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from self_speculation.distributed import DistributedContext, barrier, teardown
from self_speculation.distributed import setup as setup_distributed
from self_speculation.errors import ConfigError
from self_speculation.loading import load_model_and_tokenizer
from self_speculation.training.curriculum import Curriculum, active_exits
from self_speculation.training.data import (
    BlockStream,
    hub_texts,
    pack_blocks,
    read_texts,
    resolve_files,
    train_tokenizer,
)
from self_speculation.training.early_exit_loss import ExitScale
from self_speculation.training.layer_dropout import (
    DropoutSchedule,
    DropoutShape,
    apply_layer_dropout,
    schedule_factor,
)
from self_speculation.training.objective import LayerSkipObjective
from self_speculation.training.presets import PRESETS, architecture_config

logger = logging.getLogger("train")

CHECKPOINT_DIR = "checkpoint"
TOKENIZER_DIR = "tokenizer"
LOG_FILE = "train_log.jsonl"
STATE_FILE = "training_state.pt"
# Steps after which a pure time budget fixes its schedule horizon from the measured speed.
HORIZON_PROBE_STEPS = 10


def _enum(enum_type: type, value: Any, flag: str) -> Any:
    try:
        return enum_type(value.value if isinstance(value, enum_type) else value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ConfigError(f"--{flag} must be one of {choices}, got '{value}'") from None


@dataclass
class ModelArguments:
    """What to train."""

    model: str | None = None  # existing model (local dir or hub id) to continue training
    preset: str | None = None  # architecture from scratch: one of PRESETS
    config_file: str | None = None  # architecture from scratch: a JSON config (model_type + fields)
    vocab_size: int = 4096  # tokenizer size when training from scratch
    seq_len: int = 512  # tokens per training sequence

    def __post_init__(self) -> None:
        chosen = [name for name in ("model", "preset", "config_file") if getattr(self, name)]
        if len(chosen) > 1:
            raise ConfigError(
                f"give only one of --model, --preset, --config_file (got {', '.join(chosen)})"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")


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


@dataclass
class LayerSkipArguments:
    """The LayerSkip recipe (paper §4); p_max 0 and early_exit_loss False give plain training."""

    layer_dropout_p_max: float = 0.1  # largest per-layer skip probability; 0 disables
    layer_dropout_shape: str = (
        DropoutShape.EXPONENTIAL.value
    )  # D(l): uniform/linear/exponential/log/sin/sigmoid/step
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
        if not 0.0 <= self.layer_dropout_p_max <= 1.0:
            raise ConfigError(
                f"--layer_dropout_p_max must be in [0, 1], got {self.layer_dropout_p_max}"
            )
        if self.early_exit_e_scale < 0:
            raise ConfigError(f"--early_exit_e_scale must be >= 0, got {self.early_exit_e_scale}")
        if self.early_exit_rotation < 1:
            raise ConfigError(f"--early_exit_rotation must be >= 1, got {self.early_exit_rotation}")
        if not 0.0 < self.early_exit_position_fraction <= 1.0:
            raise ConfigError(
                f"--early_exit_position_fraction must be in (0, 1], got {self.early_exit_position_fraction}"
            )


@dataclass
class TrainingArguments:
    """How to train."""

    output_dir: str = "runs/train"
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
    bf16: bool = True  # bf16 autocast (about 2.6x faster on CPU); weights stay fp32 while training
    num_threads: int = 0  # torch CPU threads per process; 0: torch's default
    log_every: int = 10  # optimizer steps between log lines
    save_every_minutes: float = 10.0  # checkpoint interval; 0: only at the end
    resume: bool = False  # continue from output_dir/checkpoint
    stop_after_steps: int = 0  # stop + checkpoint after N steps, schedule unchanged (0: off)
    exit_layer: int = -1  # recommended exit layer for generation_config.json; -1: max(1, L//4)
    num_speculations: int = 4  # recommended draft length for generation_config.json

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "log_every", "num_speculations"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_tokens", "num_threads", "stop_after_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.max_minutes < 0 or self.save_every_minutes < 0:
            raise ConfigError("--max_minutes and --save_every_minutes must be >= 0")
        if self.max_tokens == 0 and self.max_minutes == 0:
            raise ConfigError("give a budget: --max_tokens N and/or --max_minutes M")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.exit_layer != -1 and self.exit_layer < 1:
            raise ConfigError(f"--exit_layer must be >= 1 (or -1), got {self.exit_layer}")


@dataclass
class TrainConfig:
    """Every setting of a training run."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    layerskip: LayerSkipArguments = field(default_factory=LayerSkipArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)


class _OneLineErrorParser(simple_parsing.ArgumentParser):
    """Command-line errors as one line on stderr, exit status 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def parse_config(argv: list[str] | None = None, prog: str = "train.py") -> TrainConfig:
    """Parse the command line into a :class:`TrainConfig` (unknown flags are errors)."""
    parser = _OneLineErrorParser(prog=prog, add_config_path_arg=False)
    for name, kind in (
        ("model", ModelArguments),
        ("data", DataArguments),
        ("layerskip", LayerSkipArguments),
        ("training", TrainingArguments),
    ):
        parser.add_arguments(kind, dest=name)
    arguments = parser.parse_args(argv)
    return TrainConfig(
        model=arguments.model,
        data=arguments.data,
        layerskip=arguments.layerskip,
        training=arguments.training,
    )


# ----------------------------------------------------------------------------- helpers


def _setup_logging(main: bool) -> None:
    level = logging.INFO if main else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logger.setLevel(level)


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _load_texts(data: DataArguments) -> list[str]:
    texts: list[str] = []
    if data.data:
        files = resolve_files(data.data, data.exclude)
        logger.info("reading %d files", len(files))
        texts.extend(read_texts(files, data.text_field))
    if data.dataset:
        texts.extend(
            hub_texts(data.dataset, data.dataset_config, data.dataset_split, data.text_field)
        )
    if not texts:
        raise ConfigError("the training data is empty")
    return texts


def _atomic_json(path: Path, document: Any) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    temporary.replace(path)


# ----------------------------------------------------------------------------- training


@dataclass
class _Progress:
    """Everything that changes during a run and must survive a resume."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all processes
    blocks: int = 0  # stream positions consumed, all processes
    elapsed_s: float = 0.0  # training wall time before this process started
    total_steps: int | None = None  # schedule horizon T


def build_model_and_tokenizer(
    config: TrainConfig, texts: list[str], distributed: DistributedContext
) -> tuple[nn.Module, Any]:
    """The fp32 model and tokenizer to train: resumed, continued from --model, or new.

    A new run trains its tokenizer on ``texts`` (rank 0; the others load it) and saves it
    under output_dir/tokenizer, where a resumed run finds it again.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(config.training.output_dir)
    torch.manual_seed(config.training.seed)
    if config.training.resume:
        tokenizer = AutoTokenizer.from_pretrained(output_dir / TOKENIZER_DIR)
        architecture = AutoConfig.from_pretrained(output_dir / CHECKPOINT_DIR)
        model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32)
    elif config.model.model:
        # Weights in fp32 for training, whatever they were saved in.
        model, tokenizer = load_model_and_tokenizer(
            config.model.model, dtype="float32", device="cpu"
        )
        if distributed.is_main:
            tokenizer.save_pretrained(output_dir / TOKENIZER_DIR)
    else:
        if distributed.is_main:
            logger.info("training a %d-token byte-level BPE tokenizer", config.model.vocab_size)
            tokenizer = train_tokenizer(texts, config.model.vocab_size)
            tokenizer.save_pretrained(output_dir / TOKENIZER_DIR)
        barrier(distributed)
        tokenizer = AutoTokenizer.from_pretrained(output_dir / TOKENIZER_DIR)
        architecture = architecture_config(
            config.model.preset,
            config.model.config_file,
            vocab_size=len(tokenizer),
            max_position_embeddings=config.model.seq_len,
            special_token_ids=dict(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
        )
        model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.train(), tokenizer


class Trainer:
    """One training run: the recipe wired to a model, an optimizer and the data.

    Args:
        config: the run's settings.
        model: the fp32 causal LM to train (in train mode).
        tokenizer: its tokenizer (saved with the final model).
        blocks: training token blocks [num_blocks, seq_len].
        distributed: this process's rank and the world size.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        tokenizer: Any,
        blocks: torch.Tensor,
        distributed: DistributedContext,
    ) -> None:
        self.config = config
        self.args = args = config.training
        self.recipe = recipe = config.layerskip
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = blocks  # [num_blocks, seq_len]
        self.stream = BlockStream(len(blocks), args.seed)
        self.distributed = distributed
        self.output_dir = Path(args.output_dir)
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.blocks_per_step = (
            args.batch_size * args.gradient_accumulation_steps * distributed.world_size
        )
        self.tokens_per_step = self.blocks_per_step * blocks.shape[1]
        self.progress = _Progress()
        if args.max_tokens:
            self.progress.total_steps = max(1, math.ceil(args.max_tokens / self.tokens_per_step))

        # The recipe (paper §4); one random source per process for skips and position subsets.
        self.generator = torch.Generator().manual_seed(args.seed * 1000 + 17 + distributed.rank)
        self.objective = LayerSkipObjective(
            model,
            scale=recipe.early_exit_scale,
            e_scale=recipe.early_exit_e_scale,
            position_fraction=recipe.early_exit_position_fraction,
            generator=self.generator,
        )
        self.dropout = None
        if recipe.layer_dropout_p_max > 0:
            self.dropout = apply_layer_dropout(
                model,
                recipe.layer_dropout_p_max,
                recipe.layer_dropout_shape,
                recipe.layer_dropout_schedule,
                total_steps=self.progress.total_steps or 1,
                generator=self.generator,
            )
        self.trained: nn.Module = self.objective
        if distributed.world_size > 1:
            # A layer that every sample of a micro-batch skips gets no gradient.
            self.trained = nn.parallel.DistributedDataParallel(
                self.objective, find_unused_parameters=self.dropout is not None
            )
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step, args.warmup_steps, self.progress.total_steps, args.min_lr_ratio
            ),
        )
        self._started = time.monotonic()

    # -- state

    def elapsed(self) -> float:
        """Training wall time of the run so far, across resumes, in seconds."""
        return self.progress.elapsed_s + (time.monotonic() - self._started)

    def save_checkpoint(self) -> None:
        """Model, optimizer, scheduler, progress and every process's RNG states, atomically."""
        rng = {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
        }
        gathered: list[Any] = [rng]
        if self.distributed.world_size > 1:
            gathered = [None] * self.distributed.world_size
            dist.all_gather_object(gathered, rng)
        if self.distributed.is_main:
            checkpoint_dir = self.output_dir / CHECKPOINT_DIR
            temporary = self.output_dir / (CHECKPOINT_DIR + ".tmp")
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            self.model.config.save_pretrained(temporary)
            progress = dataclasses.replace(self.progress, elapsed_s=self.elapsed())
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "progress": dataclasses.asdict(progress),
                "rng": gathered,
                "config": dataclasses.asdict(self.config),
            }
            torch.save(state, temporary / STATE_FILE)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            temporary.rename(checkpoint_dir)
            logger.info("checkpoint at step %d -> %s", self.progress.step, checkpoint_dir)
        barrier(self.distributed)

    def load_checkpoint(self) -> None:
        """Continue exactly where the checkpoint in output_dir left off."""
        path = self.output_dir / CHECKPOINT_DIR / STATE_FILE
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = _Progress(**state["progress"])
        rank = self.distributed.rank
        rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self._started = time.monotonic()
        logger.info("resumed at step %d (%d tokens)", self.progress.step, self.progress.tokens)

    # -- one step

    def supervised_exits(self) -> list[int]:
        """The 1-based exits the loss supervises at the current step (curriculum, §4.2)."""
        if not self.recipe.early_exit_loss:
            return [self.num_layers]
        return active_exits(
            self.recipe.early_exit_curriculum,
            self.progress.step,
            self.progress.total_steps or 1,
            self.num_layers,
            self.recipe.early_exit_rotation,
        )

    def train_step(self, exits: list[int]) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Returns:
            [1 + len(exits)]: the weighted loss, then each exit's cross-entropy, averaged
            over the micro-batches of this process.
        """
        args, distributed = self.args, self.distributed
        if self.dropout is not None:
            self.dropout.set_step(self.progress.step, self.progress.total_steps or 1)
        ddp = isinstance(self.trained, nn.parallel.DistributedDataParallel)
        sums = torch.zeros(len(exits) + 1)  # [1 + exits]
        for micro in range(args.gradient_accumulation_steps):
            offset = (micro * distributed.world_size + distributed.rank) * args.batch_size
            indices = self.stream.indices(self.progress.blocks + offset, args.batch_size)
            input_ids = self.blocks[indices]  # [batch, seq]
            last = micro == args.gradient_accumulation_steps - 1
            with (
                self.trained.no_sync() if ddp and not last else contextlib.nullcontext(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16),
            ):
                result = self.trained(input_ids, exits)
            (result.loss / args.gradient_accumulation_steps).backward()
            losses = [result.loss.detach().float()] + [result.exit_losses[e].float() for e in exits]
            sums += torch.stack(losses)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.blocks += self.blocks_per_step
        self.progress.tokens += self.tokens_per_step
        return sums / args.gradient_accumulation_steps

    def should_stop(self) -> bool:
        """Token budget, time budget or --stop_after_steps reached (agreed by every process)."""
        progress, args = self.progress, self.args
        stop = progress.total_steps is not None and progress.step >= progress.total_steps
        stop = stop or (args.max_minutes > 0 and self.elapsed() >= args.max_minutes * 60.0)
        stop = stop or (args.stop_after_steps > 0 and progress.step >= args.stop_after_steps)
        if self.distributed.world_size > 1:
            flag = torch.tensor(float(stop))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _fix_horizon_from_speed(self) -> None:
        """A pure time budget: set T (schedule, S(t), curriculum) from the measured speed."""
        progress = self.progress
        estimate = int(progress.step * self.args.max_minutes * 60.0 / max(self.elapsed(), 1e-6))
        horizon = torch.tensor(float(max(progress.step + 1, estimate)))
        if self.distributed.world_size > 1:
            dist.broadcast(horizon, 0)
        progress.total_steps = int(horizon.item())
        logger.info("time budget: schedule set to %d steps", progress.total_steps)

    # -- the loop

    def run(self) -> None:
        """Train until a budget is spent; log every --log_every steps; checkpoint."""
        args, main = self.args, self.distributed.is_main
        log_file = (self.output_dir / LOG_FILE).open("a", encoding="utf-8") if main else None
        bar = tqdm(
            total=args.max_tokens or None,
            initial=self.progress.tokens,
            unit="tok",
            unit_scale=True,
            disable=not main,
            mininterval=1.0 if sys.stderr.isatty() else 60.0,
            dynamic_ncols=True,
        )
        last_save = window_started = time.monotonic()
        window_tokens = 0
        try:
            while not self.should_stop():
                exits = self.supervised_exits()
                sums = self.train_step(exits)  # [1 + exits]
                window_tokens += self.tokens_per_step
                bar.update(self.tokens_per_step)
                if self.progress.total_steps is None and self.progress.step == HORIZON_PROBE_STEPS:
                    self._fix_horizon_from_speed()
                if self.progress.step % args.log_every == 0 or self.should_stop():
                    now = time.monotonic()
                    speed = window_tokens / max(now - window_started, 1e-6)
                    self._log(exits, sums, speed, log_file, bar)
                    window_tokens, window_started = 0, now
                if (
                    args.save_every_minutes > 0
                    and time.monotonic() - last_save >= args.save_every_minutes * 60
                ):
                    self.save_checkpoint()
                    last_save = time.monotonic()
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        self.save_checkpoint()

    def _log(
        self, exits: list[int], sums: torch.Tensor, speed: float, log_file: Any, bar: tqdm
    ) -> None:
        if self.distributed.world_size > 1:
            dist.all_reduce(sums)
            sums /= self.distributed.world_size
        if log_file is None:
            return
        dropout_scale = 0.0
        if self.dropout is not None:
            dropout_scale = schedule_factor(
                self.dropout.schedule, self.progress.step, self.progress.total_steps or 1
            )
        record = {
            "step": self.progress.step,
            "tokens": self.progress.tokens,
            "lr": self.scheduler.get_last_lr()[0],
            "loss": round(sums[0].item(), 5),
            "exit_losses": {str(e): round(v, 4) for e, v in zip(exits, sums[1:].tolist())},
            "layer_dropout_scale": dropout_scale,
            "tokens_per_second": round(speed, 1),
            "elapsed_s": round(self.elapsed(), 1),
        }
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        last_exit = sums[-1].item()
        bar.set_postfix(loss=f"{record['loss']:.3f}", last=f"{last_exit:.3f}", refresh=False)
        logger.info(
            "step %d tokens %d loss %.4f last-exit %.4f lr %.2e %.0f tok/s",
            self.progress.step,
            self.progress.tokens,
            record["loss"],
            last_exit,
            record["lr"],
            speed,
        )

    def save_final(self) -> Path:
        """The final model in output_dir: bf16 safetensors, tokenizer, generation config.

        The generation config records the recommended ``exit_layer`` and
        ``num_speculations`` for self-speculative decoding.
        """
        from transformers import GenerationConfig

        if self.dropout is not None:
            self.dropout.remove()
        if self.distributed.is_main:
            args, tokenizer = self.args, self.tokenizer
            final = self.model.eval().to(torch.bfloat16)
            final.config.dtype = torch.bfloat16
            # A fresh GenerationConfig: one derived from the model config ("_from_model_config")
            # loses its extra keys when transformers reloads it.
            final.generation_config = GenerationConfig(
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                exit_layer=args.exit_layer
                if args.exit_layer != -1
                else max(1, self.num_layers // 4),
                num_speculations=args.num_speculations,
            )
            final.save_pretrained(self.output_dir)
            tokenizer.save_pretrained(self.output_dir)
            summary = {
                "steps": self.progress.step,
                "tokens": self.progress.tokens,
                "wall_time_s": round(self.elapsed(), 1),
                "num_layers": self.num_layers,
                "parameters": sum(p.numel() for p in final.parameters()),
            }
            _atomic_json(self.output_dir / "train_summary.json", summary)
            logger.info("final model (%s) -> %s", summary, self.output_dir)
        barrier(self.distributed)
        return self.output_dir


def train(config: TrainConfig) -> Path:
    """Run one training job (parse -> build -> run -> write); returns the final model's dir."""
    distributed = setup_distributed(device="cpu")  # training runs on the CPU (gloo)
    args = config.training
    output_dir = Path(args.output_dir)
    if distributed.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier(distributed)
    _setup_logging(distributed.is_main)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    state_file = output_dir / CHECKPOINT_DIR / STATE_FILE
    if args.resume and not state_file.is_file():
        raise ConfigError(f"--resume True but {state_file} does not exist")
    if not args.resume and state_file.is_file():
        raise ConfigError(
            f"{output_dir} already holds a run; use --resume True or another --output_dir"
        )
    random.seed(args.seed)

    texts = _load_texts(config.data)
    model, tokenizer = build_model_and_tokenizer(config, texts, distributed)
    blocks = pack_blocks(tokenizer, texts, config.model.seq_len)  # [num_blocks, seq_len]
    del texts
    trainer = Trainer(config, model, tokenizer, blocks, distributed)
    logger.info(
        "%s: %d layers, %.2fM parameters; %d blocks of %d tokens (%.2fM tokens); %d tokens/step",
        type(model).__name__,
        trainer.num_layers,
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(blocks),
        config.model.seq_len,
        blocks.numel() / 1e6,
        trainer.tokens_per_step,
    )
    if args.resume:
        trainer.load_checkpoint()
    elif distributed.is_main:
        _atomic_json(
            output_dir / "train_config.json", {"argv": sys.argv, **dataclasses.asdict(config)}
        )
    trainer.run()
    final_dir = trainer.save_final()
    teardown(distributed)
    return final_dir
