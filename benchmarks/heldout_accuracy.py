"""Held-out next-token accuracy of a LayerSkip model at every exit, with plain transformers.

The shipped model's acceptance measure (model card, issue 23): top-1 next-token accuracy of
the last layer on standard-library files that its training (and its tokenizer's) never saw,
``HELD_OUT`` below, packed as ``<bos> file <eos>`` back to back in sorted path order and cut
into 512-token windows. For every exit E = 1..L (decoder layers 0..E-1, then the model's
own final norm and LM head; E = L is the full model's logits) it prints accuracy,
perplexity and top-1 agreement with the last layer (the per-token acceptance of greedy
drafts from E), and writes them as JSON.

It uses only transformers' own forward (``output_hidden_states``), not this project's
layer-wise code, so it is an independent check; early exits assume a Llama-style model
(``model.model.norm`` and ``lm_head``).

Example::

    python benchmarks/heldout_accuracy.py --model models/layerskip-stdlib
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from benchmarks.build_corpus import HELD_OUT  # noqa: E402
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.output_safety import check_output_file  # noqa: E402
from self_speculation.training.data import pack_blocks  # noqa: E402


def held_out_texts() -> tuple[list[Path], list[str]]:
    """The held-out files of this Python's standard library, sorted, and their texts."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib / name for name in HELD_OUT)
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise SystemExit(
            f"heldout_accuracy.py: error: missing held-out file(s): {', '.join(missing)}"
        )
    return files, [path.read_text(encoding="utf-8") for path in files]


@torch.inference_mode()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> list[dict]:
    """Per-exit accuracy, perplexity and agreement with the last layer over ``blocks``."""
    num_layers = model.config.num_hidden_layers
    correct = torch.zeros(num_layers, dtype=torch.long)
    agree = torch.zeros(num_layers, dtype=torch.long)
    nll = torch.zeros(num_layers, dtype=torch.float64)
    count = 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]  # [batch, seq]
        output = model(input_ids=batch, output_hidden_states=True)
        targets = batch[:, 1:]  # [batch, seq - 1]
        last_logits = output.logits[:, :-1].float()  # [batch, seq - 1, vocab]
        last_top = last_logits.argmax(-1)
        count += targets.numel()
        for exit_layer in range(1, num_layers + 1):
            if exit_layer == num_layers:
                logits = last_logits
            else:
                hidden = output.hidden_states[exit_layer][:, :-1]  # after layer E-1
                logits = model.lm_head(model.model.norm(hidden)).float()
            top = logits.argmax(-1)
            row = exit_layer - 1
            correct[row] += (top == targets).sum()
            agree[row] += (top == last_top).sum()
            nll[row] += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).double()
    return [
        dict(
            exit_layer=exit_layer,
            accuracy=correct[exit_layer - 1].item() / count,
            perplexity=math.exp(nll[exit_layer - 1].item() / count),
            agreement=agree[exit_layer - 1].item() / count,
        )
        for exit_layer in range(1, num_layers + 1)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/layerskip-stdlib")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument(
        "--max_tokens",
        type=int,
        default=0,
        help="evaluate at most this many tokens (0: all windows)",
    )
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_threads", type=int, default=0)
    parser.add_argument("--output", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.seq_len < 2 or args.batch_size < 1 or args.max_tokens < 0:
        parser.error("need --seq_len >= 2, --batch_size >= 1 and --max_tokens >= 0")
    output = None  # checked before the run, written after it
    if args.output:
        output = check_output_file(args.output, "heldout_accuracy", ("exits", "windows"))
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    files, texts = held_out_texts()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    blocks = pack_blocks(tokenizer, texts, args.seq_len)  # [num_blocks, seq_len]
    if args.max_tokens:
        blocks = blocks[: max(1, args.max_tokens // args.seq_len)]
    rows = evaluate(model, blocks, args.batch_size)

    print(
        f"model {args.model}: {len(blocks)} windows of {args.seq_len} tokens ({blocks.numel()} tokens)"
    )
    print("| exit layer E | accuracy | perplexity | agreement with last |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['exit_layer']} | {row['accuracy']:.3f} | {row['perplexity']:.1f} | {row['agreement']:.3f} |"
        )
    print(f"last-layer accuracy: {rows[-1]['accuracy']:.4f}")
    if output is not None:
        document = dict(
            benchmark="heldout_accuracy",
            model=args.model,
            files=[str(path) for path in files],
            seq_len=args.seq_len,
            windows=len(blocks),
            tokens=int(blocks.numel()),
            exits=rows,
        )
        write_json_atomic(output, document)
    return 0


if __name__ == "__main__":
    run_main(main, prog="heldout_accuracy.py")
