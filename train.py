"""Train a causal LM with the LayerSkip recipe: layer dropout + early-exit loss.

From scratch (``--preset`` or ``--config_file``; a byte-level BPE tokenizer is trained on
the corpus) or from an existing model (``--model``), on local files (``--data`` globs; text,
code or JSONL with a "text" field) or a ``datasets`` dataset (``--dataset``). Writes the
final model in ``save_pretrained`` form (bf16 safetensors + tokenizer) to ``--output_dir``,
a JSONL log of per-exit losses, and a checkpoint that ``--resume True`` continues exactly.

Multi-process: ``torchrun --nproc_per_node N train.py ...`` (DDP, gloo on CPU).

Example (a few minutes on a CPU)::

    python train.py --preset small --data 'corpus/**/*.py' --max_tokens 500000 \
        --output_dir runs/small
"""

from __future__ import annotations

import sys

from self_speculation.errors import LayerSkipError
from self_speculation.training.trainer import TrainConfig, parse_config, train


def main(argv: list[str] | None = None) -> int:
    try:
        config: TrainConfig = parse_config(argv, prog="train.py")
        train(config)
    except LayerSkipError as error:
        sys.stderr.write(f"train.py: error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("train.py: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
