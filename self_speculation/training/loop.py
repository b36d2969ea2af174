"""The training loop behind ``train.py``: :class:`Trainer` and :func:`train`.

The loop wires the recipe's pieces together: :func:`apply_layer_dropout` (paper §4.1),
:func:`active_exits` (§4.2 curriculum) and :class:`LayerSkipObjective` (§4.2 early-exit loss),
with AdamW, linear warm-up + cosine decay, gradient accumulation, a token and/or time
budget, and checkpoints (:mod:`checkpointing`) on a timer, every N steps, at the end and on
SIGINT/SIGTERM/SIGHUP. Where it runs (device, FSDP2 or DDP, bf16, activation checkpointing) is
:mod:`distributed_setup`.

Random decisions of the recipe are per sample, not per process: for optimizer step t and
accumulation micro-batch m, one generator seeded from (seed, t, m) draws the skip decisions
and position subsets of the whole global micro-batch on every process, and each process
keeps the rows of its own samples. Training on 1 or N processes (same global batch), and
resuming from a checkpoint, therefore make the same decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from self_speculation.cli import log_to_stderr
from self_speculation.distributed import DistributedContext, barrier, launched_by_torchrun, teardown
from self_speculation.distributed import setup as setup_distributed
from self_speculation.errors import ConfigError, LayerSkipError, real_location
from self_speculation.model_surgery import find_base_model
from self_speculation.output_safety import output_dir_lock
from self_speculation.training.build import TOKENIZER_DIR, build_model_and_tokenizer, load_texts
from self_speculation.training.checkpointing import (
    CHECKPOINT_DIR,
    PREVIOUS_DIR,
    TEMPORARY_DIR,
    checkpoint_exists,
    export_pretrained,
    load_checkpoint,
    read_trainer_state,
    recover_checkpoint,
    save_checkpoint,
)
from self_speculation.training.config import (
    TrainConfig,
    TrainingArguments,
    unused_recipe_settings,
)
from self_speculation.training.curriculum import active_exits
from self_speculation.training.data import BlockStream, pack_blocks
from self_speculation.training.distributed_setup import (
    apply_activation_checkpointing,
    compute_context,
    full_state_dict,
    gradient_sync,
    resolve_device,
    single_process_group,
    wrap_for_training,
)
from self_speculation.training.layer_dropout import (
    apply_layer_dropout,
    keep_from_uniforms,
    schedule_factor,
)
from self_speculation.training.objective import LayerSkipObjective

logger = logging.getLogger("train")

LOG_FILE = "train_log.jsonl"
# Steps after which a pure time budget fixes its schedule horizon from the measured speed.
HORIZON_PROBE_STEPS = 10


def data_fingerprint(blocks: torch.Tensor) -> dict[str, Any]:
    """What identifies the training data of a run: its blocks' count and a hash of their
    tokens (the data position of a checkpoint means nothing on other blocks)."""
    array = blocks.contiguous().numpy()
    return {"blocks": int(blocks.shape[0]), "sha256": hashlib.sha256(memoryview(array)).hexdigest()}


class TrainingInterrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP stopped the run after a checkpoint was written."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path) -> None:
        name = signal.Signals(signal_number).name
        super().__init__(
            f"{name} at step {step}: checkpoint saved in {checkpoint}; continue with --resume True"
        )
        self.exit_code = 128 + signal_number


class TrainingDiverged(LayerSkipError):
    """The loss stopped being finite: nothing after the last checkpoint is saved."""

    def __init__(self, step: int, output_dir: Path) -> None:
        kept = (
            f"the checkpoint in {output_dir / CHECKPOINT_DIR} (an earlier step) is kept; "
            "resume it with a lower --learning_rate"
            if checkpoint_exists(output_dir)
            else "no checkpoint was written yet; try a lower --learning_rate"
        )
        super().__init__(f"training diverged at step {step}: the loss is NaN or infinite; {kept}")


class StopSignals:
    """Turns the first SIGINT/SIGTERM/SIGHUP into a request to stop after the current step
    (SIGHUP: the terminal was closed, whose default ended the run without a checkpoint; left
    alone where it is ignored, as under nohup).

    Alone (``python train.py``), a second signal restores the default handlers and is
    re-raised: an impatient user still gets out at once. Under torchrun a repeated signal is
    ignored: on Ctrl-C the terminal signals every process and torchrun forwards the signal
    again at once, and torchrun itself escalates to SIGKILL after its shutdown timeout (30 s
    by default), so the checkpoint must be written within it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, force_on_repeat: bool | None = None) -> None:
        self.received: int | None = None
        self.force_on_repeat = (
            not launched_by_torchrun() if force_on_repeat is None else force_on_repeat
        )
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for number in self.SIGNALS:
            if number == signal.SIGHUP and signal.getsignal(number) == signal.SIG_IGN:
                continue  # nohup: the run was asked to outlive its terminal
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = number
            logger.warning("%s: stopping after this step", signal.Signals(number).name)
        elif self.force_on_repeat:
            self.__exit__()
            signal.raise_signal(number)


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine decay to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def recipe_uniforms(
    seed: int, step: int, first: int, count: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """U(0, 1) draws [count, *shape] for the samples ``first .. first + count - 1`` of an
    optimizer step (a sample's place in the step's data, all processes and micro-batches).

    Each sample's draws come from a generator seeded by (seed, step, place), so they do not
    depend on how the step is split into processes and micro-batches.
    """
    draws = []
    for place in range(first, first + count):
        generator = torch.Generator().manual_seed(
            ((seed * 1_000_003 + step) * 1_000_033 + place) % 2**63
        )
        draws.append(torch.rand(*shape, generator=generator))
    return torch.stack(draws)


def _setup_logging(main: bool) -> None:
    """INFO from the main process, warnings from the others, in every script's format."""
    level = logging.INFO if main else logging.WARNING
    log_to_stderr(level, force=False)
    logger.setLevel(level)


def _atomic_json(path: Path, document: Any) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    temporary.replace(path)


@dataclass
class Progress:
    """Everything that changes during a run and must survive a resume."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all processes
    blocks: int = 0  # data position: stream positions consumed, all processes
    elapsed_s: float = 0.0  # training wall time before this process started
    total_steps: int | None = None  # schedule horizon T; None while a time budget measures it


class Trainer:
    """One training run: the recipe wired to a model, an optimizer and the data.

    Args:
        config: the run's settings.
        model: the fp32 causal LM to train (in train mode, on the CPU).
        tokenizer: its tokenizer (saved with the final model).
        blocks: training token blocks [num_blocks, seq_len].
        distributed: this process's rank and the world size.
        device: where this process computes.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        tokenizer: Any,
        blocks: torch.Tensor,
        distributed: DistributedContext,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.args = args = config.training
        self.recipe = recipe = config.layerskip
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = blocks  # [num_blocks, seq_len]
        self.stream = BlockStream(len(blocks), args.seed)
        self.data = data_fingerprint(blocks)
        self.distributed = distributed
        self.device = device or torch.device("cpu")
        self.output_dir = Path(args.output_dir)
        self.seq_len = blocks.shape[1]
        self.global_batch = args.batch_size * distributed.world_size  # one micro-step, all ranks
        self.blocks_per_step = self.global_batch * args.gradient_accumulation_steps
        self.tokens_per_step = self.blocks_per_step * self.seq_len
        self.progress = Progress()
        if args.max_tokens:
            self.progress.total_steps = max(1, math.ceil(args.max_tokens / self.tokens_per_step))

        # Random source of anything not planned per sample (kept in checkpoints).
        self.generator = torch.Generator().manual_seed(args.seed * 1000 + 17 + distributed.rank)
        self.objective = LayerSkipObjective(
            model,
            scale=recipe.early_exit_scale,
            e_scale=recipe.early_exit_e_scale,
            position_fraction=recipe.early_exit_position_fraction,
            generator=self.generator,
        )
        self.num_layers = self.objective.num_layers
        self.num_parameters = sum(p.numel() for p in model.parameters())  # before sharding
        layers = find_base_model(model).layers
        if args.activation_checkpointing:  # before dropout: skips are decided outside it
            apply_activation_checkpointing(layers)
        self.dropout = None
        if recipe.layer_dropout_p_max > 0:
            self.dropout = apply_layer_dropout(
                model,
                recipe.layer_dropout_p_max,
                recipe.layer_dropout_shape,
                recipe.layer_dropout_schedule,
                total_steps=self.progress.total_steps,
                generator=self.generator,
            )
        self.trained = wrap_for_training(
            self.objective,
            layers,
            self.device,
            distributed,
            fsdp=args.fsdp,
            bf16=args.bf16,
            cpu_offload=args.fsdp_cpu_offload,
        )
        decay = [p for p in self.objective.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.objective.parameters() if p.requires_grad and p.dim() < 2]
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
        self.step_lr = args.learning_rate  # the learning rate of the last step (logs)
        self.step_dropout_scale = 0.0  # S(t) of the last step's layer dropout (logs)
        self._started = time.monotonic()

    # -- state

    def elapsed(self) -> float:
        """Training wall time of the run so far, across resumes, in seconds."""
        return self.progress.elapsed_s + (time.monotonic() - self._started)

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, progress and every process's random states."""
        progress = dataclasses.replace(self.progress, elapsed_s=self.elapsed())
        state = {
            "scheduler": self.scheduler.state_dict(),
            "progress": dataclasses.asdict(progress),
            "config": dataclasses.asdict(self.config),
            "paths": resolved_paths(self.config),
            "data": self.data,
        }
        path = save_checkpoint(
            self.output_dir,
            self.objective,
            self.optimizer,
            state,
            self.model.config,
            self.distributed,
            self.generator,
        )
        logger.info("checkpoint at step %d -> %s", self.progress.step, path)
        return path

    def load_checkpoint(self) -> None:
        """Continue exactly where the checkpoint in output_dir left off."""
        state = load_checkpoint(
            self.output_dir, self.objective, self.optimizer, self.distributed, self.generator
        )
        saved_data = state.get("data")  # absent from checkpoints of earlier versions
        if isinstance(saved_data, dict) and saved_data != self.data:
            raise ConfigError(
                f"--resume True: the training data is not the checkpoint's ({self.data['blocks']} "
                f"blocks of {self.seq_len} tokens now, {saved_data.get('blocks')} then: files "
                "matching --data changed?); the data position and schedules would mean nothing "
                "on it; resume with the checkpoint's data, or start a new run in another "
                "--output_dir"
            )
        self.scheduler.load_state_dict(state["scheduler"])
        saved_horizon = state["progress"]["total_steps"]
        self.progress = Progress(**state["progress"])
        self._started = time.monotonic()
        logger.info("resumed at step %d (%d tokens)", self.progress.step, self.progress.tokens)
        if self.distributed.is_main:
            _cut_log(self.output_dir / LOG_FILE, self.progress.step)
        if self.args.max_tokens:
            self._set_token_horizon(saved_horizon)
        else:
            saved = state.get("config", {}).get("training", {})
            self._set_time_horizon(saved.get("max_minutes"), bool(saved.get("max_tokens")))
        self._apply_optimizer_settings()

    def _set_time_horizon(self, saved_minutes: float | None, saved_tokens: bool = False) -> None:
        """A resume under a time budget alone, of a run with another --max_minutes or with a
        token budget (which set the horizon then): the schedule's horizon, estimated from the
        speed measured before, moves to this budget.

        Raises:
            ConfigError: the new budget is already spent by the checkpoint.
        """
        progress, args = self.progress, self.args
        if progress.total_steps is None:
            return  # not estimated yet: it will be from this run's speed
        if not saved_tokens and saved_minutes in (None, args.max_minutes):
            return  # the horizon is this budget's already
        if progress.elapsed_s >= args.max_minutes * 60.0:
            raise ConfigError(
                f"--max_minutes {args.max_minutes:g} is already spent: the checkpoint in "
                f"{self.output_dir} has trained {progress.elapsed_s / 60.0:.2f} minutes "
                f"({progress.step} steps); give a larger budget to continue it"
            )
        estimate = int(progress.step * args.max_minutes * 60.0 / max(progress.elapsed_s, 1e-6))
        horizon = max(progress.step + 1, estimate)
        logger.info(
            "--max_minutes %g: schedule horizon %d -> %d steps from step %d",
            args.max_minutes,
            progress.total_steps,
            horizon,
            progress.step,
        )
        progress.total_steps = horizon

    def _apply_optimizer_settings(self) -> None:
        """After a resume: this run's --learning_rate, --weight_decay, --warmup_steps and
        --min_lr_ratio take effect from the next step (the checkpoint's optimizer and
        scheduler state carry the saved ones; unchanged settings change nothing)."""
        args, progress = self.args, self.progress
        rate = args.learning_rate * lr_factor(
            progress.step, args.warmup_steps, progress.total_steps, args.min_lr_ratio
        )
        self.scheduler.base_lrs = [args.learning_rate] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = args.learning_rate
            group["lr"] = rate
        self.optimizer.param_groups[0]["weight_decay"] = args.weight_decay  # the decayed group

    def _set_token_horizon(self, saved_horizon: int | None) -> None:
        """A resume with another --max_tokens: the schedule's horizon moves to the new budget.

        The learning rate (cosine), layer dropout's S(t) and the curriculum follow the new
        horizon from the current step on (a longer budget re-warms the decay part-way).

        Raises:
            ConfigError: the new budget is already spent by the checkpoint.
        """
        progress, args = self.progress, self.args
        horizon = max(1, math.ceil(args.max_tokens / self.tokens_per_step))
        if horizon == saved_horizon:
            return
        if horizon <= progress.step:
            raise ConfigError(
                f"--max_tokens {args.max_tokens} is already spent: the checkpoint in "
                f"{self.output_dir} has trained {progress.tokens} tokens ({progress.step} steps); "
                "give a larger budget to continue it"
            )
        progress.total_steps = horizon
        logger.info(
            "--max_tokens %d: schedule horizon %s -> %d steps from step %d (learning rate now %.3g)",
            args.max_tokens,
            saved_horizon,
            horizon,
            progress.step,
            args.learning_rate
            * lr_factor(progress.step, args.warmup_steps, horizon, args.min_lr_ratio),
        )

    # -- one step

    def supervised_exits(self) -> list[int]:
        """The 1-based exits the loss supervises at the current step (curriculum, §4.2)."""
        if not self.recipe.early_exit_loss:
            return [self.num_layers]
        return active_exits(
            self.recipe.early_exit_curriculum,
            self.progress.step,
            self.progress.total_steps,
            self.num_layers,
            self.recipe.early_exit_rotation,
        )

    def _plan_micro_batch(self, first: int) -> torch.Tensor | None:
        """Per-sample skip decisions for this process's micro-batch, whose samples sit at
        ``first ..`` in the step's data; returns the position noise."""
        batch, step = self.args.batch_size, self.progress.step
        if self.dropout is not None:
            uniforms = recipe_uniforms(
                self.args.seed, step, first, batch, (self.num_layers,)
            )  # [batch, layers]
            self.dropout.plan(keep_from_uniforms(uniforms, self.dropout.current_rates()))
        if self.recipe.early_exit_loss and self.recipe.early_exit_position_fraction < 1.0:
            noise = recipe_uniforms(
                self.args.seed + 1, step, first, batch, (self.num_layers, self.seq_len)
            )  # [batch, layers, seq]
            return noise.transpose(0, 1)  # [layers, batch, seq]
        return None

    def train_step(self, exits: list[int]) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Returns:
            [1 + len(exits)]: the weighted loss, then each exit's cross-entropy, averaged
            over the micro-batches of this process.
        """
        args, distributed = self.args, self.distributed
        if self.dropout is not None:
            self.dropout.set_step(self.progress.step, self.progress.total_steps)
            # What this step drops at: a time budget may fix T after it (the log comes later).
            self.step_dropout_scale = schedule_factor(
                self.dropout.schedule, self.dropout.step, self.dropout.total_steps
            )
        sums = torch.zeros(len(exits) + 1)  # [1 + exits]
        for micro in range(args.gradient_accumulation_steps):
            offset = (micro * distributed.world_size + distributed.rank) * args.batch_size
            indices = self.stream.indices(self.progress.blocks + offset, args.batch_size)
            input_ids = self.blocks[indices].to(self.device)  # [batch, seq]
            noise = self._plan_micro_batch(offset)  # [layers, batch, seq] or None
            last = micro == args.gradient_accumulation_steps - 1
            with (
                gradient_sync(self.trained, sync=last),
                compute_context(self.device, args.bf16, args.fsdp),
            ):
                result = self.trained(input_ids, exits, noise)
            (result.loss / args.gradient_accumulation_steps).backward()
            losses = [result.loss.detach()] + [result.exit_losses[e] for e in exits]
            sums += torch.stack(losses).float().cpu()
        if self._agree(not bool(torch.isfinite(sums).all())):
            raise TrainingDiverged(self.progress.step + 1, self.output_dir)
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), args.max_grad_norm)
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step trains at
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.blocks += self.blocks_per_step
        self.progress.tokens += self.tokens_per_step
        return sums / args.gradient_accumulation_steps

    def _agree(self, flag: bool) -> bool:
        """True on every process when it is True on any."""
        if self.distributed.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self._collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def budget_spent(self) -> bool:
        """Token budget, time budget or --stop_after_steps reached (this process's view)."""
        progress, args = self.progress, self.args
        stop = progress.total_steps is not None and progress.step >= progress.total_steps
        stop = stop or (args.max_minutes > 0 and self.elapsed() >= args.max_minutes * 60.0)
        return stop or (args.stop_after_steps > 0 and progress.step >= args.stop_after_steps)

    def _fix_horizon_from_speed(self) -> None:
        """A pure time budget: set T (schedule, S(t), curriculum) from the measured speed."""
        progress = self.progress
        estimate = int(progress.step * self.args.max_minutes * 60.0 / max(self.elapsed(), 1e-6))
        horizon = torch.tensor(float(max(progress.step + 1, estimate)))
        if self.distributed.world_size > 1:
            horizon = horizon.to(self._collective_device())
            dist.broadcast(horizon, 0)
        progress.total_steps = int(horizon.item())
        logger.info("time budget: schedule set to %d steps", progress.total_steps)

    # -- the loop

    def run(self) -> None:
        """Train until a budget is spent or a signal arrives; log; checkpoint.

        Raises:
            TrainingInterrupted: SIGINT/SIGTERM; the checkpoint is written first.
        """
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
        with StopSignals() as signals:
            try:
                stop = self._agree(self.budget_spent() or signals.received is not None)
                while not stop:
                    exits = self.supervised_exits()
                    sums = self.train_step(exits)  # [1 + exits]
                    window_tokens += self.tokens_per_step
                    bar.update(self.tokens_per_step)
                    if (
                        self.progress.total_steps is None
                        and self.progress.step == HORIZON_PROBE_STEPS
                    ):
                        self._fix_horizon_from_speed()
                    stop = self._agree(self.budget_spent() or signals.received is not None)
                    if self.progress.step % args.log_every == 0 or stop:
                        now = time.monotonic()
                        speed = window_tokens / max(now - window_started, 1e-6)
                        self._log(exits, sums, speed, log_file, bar)
                        window_tokens, window_started = 0, now
                    periodic = (
                        args.save_every_steps > 0
                        and self.progress.step % args.save_every_steps == 0
                    ) or (
                        args.save_every_minutes > 0
                        and time.monotonic() - last_save >= args.save_every_minutes * 60
                    )
                    if not stop and self._agree(periodic):
                        self.save_checkpoint()
                        last_save = time.monotonic()
            finally:
                bar.close()
                if log_file is not None:
                    log_file.close()
            path = self.save_checkpoint()
            received = signals.received
        interrupted = self._agree(received is not None)
        if interrupted:
            number = received if received is not None else signal.SIGTERM
            raise TrainingInterrupted(number, self.progress.step, path)

    def _log(
        self, exits: list[int], sums: torch.Tensor, speed: float, log_file: Any, bar: tqdm
    ) -> None:
        if self.distributed.world_size > 1:
            sums = sums.to(self._collective_device())
            dist.all_reduce(sums)
            sums = sums.cpu() / self.distributed.world_size
        if log_file is None:
            return
        record = {
            "step": self.progress.step,
            "tokens": self.progress.tokens,
            "lr": self.step_lr,
            "loss": round(sums[0].item(), 5),
            "exit_losses": {str(e): round(v, 4) for e, v in zip(exits, sums[1:].tolist())},
            "layer_dropout_scale": self.step_dropout_scale,
            "tokens_per_second": round(speed, 1),
            "elapsed_s": round(self.elapsed(), 1),
        }
        if self.device.type == "cuda":
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
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
        args, tokenizer = self.args, self.tokenizer
        weights = None
        if args.fsdp:
            prefix = "model."  # the objective's submodule holding the causal LM
            gathered = full_state_dict(self.objective, sharded=True)
            weights = {k.removeprefix(prefix): v for k, v in gathered.items()}
        # A fresh GenerationConfig (one derived from the model config, "_from_model_config",
        # loses its extra keys when transformers reloads it), with a continued model's own
        # generation settings (stop ids beyond the tokenizer's EOS: Gemma 3's
        # <end_of_turn>, Llama 3's <|eom_id|>...) and the recommended exit and k.
        own = getattr(self.model, "generation_config", None)
        settings: dict = {}
        if own is not None and not getattr(own, "_from_model_config", True):
            settings = own.to_diff_dict()
            for name in ("_from_model_config", "transformers_version"):
                settings.pop(name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # A config.json's stop ids (a list, as Llama 3.1's) come through a generation
            # config derived from it; the tokenizer knows one EOS.
            if settings.get(name) is None:
                settings[name] = getattr(own, name, None)
            if settings.get(name) is None:
                settings[name] = getattr(tokenizer, name)
        # -1: what a continued model recommended (a sweep's choice, say), else the defaults.
        for name, default in (
            ("exit_layer", max(1, self.num_layers // 4)),
            ("num_speculations", 4),
        ):
            value = getattr(args, name)
            settings[name] = value if value != -1 else getattr(own, name, None) or default
        generation_config = GenerationConfig(**settings)
        model = self.model if weights is not None else self.model.to("cpu")
        export_pretrained(
            self.output_dir, model, weights, tokenizer, generation_config, self.distributed
        )
        if self.distributed.is_main:
            summary = {
                "steps": self.progress.step,
                "tokens": self.progress.tokens,
                "wall_time_s": round(self.elapsed(), 1),
                "num_layers": self.num_layers,
                "parameters": self.num_parameters,
                "world_size": self.distributed.world_size,
                "fsdp": args.fsdp,
                "device": str(self.device),
            }
            _atomic_json(self.output_dir / "train_summary.json", summary)
            logger.info("final model (%s) -> %s", summary, self.output_dir)
        barrier(self.distributed)
        return self.output_dir


# What a run writes into its output_dir besides the final model (config.json, weights,
# tokenizer files, generation_config.json): an earlier run's, found by a new run, is refused.
RUN_FILES = (
    "train_config.json",
    LOG_FILE,
    "train_summary.json",
    CHECKPOINT_DIR,
    TEMPORARY_DIR,
    PREVIOUS_DIR,
)


def _cut_log(path: Path, step: int) -> None:
    """Drop the log lines after ``step`` (a run killed after its last checkpoint logged steps
    that the resumed run trains again) and any line a kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    temporary.replace(path)


# The final export (``save_pretrained`` of the model and its tokenizer). An earlier run's,
# kept beside a new run's checkpoint and log until that run exports its own, would be loaded
# as the new run's model by every script (its weights, its tokenizer) if the new run stops.
EXPORT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "tokenizer.json",
    "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)  # fmt: skip


def _remove_run_files(output_dir: Path) -> None:
    """Remove an earlier run's log, checkpoints and tokenizer (``--overwrite True``)."""
    for name in (*RUN_FILES, TOKENIZER_DIR):
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _remove_export(output_dir: Path) -> None:
    """Remove an earlier run's exported model (``--overwrite True``, once the new run has
    its data and model: a configuration error before that keeps it)."""
    for pattern in EXPORT_FILES:
        for path in output_dir.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def train(config: TrainConfig) -> Path:
    """Run one training job (parse -> build -> run -> write); returns the final model's dir.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM stopped the run (after a checkpoint).
    """
    args = config.training
    # gloo for CPU training even where a GPU exists; nccl for GPUs ("auto": whichever is there).
    distributed = setup_distributed(device=None if args.device == "auto" else args.device)
    try:
        return _train(config, distributed)
    finally:
        teardown(distributed)


def _train(config: TrainConfig, distributed: DistributedContext) -> Path:
    args = config.training
    device = resolve_device(args.device, distributed)
    output_dir = Path(args.output_dir)
    # One run writes a folder at a time: a second one started into it is refused here
    # (it would delete the first one's checkpoint.tmp under it).
    with output_dir_lock(output_dir) if distributed.is_main else contextlib.nullcontext():
        barrier(distributed)
        return _train_locked(config, distributed, device, output_dir)


# Settings a resume may change: budgets, cadence, devices and sharding, the optimizer's
# hyperparameters (to recover from a divergence), the exported recommendation. Every other
# one (model, data, recipe, seed, the global batch) must be the checkpoint's: the data
# position and the schedule mean nothing under others.
_RESUME_MAY_CHANGE = frozenset(
    {
        "output_dir", "overwrite", "resume", "max_tokens", "max_minutes", "stop_after_steps",
        "device", "fsdp", "fsdp_cpu_offload", "activation_checkpointing", "num_threads",
        "log_every", "save_every_minutes", "save_every_steps", "exit_layer", "num_speculations",
        "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "max_grad_norm",
        "batch_size", "gradient_accumulation_steps",
    }
)  # fmt: skip


def resolved_paths(config: TrainConfig) -> dict[str, Any]:
    """The run's local paths as absolute ones (a model folder's real location, data globs
    made absolute), so that a resume may spell them otherwise: ``runs/x/`` for ``runs/x``,
    a symlink, ``~``, or a path relative to another working directory."""

    def local(path: str | None) -> str | None:
        return real_location(path) if path else path

    def patterns(globs: list[str]) -> list[str]:
        return [os.path.abspath(os.path.expanduser(pattern)) for pattern in globs]

    return {
        "model": local(config.model.model),
        "config_file": local(config.model.config_file),
        "data": patterns(config.data.data),
        "exclude": patterns(config.data.exclude),
    }


def _switched_off(config: dict[str, Any]) -> set[tuple[str, str]]:
    """(group, name) of the settings that others switch off in ``config`` (a ``TrainConfig``
    as a dict), which new runs refuse: the recipe's (``unused_recipe_settings``),
    --vocab_size with --model (its own tokenizer), --dataset_config / --dataset_split
    without --dataset."""
    off = {("layerskip", name) for name in unused_recipe_settings(config.get("layerskip", {}))}
    if config.get("model", {}).get("model"):
        off.add(("model", "vocab_size"))
    if not config.get("data", {}).get("dataset"):
        off.update({("data", "dataset_config"), ("data", "dataset_split")})
    return off


def _check_resumed_settings(
    saved: dict[str, Any], config: TrainConfig, distributed: DistributedContext, output_dir: Path
) -> None:
    """Refuses, in one line, a resume whose settings differ from the checkpoint's where the
    run could not continue exactly (``_RESUME_MAY_CHANGE`` lists the others).

    Raises:
        ConfigError: naming the first setting that differs, with both values.
    """
    before = saved.get("config")
    if not isinstance(before, dict):
        return  # a checkpoint from before settings were saved in it
    now = dataclasses.asdict(config)
    paths_then, paths_now = saved.get("paths") or {}, resolved_paths(config)
    # A setting switched off then and now changed nothing (a checkpoint of a run that set
    # one, before such settings were refused, resumes without it).
    unused = _switched_off(before) & _switched_off(now)
    for group, values in now.items():
        for name, value in values.items():
            was = before.get(group, {}).get(name, value)
            if name in paths_then and paths_then[name] == paths_now.get(name):
                continue  # the same path, spelled otherwise
            if (group, name) in unused:
                continue
            if name not in _RESUME_MAY_CHANGE and was != value:
                raise ConfigError(
                    f"--resume True: --{name} is {value!r}, but the checkpoint in "
                    f"{output_dir / CHECKPOINT_DIR} was trained with {was!r}; resume with its "
                    "settings, or start a new run in another --output_dir"
                )
    args, old = config.training, before.get("training", {})
    old_world = saved.get("world_size", distributed.world_size)
    old_batch = old.get("batch_size", args.batch_size) * old.get(
        "gradient_accumulation_steps", args.gradient_accumulation_steps
    )
    if old_batch * old_world != args.batch_size * args.gradient_accumulation_steps * (
        distributed.world_size
    ):
        raise ConfigError(
            f"--resume True: the global batch (--batch_size x --gradient_accumulation_steps x "
            f"processes) is {args.batch_size} x {args.gradient_accumulation_steps} x "
            f"{distributed.world_size}, but the checkpoint's was {old_batch} x {old_world}; "
            "keep the number of sequences per optimizer step"
        )


def _record_resume(path: Path, progress: Progress, config: TrainConfig) -> None:
    """Append this resume's command line and settings to the run's train_config.json."""
    try:
        document = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, ValueError):
        document = None
    if not isinstance(document, dict):  # a record only (the checkpoint holds the settings)
        kept = path.with_name(path.name + ".damaged")
        path.replace(kept)
        logger.warning("%s is damaged: kept as %s, a new record starts", path, kept.name)
        document = {"argv": sys.argv, **dataclasses.asdict(config)}
    document.setdefault("resumes", []).append(
        {
            "step": progress.step,
            "tokens": progress.tokens,
            "argv": sys.argv,
            "max_tokens": config.training.max_tokens,
            "max_minutes": config.training.max_minutes,
        }
    )
    _atomic_json(path, document)


def _train_locked(
    config: TrainConfig, distributed: DistributedContext, device: torch.device, output_dir: Path
) -> Path:
    args = config.training
    _setup_logging(distributed.is_main)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if distributed.is_main:
        recover_checkpoint(output_dir)  # a kill during a checkpoint's replacement
    barrier(distributed)
    if args.resume and not checkpoint_exists(output_dir):
        raise ConfigError(f"--resume True but {output_dir / CHECKPOINT_DIR} does not exist")
    if args.resume:  # before the data and the model: what the checkpoint was trained with
        _check_resumed_settings(read_trainer_state(output_dir), config, distributed, output_dir)
    if not args.resume and checkpoint_exists(output_dir):
        if not args.overwrite:
            raise ConfigError(
                f"{output_dir} already holds a run; use --resume True, --overwrite True "
                "(starts over) or another --output_dir"
            )
    if not args.resume and args.overwrite and distributed.is_main:
        _remove_run_files(output_dir)  # asked for: the new run's log starts empty
    barrier(distributed)
    random.seed(args.seed)

    texts = load_texts(config.data)
    model, tokenizer = build_model_and_tokenizer(config, texts, distributed)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if args.exit_layer > layers:  # what generation_config.json will recommend
        raise ConfigError(
            f"--exit_layer must be at most the model's {layers} layers, got {args.exit_layer}"
        )
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if not args.resume and context and config.model.seq_len > context:
        # A continued model (a new one's context is made to fit): positions it was never
        # trained on, and that decoding never reaches (as train_adapter.py refuses).
        raise ConfigError(
            f"--seq_len {config.model.seq_len} is longer than the model's context ({context} "
            "tokens, max_position_embeddings)"
        )
    blocks = pack_blocks(tokenizer, texts, config.model.seq_len)  # [num_blocks, seq_len]
    del texts
    rows = model.get_input_embeddings().weight.shape[0]
    if blocks.numel() and int(blocks.max()) >= rows:  # a tokenizer bigger than the model
        raise ConfigError(
            f"the tokenizer gives the data token id {int(blocks.max())}, but the model has "
            f"embeddings for ids 0..{rows - 1} only; use the model's own tokenizer"
        )
    if args.batch_size * distributed.world_size > len(blocks):
        raise ConfigError(
            f"--batch_size {args.batch_size} x {distributed.world_size} process(es) needs that "
            f"many blocks a micro-step, but the data makes {len(blocks)} blocks of "
            f"{config.model.seq_len} tokens"
        )
    with single_process_group(args.fsdp, device):
        return _run(config, distributed, device, model, tokenizer, blocks)


def _warn_about_schedule(
    args: TrainingArguments, tokens_per_step: int, total_steps: int | None
) -> None:
    """One warning each where the token budget makes the schedule other than the flags read:
    a budget below one step trains a whole step, and a warmup longer than the run never
    reaches --learning_rate."""
    if args.max_tokens and args.max_tokens < tokens_per_step:
        logger.warning(
            "--max_tokens %d is less than one optimizer step (%d tokens): training one step",
            args.max_tokens,
            tokens_per_step,
        )
    if total_steps is not None and args.warmup_steps > total_steps:
        logger.warning(
            "--warmup_steps %d is longer than the run (%d steps): the learning rate "
            "peaks at %.3g, not --learning_rate %g",
            args.warmup_steps,
            total_steps,
            args.learning_rate * total_steps / args.warmup_steps,
            args.learning_rate,
        )


def _run(
    config: TrainConfig,
    distributed: DistributedContext,
    device: torch.device,
    model: nn.Module,
    tokenizer: Any,
    blocks: torch.Tensor,
) -> Path:
    args, output_dir = config.training, Path(config.training.output_dir)
    trainer = Trainer(config, model, tokenizer, blocks, distributed, device)
    logger.info(
        "%s: %d layers, %.2fM parameters; %d blocks of %d tokens (%.2fM tokens); %d tokens/step; "
        "%d process(es), %s, %s",
        type(model).__name__,
        trainer.num_layers,
        trainer.num_parameters / 1e6,
        len(blocks),
        config.model.seq_len,
        blocks.numel() / 1e6,
        trainer.tokens_per_step,
        distributed.world_size,
        device,
        "FSDP2" if args.fsdp else ("DDP" if distributed.world_size > 1 else "one process"),
    )
    if args.resume:
        trainer.load_checkpoint()
        if distributed.is_main:
            _record_resume(output_dir / "train_config.json", trainer.progress, config)
    elif distributed.is_main:
        _warn_about_schedule(args, trainer.tokens_per_step, trainer.progress.total_steps)
        source = config.model.model
        continued = bool(source) and Path(os.path.expanduser(source)).resolve() == (
            output_dir.resolve()
        )
        if args.overwrite and not continued:
            # No earlier model stays beside the new run's files (where the run continues
            # the model saved there, it is that model until the new one is exported).
            _remove_export(output_dir)
        _atomic_json(
            output_dir / "train_config.json", {"argv": sys.argv, **dataclasses.asdict(config)}
        )
    trainer.run()
    return trainer.save_final()
