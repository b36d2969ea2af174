"""Train a causal LM with the LayerSkip recipe: layer dropout + early-exit loss.

From scratch (``--preset`` or ``--config_file``; a byte-level BPE tokenizer is trained on
the corpus) or from an existing model (``--model``, e.g. continual pretraining of a hub
checkpoint with ``--recipe configs/recipe-smollm2-135m.json``), on local files (``--data``
globs; text, code or JSONL with a "text" field) or a ``datasets`` dataset (``--dataset``).
Writes the final model in ``save_pretrained`` form (bf16 safetensors + tokenizer) to
``--output_dir``, a JSONL log of per-exit losses, and sharded checkpoints that
``--resume True`` continues exactly (also written on Ctrl-C / SIGTERM).

The same command runs on one CPU, one GPU (``--device cuda``) or, under torchrun, on several
GPUs and nodes (DDP, or ``--fsdp True`` for FSDP2 sharding), for example::

    python train.py --preset small --data 'corpus/**/*.py' --max_tokens 500000 \
        --output_dir runs/small
    torchrun --nproc_per_node 8 train.py --recipe configs/recipe-llama3.2-1b.json \
        --data 'corpus/**/*.jsonl' --fsdp True --output_dir runs/llama
"""

from __future__ import annotations

import sys
from pathlib import Path

from arguments import check_output_dir, error_line, report_lost_process, report_out_of_memory
from self_speculation.errors import ConfigError, LayerSkipError
from self_speculation.loading import check_model_source, inspect_model, is_gguf_file
from self_speculation.training.checkpointing import (
    CHECKPOINT_DIR,
    PREVIOUS_DIR,
    TRAINER_STATE_FILE,
    checkpoint_exists,
)
from self_speculation.training.config import TrainConfig, parse_config
from self_speculation.training.loop import RUN_FILES, TrainingInterrupted, train


def interrupted_line(config: TrainConfig | None) -> str:
    """What a Ctrl-C that ended the run outside a step left (a second Ctrl-C during a step
    or a checkpoint, or one during the data, the model or the final export)."""
    output_dir = None if config is None else Path(config.training.output_dir)
    # checkpoint.old alone: stopped between a checkpoint's renames (put back at the next start)
    if output_dir is not None and any(
        (output_dir / name / TRAINER_STATE_FILE).is_file()
        for name in (CHECKPOINT_DIR, PREVIOUS_DIR)
    ):
        return (
            f"interrupted: the last checkpoint in {output_dir} is kept (steps after it are "
            "lost); continue with --resume True"
        )
    return "interrupted before the first checkpoint: nothing to resume"


def main(argv: list[str] | None = None) -> int:
    config: TrainConfig | None = None
    try:
        config = parse_config(argv, prog="train.py")
        args = config.training
        if not (args.resume or args.overwrite) and checkpoint_exists(Path(args.output_dir)):
            raise ConfigError(
                f"{args.output_dir} already holds a run: --resume True continues it, "
                "--overwrite True starts over, or choose another --output_dir"
            )
        if config.model.model and not args.resume:
            # Damaged or missing model files: before the data is read, and before the output
            # directory is made (a typo's "did you mean" would name it, and it would stay).
            if not is_gguf_file(config.model.model) and config.model.model != "smollm2":
                check_model_source(config.model.model)
            inspect_model(config.model.model)
        check_output_dir(  # before the data is read
            args.output_dir,
            overwrite=args.overwrite,
            own_files=() if args.resume else RUN_FILES,
            allow=("holds a model",) if args.resume else (),  # a finished run resumed: its own
        )
        train(config)
    except (LayerSkipError, OSError) as error:  # OSError: an output file that cannot be written
        sys.stderr.write(f"train.py: error: {error_line(error)}\n")
        return 2
    except TrainingInterrupted as stop:
        sys.stderr.write(f"train.py: interrupted: {stop}\n")
        return stop.exit_code
    except (MemoryError, RuntimeError) as error:
        if not (
            report_out_of_memory(
                error, "train.py", "try a smaller model, --batch_size or --seq_len"
            )
            or report_lost_process(error, "train.py")
        ):
            raise
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"train.py: {interrupted_line(config)}\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
