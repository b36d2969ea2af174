"""Train an exit adapter for self-speculation on a model never trained with LayerSkip.

The base model stays frozen; one decoder block of its own family (initialised from one of
its layers) learns to map layer E's hidden states to the full model's next-token
distribution (self-distillation, Kangaroo-style), optionally over a reduced draft
vocabulary. See ``self_speculation/adapter_training.py`` for the two phases (cached
targets, then adapter training); both resume after an interruption.

Example (SmolLM2-135M-Instruct, offline; about an hour on 2 CPU cores)::

    S=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
    python train_adapter.py --model smollm2 --exit_layer 12 --draft_vocab_size 8192 \\
        --data "$S/*.py" "/usr/share/doc/**/*.md" --chat_prompts 144 \\
        --output_dir runs/smollm2-adapter-e12
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from arguments import MAX_SEED, check_output_dir, parse_args, refuse_several_processes, run_main
from self_speculation import GenerationConfig, Generator
from self_speculation.adapter_training import (
    TargetSettings,
    agreement,
    batches,
    chat_texts,
    compute_targets,
    corpus_fingerprint,
    default_chat_prompts,
    distillation_loss,
    draft_log_probs,
    load_targets,
    rank_draft_vocab,
    weights_fingerprint,
    weights_sum,
)
from self_speculation.benchmarking import environment_info, write_json_atomic
from self_speculation.distributed import DistributedContext
from self_speculation.draft import AdapterConfig, DraftExit, ExitAdapter, save_adapter
from self_speculation.errors import (
    ConfigError,
    expand_home,
    one_line,
    real_location,
    require_thread_count,
)
from self_speculation.loading import DTYPES, check_device, load_model_and_tokenizer, user_turn
from self_speculation.output_safety import output_dir_lock
from self_speculation.training.data import pack_blocks, read_texts, resolve_files
from self_speculation.training.loop import StopSignals

logger = logging.getLogger("train_adapter")
CHECKPOINT_NAME = "checkpoint.pt"
RECENT_LOSSES = 20  # steps the recorded final loss averages


@dataclass
class AdapterTrainArguments:
    """Settings of an adapter training run."""

    output_dir: str = ""
    """Required: where the adapter folder (adapter_config.json, adapter.safetensors) is written. A
    folder holding a model, an adapter without its checkpoint.pt or a shipped folder
    (models/) is refused unless --overwrite True; a folder with checkpoint.pt continues."""
    overwrite: bool = False
    """Write into --output_dir even when it holds a model or a finished adapter."""
    model: str = "smollm2"
    """Frozen base model: a local directory, a hub id, a .gguf file or smollm2."""
    exit_layer: int = 0
    """Required: E, the adapter reads the states leaving layer E - 1 (1 <= E < L)."""
    init_layer: int = -1
    """Base layer the adapter block copies (structure and starting weights); -1: the last."""
    data: list[str] = field(default_factory=list)
    """Globs of text / code / JSONL files (permissively licensed: you redistribute the adapter)."""
    exclude: list[str] = field(default_factory=list)
    """Globs of paths to leave out."""
    chat_prompts: int = 0
    """Answer this many built-in instruction prompts with the model itself (greedy, through its
    chat template) and add the conversations to the data: text from the model's own
    distribution; 0: none."""
    chat_max_steps: int = 128
    """Tokens per self-generated answer."""
    seq_len: int = 256
    """Tokens per training block."""
    max_target_tokens: int = 300_000
    """Most tokens to compute targets for (one frozen full forward each)."""
    target_minutes: float = 0.0
    """Stop computing targets after this many minutes (0: no limit); a rerun continues."""
    top_k: int = 32
    """Full-model probabilities kept per token (the distillation target)."""
    cache_exit_layers: list[int] = field(default_factory=list)
    """More exit layers whose states to cache too, for later runs on the same targets."""
    cache_dir: str = ""
    """Target cache (default: <output_dir>/targets)."""
    draft_vocab_size: int = 0
    """Train for a draft head over the N tokens the full model chooses most often; 0: full."""
    held_out_blocks: int = 8
    """Blocks kept out of training, for the agreement figures."""
    epochs: int = 3
    """Passes over the training blocks."""
    batch_size: int = 8
    """Blocks per optimiser step."""
    learning_rate: float = 2e-4
    """AdamW's peak learning rate (no weight decay): 20 steps of linear warm-up, then a
    cosine decay to 0."""
    train_minutes: float = 0.0
    """Stop training after this many minutes (0: no limit); a rerun continues."""
    dtype: str = "float32"
    """Precision of the frozen model and the adapter (float32, bfloat16, float16, float64)."""
    device: str = "cpu"
    """Where to train: cpu, cuda, cuda:N or mps."""
    num_threads: int = 1
    """torch CPU threads (0: torch's default, one per core). 1 by default: with anything else
    running, more OpenMP threads spin against it; on a machine of your own, 2 or more (with
    OMP_WAIT_POLICY=PASSIVE in the environment on a shared one)."""
    seed: int = 0
    """Seeds the held-out split, the batch order and the adapter's initialisation."""

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("give --output_dir for the adapter folder")
        self.output_dir = expand_home(self.output_dir, "--output_dir")  # as --model is
        self.cache_dir = expand_home(self.cache_dir, "--cache_dir")
        # An adapter with its training checkpoint is this script's own run: a rerun
        # continues it (more epochs); one without (copied, shipped) is not written over.
        resumable = (Path(self.output_dir) / CHECKPOINT_NAME).is_file()
        check_output_dir(
            self.output_dir,
            overwrite=self.overwrite,
            allow=("holds an exit adapter",) if resumable else (),
        )
        if self.cache_dir:
            # A shared target cache may sit anywhere but in a model's or a shipped folder.
            check_output_dir(self.cache_dir, "--cache_dir", overwrite=self.overwrite)
        if self.exit_layer == 0:
            raise ConfigError("give --exit_layer E, the adapter's exit (1 <= E < L)")
        if self.exit_layer < 1:
            raise ConfigError(f"--exit_layer must be >= 1, got {self.exit_layer}")
        if not self.data and self.chat_prompts == 0:
            raise ConfigError("give training data: --data GLOB... and/or --chat_prompts N")
        if not 0 <= self.chat_prompts <= len(default_chat_prompts()):
            raise ConfigError(
                f"--chat_prompts must be in [0, {len(default_chat_prompts())}], got {self.chat_prompts}"
            )
        positive = (
            "chat_max_steps",
            "seq_len",
            "max_target_tokens",
            "top_k",
            "epochs",
            "batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"--seq_len must be >= 2, got {self.seq_len}")
        for name in ("target_minutes", "train_minutes", "learning_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.draft_vocab_size < 0 or self.held_out_blocks < 1 or self.num_threads < 0:
            raise ConfigError(
                "--draft_vocab_size and --num_threads must be >= 0, --held_out_blocks >= 1"
            )
        require_thread_count(self.num_threads)
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        if any(layer < 1 for layer in self.cache_exit_layers):
            raise ConfigError("--cache_exit_layers must be >= 1")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        check_device(self.device)

    @property
    def targets_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "targets"


def build_blocks(
    args: AdapterTrainArguments, generator: Generator, model_weights: str
) -> tuple[torch.Tensor, dict]:
    """The training blocks (self-generated chat first, then files), and where they came from.
    ``model_weights``: the model's ``weights_fingerprint`` (its chat answers are its own)."""
    tokenizer = generator.tokenizer
    sources: dict = {"files": 0, "chat_conversations": 0}
    texts: list[str] = []
    if args.chat_prompts:
        prompts = default_chat_prompts()[: args.chat_prompts]
        responses = _chat_responses(args, generator, prompts, model_weights)
        texts += chat_texts(tokenizer, prompts, responses)
        sources["chat_conversations"] = len(prompts)
    chat_blocks = pack_blocks(tokenizer, texts, args.seq_len) if texts else None
    blocks = []
    if args.data:
        files = resolve_files(args.data, args.exclude)
        sources["files"] = len(files)
        file_blocks = pack_blocks(tokenizer, list(read_texts(files)), args.seq_len)
        order = torch.randperm(len(file_blocks), generator=torch.Generator().manual_seed(args.seed))
        blocks.append(file_blocks[order])
    if chat_blocks is not None:
        blocks.insert(0, chat_blocks)
    everything = torch.cat(blocks)
    budget = max(args.max_target_tokens // args.seq_len, args.held_out_blocks + args.batch_size)
    everything = everything[:budget]
    if len(everything) < args.held_out_blocks + args.batch_size:  # before an hour of targets
        raise ConfigError(
            f"the data makes {len(everything)} blocks of {args.seq_len} tokens; "
            f"--held_out_blocks {args.held_out_blocks} + --batch_size {args.batch_size} needs "
            f"{args.held_out_blocks + args.batch_size}: give more data or lower them"
        )
    # Chat and file blocks interleaved, so that any prefix the time budget allows mixes both.
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(args.seed + 1))
    sources["blocks"] = len(everything)
    return everything[order], sources


def _chat_responses(
    args: AdapterTrainArguments, generator: Generator, prompts: list[str], model_weights: str
) -> list[str]:
    """The model's own greedy answers to ``prompts`` (saved beside the targets, so that a
    rerun does not generate them again; named by the model's weights and dtype, so that a
    cache shared by another model, or a retrained one, is not read as this model's)."""
    key = hashlib.sha256(f"{model_weights} {args.dtype}".encode()).hexdigest()[:12]
    saved = args.targets_dir / f"chat_{len(prompts)}_{args.chat_max_steps}_{key}.json"
    if saved.exists():
        try:
            responses = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:  # cut short or overwritten: generate again
            logger.warning("%s is damaged (%s): generating again", saved, one_line(error))
        else:
            if isinstance(responses, list) and len(responses) == len(prompts):
                return responses
            logger.warning("%s does not hold %d answers: generating again", saved, len(prompts))
    # The fast path: one compile (minutes on a CPU), then several times eager speed.
    config = GenerationConfig(max_steps=args.chat_max_steps, sample=False, compile=True)
    tokenizer = generator.tokenizer
    responses: list[str] = []
    for start in tqdm(range(0, len(prompts), 8), desc="self-generated chat", unit="batch"):
        opened = [
            user_turn(tokenizer, prompt, tokenize=True) for prompt in prompts[start : start + 8]
        ]
        responses += [result.text for result in generator.generate_batch(opened, config)]
    saved.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, responses)
    return responses


def train_adapter(args: AdapterTrainArguments, model=None, tokenizer=None) -> dict:
    """Run both phases and write the adapter folder; returns the training record.

    ``model`` / ``tokenizer``: an already loaded base model (default: load ``args.model``).
    """
    # One run writes an adapter folder (and a shared target cache) at a time: a second
    # would interleave checkpoints and target shards.
    cache_lock = (
        output_dir_lock(args.cache_dir, flag="--cache_dir")
        if args.cache_dir and Path(args.cache_dir).resolve() != Path(args.output_dir).resolve()
        else contextlib.nullcontext()
    )
    with output_dir_lock(args.output_dir), cache_lock:
        return _train_adapter(args, model, tokenizer)


def _train_adapter(args: AdapterTrainArguments, model, tokenizer) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    output = Path(args.output_dir)
    if model is None or tokenizer is None:
        model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, args.device)
    model.requires_grad_(False)
    generator = Generator(model, tokenizer)
    layerwise = generator.layerwise
    if not args.exit_layer < layerwise.num_layers:
        raise ConfigError(
            f"--exit_layer must be below the model's {layerwise.num_layers} layers, got {args.exit_layer}"
        )
    if any(layer >= layerwise.num_layers for layer in args.cache_exit_layers):
        raise ConfigError(f"--cache_exit_layers must be below {layerwise.num_layers}")
    context = layerwise.context_length
    if context is not None and args.seq_len > context:  # positions it was never trained on
        raise ConfigError(
            f"--seq_len {args.seq_len} is longer than the model's context ({context} tokens)"
        )
    vocab_size = layerwise.lm_head.weight.shape[0]
    for name in ("top_k", "draft_vocab_size"):  # before the targets, not after an hour
        if getattr(args, name) > vocab_size:
            raise ConfigError(
                f"--{name} must be at most the model's vocabulary ({vocab_size} tokens), "
                f"got {getattr(args, name)}"
            )
    init_layer = layerwise.num_layers - 1 if args.init_layer == -1 else args.init_layer
    if not 0 <= init_layer < layerwise.num_layers:  # before the targets, not after an hour
        raise ConfigError(
            f"--init_layer must be in [0, {layerwise.num_layers - 1}] (or -1: the last), "
            f"got {args.init_layer}"
        )
    if args.chat_prompts and getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"--chat_prompts {args.chat_prompts}: {args.model}'s tokenizer has no chat template "
            "(use --chat_prompts 0 and --data)"
        )
    base_checksum = weights_sum(model)
    record: dict = {
        "arguments": asdict(args),
        "environment": environment_info(generator, DistributedContext()),
    }

    # Phase 1: targets.
    started = time.monotonic()
    blocks, record["data"] = build_blocks(args, generator, weights_fingerprint(base_checksum))
    settings = TargetSettings(
        model=args.model,
        exit_layers=sorted({args.exit_layer, *args.cache_exit_layers}),
        seq_len=args.seq_len,
        top_k=args.top_k,
        num_blocks=len(blocks),
        fingerprint=corpus_fingerprint(blocks),
        model_weights=weights_fingerprint(base_checksum),
        dtype=args.dtype,
    )
    done = compute_targets(
        layerwise,
        blocks,
        settings,
        args.targets_dir,
        max_seconds=args.target_minutes * 60 or None,
    )
    record["target_seconds"] = time.monotonic() - started
    targets = load_targets(args.targets_dir, args.exit_layer)
    if len(targets) < args.held_out_blocks + args.batch_size:
        raise ConfigError(
            f"only {len(targets)} blocks have targets; need more than --held_out_blocks + "
            "--batch_size (raise --target_minutes or rerun to continue)"
        )
    train_set, held_out = targets.split(args.held_out_blocks)
    record["target_tokens"] = {
        "train": train_set.tokens.numel(),
        "held_out": held_out.tokens.numel(),
    }
    logger.info("targets for %d of %d blocks", done, len(blocks))

    # Phase 2: the adapter.
    ranking = rank_draft_vocab(train_set, vocab_size)
    vocab = ranking[: args.draft_vocab_size].sort().values if args.draft_vocab_size else None
    plain = DraftExit(layerwise, None, vocab)
    adapter = ExitAdapter(layerwise, args.exit_layer, init_layer)
    draft = DraftExit(layerwise, adapter, vocab)
    before = {
        "plain_exit": agreement(plain, held_out),
        "plain_exit_full_vocab": agreement(DraftExit(layerwise), held_out),
        "adapter_at_init": agreement(draft, held_out),
    }
    logger.info("before: %s", before)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.learning_rate, weight_decay=0.0)
    steps_per_epoch = len(train_set) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / total_steps)),
    )
    settings_key = {
        name: getattr(args, name)
        for name in (
            "model",
            "exit_layer",
            "seq_len",
            "top_k",
            "draft_vocab_size",
            "batch_size",
            "learning_rate",
            "seed",
            "held_out_blocks",  # another split: trained-on blocks would score as held out
        )
    }
    settings_key["init_layer"] = init_layer
    settings_key["model"] = real_location(args.model)  # "m", "./m" and "m/" are one model
    # The same folder retrained since is another model; another dtype rounds its weights
    # (another fingerprint), and is named as what it is.
    settings_key["model_weights"] = weights_fingerprint(base_checksum)
    settings_key["dtype"] = args.dtype
    step, progress_before = _resume(
        output / CHECKPOINT_NAME, adapter, optimizer, schedule, settings_key
    )
    full_to_draft = draft.full_to_draft()
    train_started = time.monotonic()
    # Ctrl-C / SIGTERM: finish the step, save, then stop (the caller's handlers come back).
    with StopSignals(force_on_repeat=False) as stop:
        # The last losses and the time trained, over every run of this folder (a rerun of a
        # finished one trains no step: its record keeps the earlier final loss and time).
        losses = list(progress_before["recent_losses"])

        def so_far() -> dict:
            seconds = progress_before["train_seconds"] + time.monotonic() - train_started
            return {"recent_losses": losses[-RECENT_LOSSES:], "train_seconds": seconds}

        progress = tqdm(total=total_steps, initial=step, unit="step", desc="adapter")
        adapter.train()
        while step < total_steps and stop.received is None:
            epoch, offset = divmod(step, steps_per_epoch)
            indices = list(batches(len(train_set), args.batch_size, args.seed, epoch))[offset]
            states = train_set.states[indices].to(layerwise.device, layerwise.dtype)
            loss = distillation_loss(
                draft_log_probs(draft, states),
                train_set.top_p[indices].to(states.device),
                train_set.top_idx[indices].to(states.device),
                full_to_draft,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
            out_of_time = (
                args.train_minutes and time.monotonic() - train_started > args.train_minutes * 60
            )
            if step % 50 == 0 or out_of_time or stop.received is not None:
                _save_checkpoint(
                    output / CHECKPOINT_NAME,
                    adapter,
                    optimizer,
                    schedule,
                    step,
                    settings_key,
                    so_far(),
                )
            if out_of_time:
                break
        progress.close()
        adapter.eval()
        trained = so_far()
        _save_checkpoint(
            output / CHECKPOINT_NAME, adapter, optimizer, schedule, step, settings_key, trained
        )
        after = agreement(draft, held_out)
        if weights_sum(model) != base_checksum:
            raise RuntimeError("a base weight changed during adapter training")
        record.update(
            steps=step,
            total_steps=total_steps,
            train_seconds=trained["train_seconds"],
            final_loss=(
                sum(trained["recent_losses"]) / len(trained["recent_losses"])
                if trained["recent_losses"]
                else None
            ),
            before=before,
            after=after,
            base_weights_unchanged=True,
        )
        config = AdapterConfig(
            exit_layer=args.exit_layer,
            num_layers=layerwise.num_layers,
            hidden_size=layerwise.config.hidden_size,
            init_layer=init_layer,
            base_model=args.model,
            trained_draft_vocab_size=args.draft_vocab_size,
            training={
                key: record[key] for key in ("data", "target_tokens", "steps", "before", "after")
            },
        )
        save_adapter(output, adapter, config, ranking)
        write_json_atomic(output / "training_record.json", record)
    if stop.received is not None:
        raise KeyboardInterrupt
    return record


def _save_checkpoint(
    path: Path, adapter, optimizer, schedule, step: int, settings: dict, progress: dict
) -> None:
    partial = path.with_suffix(".tmp")
    torch.save(
        {
            "settings": settings,
            "adapter": adapter.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "progress": progress,
        },
        partial,
    )
    partial.replace(path)


def _resume(path: Path, adapter, optimizer, schedule, settings: dict) -> tuple[int, dict]:
    """The step the checkpoint at ``path`` continues from (0: none), its state loaded, and
    its progress (the last losses, the seconds trained).

    Raises:
        ConfigError: a checkpoint of other ``settings``, or not one of this training.
    """
    fresh = {"recent_losses": [], "train_seconds": 0.0}
    if not path.exists():
        return 0, fresh
    damaged = ConfigError(
        f"{path} is not a checkpoint of this adapter training: delete it to start over, "
        "or choose another --output_dir"
    )
    try:
        state = torch.load(path, weights_only=True)
        saved = state.get("settings", {})  # {}: written before settings were recorded
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError):
        raise damaged from None  # cut short or overwritten
    if "dtype" not in saved:  # recorded since: an earlier version's adapter weights say it
        trained_in = _saved_dtypes(state)
        names = [name for name, dtype in DTYPES.items() if trained_in == {dtype}]
        saved = {**saved, "dtype": names[0]} if names else saved
    # A setting an earlier version did not record is taken as unchanged.
    changed = sorted(name for name in settings if name in saved and saved[name] != settings[name])
    if changed == ["model_weights"]:
        raise ConfigError(
            f"{path} continues a run on other weights of --model {settings['model']} "
            "(retrained or replaced since?): delete it to start over, or choose another "
            "--output_dir"
        )
    if changed:
        name = changed[0]
        raise ConfigError(
            f"{path} continues a run with --{name} {saved.get(name)}, not {settings[name]}: "
            "give the settings it was trained with, or choose another --output_dir"
        )
    try:
        adapter.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        int(state["step"])
        progress = {**fresh, **state.get("progress", {})}  # none: written by an earlier version
        progress = {
            "recent_losses": [float(loss) for loss in progress["recent_losses"]],
            "train_seconds": float(progress["train_seconds"]),
        }
    except (RuntimeError, KeyError, TypeError, ValueError):  # an adapter of another shape
        raise damaged from None
    logger.info("resumed at step %d", state["step"])
    return int(state["step"]), progress


def _saved_dtypes(state: object) -> set[torch.dtype]:
    """The floating-point dtypes of a checkpoint's adapter weights (the training's dtype)."""
    adapter = state.get("adapter") if isinstance(state, dict) else None
    if not isinstance(adapter, dict):
        return set()
    return {
        value.dtype
        for value in adapter.values()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    }


def main(argv: list[str]) -> int:
    (args,) = parse_args(AdapterTrainArguments, argv=argv, prog="train_adapter.py")
    refuse_several_processes("train_adapter.py")  # every process would take the folder's lock
    record = train_adapter(args)
    summary = {
        "agreement_before": record["before"]["plain_exit"]["agreement"],
        "agreement_after": record["after"]["agreement"],
        "coverage": record["after"]["coverage"],
        "steps": record["steps"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main, prog="train_adapter.py")
