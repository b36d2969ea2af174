"""What the LayerSkip recipe costs in training: tokens/s and peak memory, measured.

Two measurements:

1. Throughput: the real training step of ``train.py`` (:class:`Trainer`, same optimizer,
   bf16 setting and device) on one random model and random tokens, plain training
   (last-exit loss, no dropout) against the recipe (layer dropout + early-exit loss at every
   exit, 1/8 of the positions at the non-final ones), their steps alternating. Reports
   tokens/s (fastest step) and peak memory.
2. Early-exit loss memory: forward + backward of the loss alone over a deep model's exit
   states, for 6 and for 24 supervised exits, with the per-exit loss that training uses
   and the stacked reference ([exits, tokens, vocab] logits at once). The per-exit loss's
   peak should not grow with the number of exits; the stacked one's does.

Peak memory: the most tensor memory live at once during the measured work, above what was
live before it (``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the allocations and
frees recorded by torch's profiler). Training: one optimizer step (activations, gradients,
and the optimizer state on the first step only, so it is not included).

    python benchmarks/train_throughput.py                           # CPU, small model
    python benchmarks/train_throughput.py --device cuda --preset stdlib --seq_len 1024
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import simple_parsing
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.distributed import DistributedContext  # noqa: E402
from self_speculation.errors import ConfigError, expand_home  # noqa: E402
from self_speculation.generator import synchronize  # noqa: E402
from self_speculation.loading import check_device  # noqa: E402
from self_speculation.model_surgery import LayerwiseModel  # noqa: E402
from self_speculation.output_safety import check_output_dir, check_output_file  # noqa: E402
from self_speculation.training.config import (  # noqa: E402
    DataArguments,
    LayerSkipArguments,
    ModelArguments,
    TrainConfig,
    TrainingArguments,
)
from self_speculation.training.distributed_setup import resolve_device  # noqa: E402
from self_speculation.training.early_exit_loss import (  # noqa: E402
    IGNORE_INDEX,
    early_exit_loss,
    stacked_early_exit_loss,
)
from self_speculation.training.loop import Trainer  # noqa: E402
from self_speculation.training.presets import PRESETS, architecture_config  # noqa: E402

logger = logging.getLogger("train_throughput")
RESULT_NAME = "train_throughput.json"


@dataclass
class ThroughputArguments:
    """What to measure."""

    preset: str = "small"  # throughput model: a train.py preset (tiny, small, stdlib)
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 4  # timed optimizer steps per setting (after one untimed)
    device: str = "auto"
    bf16: bool = True
    num_threads: int = 2
    memory_layers: int = 24  # early-exit-loss memory: a model this deep
    memory_hidden: int = 64
    memory_vocab: int = 8192
    memory_tokens: int = 1024  # positions per loss (2 sequences)
    memory_exits: list[int] = field(default_factory=lambda: [6, 24])
    output_dir: str = "logs/train_throughput"
    overwrite: bool = False  # write into --output_dir even under models/ or beside a model

    def __post_init__(self) -> None:
        counts = {
            "--vocab_size": (self.vocab_size, 16),
            "--seq_len": (self.seq_len, 2),
            "--batch_size": (self.batch_size, 1),
            "--steps": (self.steps, 1),
            "--num_threads": (self.num_threads, 1),
            "--memory_layers": (self.memory_layers, 1),
            "--memory_hidden": (self.memory_hidden, 1),
            "--memory_vocab": (self.memory_vocab, 16),
            "--memory_tokens": (self.memory_tokens, 2),
            "--memory_exits": (min(self.memory_exits, default=1), 1),
        }
        for flag, (value, least) in counts.items():
            if value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        if max(self.memory_exits, default=1) > self.memory_layers:
            raise ConfigError(
                f"--memory_exits must be at most --memory_layers ({self.memory_layers}), "
                f"got {max(self.memory_exits)}"
            )
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        if self.device != "auto":
            check_device(self.device)
        # Before the measurement, not after it: a folder that cannot hold the result (a
        # file, read-only, models/) or a train_throughput.json that is not an earlier one.
        # ~ expanded: the folder checked is the folder written (it was a folder named "~")
        self.output_dir = expand_home(self.output_dir, "--output_dir")
        check_output_dir(self.output_dir, overwrite=self.overwrite)
        check_output_file(
            str(Path(self.output_dir) / RESULT_NAME),
            "train_throughput",
            ("arguments", "training", "early_exit_loss_memory"),
            flag="--output_dir",
        )


class _PeakMemory:
    """Peak memory (MiB) allocated by the work inside the block, above what it started with.

    CUDA: the caching allocator's peak. CPU: the running total of the allocations and frees
    that torch's profiler records (the process's resident size is no measure here: the C
    allocator keeps freed blocks, so it grows with fragmentation, not with live tensors).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._start) / 2**20
            return
        self._profile.__exit__(*exc)
        events = [
            event
            for event in self._profile.profiler.kineto_results.events()
            if event.name() == "[memory]"
        ]
        live = peak = 0
        for event in sorted(events, key=lambda event: event.start_ns()):
            live += event.nbytes()  # negative for a free
            peak = max(peak, live)
        self.peak_mib = peak / 2**20


def _trainer(args: ThroughputArguments, recipe: bool, device: torch.device) -> Trainer:
    """train.py's Trainer on a fresh random model (same seed for both settings)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    architecture = architecture_config(
        args.preset, None, args.vocab_size, args.seq_len, special_token_ids={}
    )
    model = AutoModelForCausalLM.from_config(architecture, dtype=torch.float32).train()
    layerskip = LayerSkipArguments(
        layer_dropout_p_max=0.1 if recipe else 0.0,
        early_exit_loss=recipe,
        early_exit_position_fraction=0.125,
    )
    training = TrainingArguments(
        output_dir=args.output_dir,
        batch_size=args.batch_size,
        max_tokens=10**12,
        warmup_steps=1,
        device=args.device,
        bf16=args.bf16,
        save_every_minutes=0,
    )
    config = TrainConfig(ModelArguments(), DataArguments(data=["(random)"]), layerskip, training)
    blocks = torch.randint(0, args.vocab_size, (args.batch_size * (args.steps + 2), args.seq_len))
    return Trainer(config, model, None, blocks, DistributedContext(), device)


def measure_training(args: ThroughputArguments) -> list[dict[str, Any]]:
    """Tokens/s and peak memory of plain training and of the recipe.

    The two settings' steps alternate (plain, recipe, plain, ...) and each reports its fastest
    step: on a shared machine the other steps measure the neighbours' load (all step times
    are in the result file).
    """
    device = resolve_device(args.device, DistributedContext())
    trainers = {"plain": _trainer(args, False, device), "recipe": _trainer(args, True, device)}
    exits = {name: trainer.supervised_exits() for name, trainer in trainers.items()}
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for name, trainer in trainers.items():
        trainer.train_step(exits[name])  # untimed: allocations, optimizer state
    for _ in range(args.steps):
        for name, trainer in trainers.items():
            synchronize(device)
            started = time.perf_counter()
            trainer.train_step(exits[name])
            synchronize(device)
            seconds[name].append(time.perf_counter() - started)
    rows = []
    for name, trainer in trainers.items():
        with _PeakMemory(device) as memory:  # one more step, its memory measured
            trainer.train_step(exits[name])
        rows.append(
            {
                "setting": name,
                "supervised_exits": len(exits[name]),
                "layer_dropout_p_max": trainer.recipe.layer_dropout_p_max,
                "tokens_per_second": round(trainer.tokens_per_step / min(seconds[name]), 1),
                "step_seconds": [round(value, 4) for value in seconds[name]],
                "peak_memory_mib": round(memory.peak_mib, 1),
                "parameters_m": round(trainer.num_parameters / 1e6, 2),
                "device": str(device),
            }
        )
    return rows


def measure_loss_memory(args: ThroughputArguments, num_exits: int, stacked: bool) -> dict[str, Any]:
    """Peak memory of forward + backward of the early-exit loss alone over ``num_exits``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    context = DistributedContext()
    device = resolve_device(args.device, context)
    config = LlamaConfig(
        vocab_size=args.memory_vocab,
        hidden_size=args.memory_hidden,
        intermediate_size=2 * args.memory_hidden,
        num_hidden_layers=args.memory_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config).to(device)
    layerwise = LayerwiseModel(model, verify=False)
    sequences = 2
    input_ids = torch.randint(
        0, args.memory_vocab, (sequences, args.memory_tokens // sequences), device=device
    )  # [batch, seq]
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    positions = torch.arange(input_ids.shape[1], device=device).unsqueeze(0)
    step = args.memory_layers // num_exits
    exit_layers = list(range(step, args.memory_layers + 1, step))[-num_exits:]
    with torch.no_grad():  # the exit states are inputs here: measure the loss alone
        hidden = layerwise.embed(input_ids)
        states = []
        for layer in range(args.memory_layers):
            hidden = layerwise.run_layers(hidden, layer, layer + 1, None, positions)
            if layer + 1 in exit_layers:
                states.append(hidden.clone())
    states = [state.requires_grad_() for state in states]
    loss_function = stacked_early_exit_loss if stacked else early_exit_loss
    synchronize(device)
    with _PeakMemory(device) as memory:
        result = loss_function(states, exit_layers, targets, layerwise.unembed, args.memory_layers)
        result.loss.backward()
        synchronize(device)
    return {
        "loss": "stacked" if stacked else "per_exit",
        "exits": len(exit_layers),
        "tokens": args.memory_tokens,
        "vocab": args.memory_vocab,
        "peak_memory_mib": round(memory.peak_mib, 1),
        "one_exit_logits_mib": round(args.memory_tokens * args.memory_vocab * 4 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = simple_parsing.parse(
        ThroughputArguments, args=argv, add_config_path_arg=False, allow_abbrev=False
    )
    torch.set_num_threads(args.num_threads)
    logger.info("training steps, plain and recipe alternating")
    training = measure_training(args)
    loss_memory = []
    for num_exits in args.memory_exits:
        for stacked in (False, True):
            logger.info(
                "early-exit loss, %d exits, %s", num_exits, "stacked" if stacked else "per exit"
            )
            loss_memory.append(measure_loss_memory(args, num_exits, stacked))
    plain, recipe = training
    document = {
        "benchmark": "train_throughput",
        "arguments": asdict(args),
        "training": training,
        "recipe_relative_tokens_per_second": round(
            recipe["tokens_per_second"] / plain["tokens_per_second"], 3
        ),
        "early_exit_loss_memory": loss_memory,
    }
    write_json_atomic(Path(args.output_dir) / RESULT_NAME, document)
    for row in training:
        print(
            f"{row['setting']:>7}: {row['tokens_per_second']:9.1f} tokens/s, "
            f"peak {row['peak_memory_mib']:8.1f} MiB ({row['supervised_exits']} exits, {row['device']})"
        )
    print(f"recipe / plain tokens/s: {document['recipe_relative_tokens_per_second']}")
    for row in loss_memory:
        print(
            f"early-exit loss {row['loss']:>8}, {row['exits']:2d} exits: peak "
            f"{row['peak_memory_mib']:8.1f} MiB (one exit's logits {row['one_exit_logits_mib']} MiB)"
        )
    return 0


if __name__ == "__main__":
    run_main(main, prog="train_throughput.py")
