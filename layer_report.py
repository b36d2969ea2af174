"""Per-layer quality report: for every exit layer, held-out accuracy, perplexity and agreement.

For each exit layer E = 1..L (layers 0..E-1, then the model's own final norm and LM head;
E = L is the full model): next-token accuracy, perplexity, and top-1 agreement with the
last layer (the greedy acceptance proxy of self-speculative decoding). Writes one JSON
document and a PNG plot to --output_dir; --compare adds other models to both.

Example::

    S=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
    python layer_report.py --model models/layerskip-stdlib \
        --data "$S/json/*.py" --output_dir logs/report

(``$S`` is this Python's standard library, the held-out files of the shipped model.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from arguments import (
    MAX_SEED,
    check_output_dir,
    corpus_token_ranking,
    parse_args,
    refuse_several_processes,
    run_main,
)
from self_speculation.benchmarking import write_json_atomic
from self_speculation.draft import load_draft_exit, read_adapter_config
from self_speculation.errors import ConfigError, expand_home, require_thread_count, require_utf8
from self_speculation.loading import DEFAULT_MODEL, DTYPES, inspect_model, load_model_and_tokenizer
from self_speculation.model_surgery import LayerwiseModel
from self_speculation.output_safety import output_dir_lock
from self_speculation.training.data import (
    document_bytes,
    pack_blocks,
    read_texts,
    records_kind,
    resolve_files,
)
from self_speculation.training.layer_quality import ExitQuality, draft_exit_quality, exit_quality

logger = logging.getLogger("layer_report")


@dataclass
class ReportConfig:
    """Settings of a layer report."""

    model: str = DEFAULT_MODEL  # model to report on (local dir, hub id, .gguf file or smollm2)
    compare: list[str] = field(default_factory=list)  # more models, evaluated on the same files
    data: list[str] = field(default_factory=list)  # globs of held-out text/code/JSONL files
    exclude: list[str] = field(default_factory=list)  # globs of paths to leave out
    text_field: str = "text"  # JSONL field holding the text
    seq_len: int = 0  # tokens per evaluated sequence; 0: 512, or the model's context if shorter
    max_tokens: int = 65536  # evaluate at most this many tokens per model (whole sequences)
    batch_size: int = 4  # sequences per forward pass (memory, not results)
    dtype: str = "float32"  # computation dtype (bf16 weights are upcast exactly)
    num_threads: int = 1  # torch CPU threads (0: torch's default); 1: see generate.py --help
    output_dir: str = "./logs"  # ~ is expanded; a model's or a shipped folder is refused
    overwrite: bool = False  # replace an earlier layer_report.json / .png in output_dir
    seed: int = 42  # torch.manual_seed at the start (the report itself draws nothing)
    draft_adapter: str | None = None  # also report this exit adapter (train_adapter.py)
    draft_vocab_size: int = -1  # draft head over the N top-ranked tokens (-1: the adapter's)
    exit_layer: int = 0  # exit of the draft-exit row without an adapter (0: none)
    draft_vocab_corpus: list[str] = field(default_factory=list)  # globs ranking the N tokens

    def __post_init__(self) -> None:
        self.output_dir = expand_home(self.output_dir, "--output_dir")  # as --model is
        if self.draft_adapter:
            self.draft_adapter = expand_home(self.draft_adapter, "--draft_adapter")
        if not self.data:
            raise ConfigError("give held-out data with --data GLOB...")
        if self.seq_len and self.seq_len < 2:
            raise ConfigError(f"--seq_len must be >= 2 (0: automatic), got {self.seq_len}")
        if self.max_tokens < max(self.seq_len, 2) or self.batch_size < 1:
            raise ConfigError("need max_tokens >= seq_len and batch_size >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}' (choose from {', '.join(DTYPES)})")
        if self.draft_vocab_size < -1 or self.exit_layer < 0:
            raise ConfigError("--draft_vocab_size must be >= -1 and --exit_layer >= 0")
        if self.draft_vocab_size > 0 and not self.draft_adapter and not self.exit_layer:
            raise ConfigError("a draft vocabulary without --draft_adapter needs --exit_layer E")
        if self.exit_layer and not self.draft_adapter and self.draft_vocab_size <= 0:
            # It names the draft-exit row's exit; without a draft there is no such row.
            raise ConfigError(
                f"--exit_layer {self.exit_layer} names the exit of a draft row, and there is "
                "none without --draft_vocab_size N or --draft_adapter (the per-layer table "
                "already has every full-vocabulary exit)"
            )
        if self.draft_vocab_size > 0 and not self.draft_adapter and not self.draft_vocab_corpus:
            raise ConfigError(
                "a draft vocabulary without --draft_adapter needs --draft_vocab_corpus GLOB... "
                "to rank its tokens"
            )
        if self.draft_vocab_corpus and self.draft_vocab_size <= 0:
            raise ConfigError(
                "--draft_vocab_corpus ranks a draft vocabulary: give --draft_vocab_size N"
            )
        if self.draft_adapter:
            adapter = read_adapter_config(self.draft_adapter)  # a wrong path fails now
            if self.exit_layer and self.exit_layer != adapter.exit_layer:
                raise ConfigError(
                    f"the draft adapter was trained for exit layer {adapter.exit_layer}; got "
                    f"--exit_layer {self.exit_layer} (leave it unset or give {adapter.exit_layer})"
                )
        require_thread_count(self.num_threads)
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")


DEFAULT_SEQ_LEN = 512
REPORT_FILES = ("layer_report.json", "layer_report.png")


def check_seq_len(name: str, seq_len: int, context_length: int | None) -> None:
    """Refuse sequences longer than the model's context: positions past it were never
    trained, and the figures would describe a model run outside its range.

    Raises:
        ConfigError: naming the model and its context.
    """
    if context_length is not None and seq_len > context_length:
        raise ConfigError(
            f"--seq_len {seq_len} is longer than the context of {name} "
            f"({context_length} tokens): choose --seq_len <= {context_length}"
        )


def report_model(name: str, texts: list[str], config: ReportConfig) -> dict:
    """The report section of one model: its per-exit table and what it was measured on."""
    model, tokenizer = load_model_and_tokenizer(name, dtype=config.dtype, device="cpu")
    layerwise = LayerwiseModel(model)
    seq_len = config.seq_len or min(
        DEFAULT_SEQ_LEN, layerwise.context_length or DEFAULT_SEQ_LEN, config.max_tokens
    )  # automatic: never more tokens than --max_tokens allows
    check_seq_len(name, seq_len, layerwise.context_length)
    blocks = pack_blocks(tokenizer, texts, seq_len)  # [num_blocks, seq_len]
    blocks = blocks[: max(1, config.max_tokens // seq_len)]
    logger.info("%s: %d sequences of %d tokens", name, len(blocks), seq_len)
    draft, exit_layer = None, 0
    if name == config.model and (config.draft_adapter or config.draft_vocab_size > 0):
        # Before the per-layer table: an adapter that does not fit fails in seconds.
        ranking = None
        if config.draft_vocab_corpus:
            ranking = corpus_token_ranking(tokenizer, config.draft_vocab_corpus, layerwise)
        draft = load_draft_exit(layerwise, config.draft_adapter, config.draft_vocab_size, ranking)
        exit_layer = draft.exit_layer or config.exit_layer
        if not 1 <= exit_layer < layerwise.num_layers:
            raise ConfigError(
                f"--exit_layer must be in [1, {layerwise.num_layers - 1}] for a draft vocabulary "
                f"without an adapter, got {exit_layer}"
            )
    rows: list[ExitQuality] = exit_quality(layerwise, blocks, config.batch_size)
    section = {
        "model": name,
        "num_layers": len(rows),
        "tokens": int(blocks.numel()),
        "predictions": int(blocks.shape[0] * (blocks.shape[1] - 1)),  # what each mean is over
        "exits": [row.as_dict() for row in rows],
    }
    if draft is not None:
        section["draft_exit"] = draft_exit_quality(
            layerwise, draft, exit_layer, blocks, config.batch_size
        )
    return section


def plot(sections: list[dict], path: Path) -> None:
    """Accuracy, perplexity and agreement against the exit layer, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for section in sections:
        layers = [row["exit_layer"] for row in section["exits"]]
        label = Path(section["model"]).name or section["model"]
        for axis, metric in zip(axes, ("accuracy", "perplexity", "agreement")):
            axis.plot(layers, [row[metric] for row in section["exits"]], marker="o", label=label)
    for axis, title in zip(
        axes, ("next-token accuracy", "perplexity", "top-1 agreement with last layer")
    ):
        axis.set_title(title)
        axis.set_xlabel("exit layer E")
        axis.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def check_text_files(files: list[Path], text_field: str = "text") -> None:
    """Refuse a binary or non-UTF-8 file among the data (a glob can catch a .pyc or an
    image): its bytes would be scored as text, or fail deep in the tokenizer. Gzipped files
    are checked decompressed.

    Raises:
        ConfigError: naming the file, the offset and how to leave it out.
    """
    for path in files:
        try:
            _, gzipped = records_kind(path, text_field)
            data = document_bytes(path, gzipped)  # as train.py reads it
        except OSError as error:
            raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
        nul = data.find(b"\0")
        if nul >= 0:
            raise ConfigError(
                f"{path} is a binary file (NUL byte at offset {nul}): give text, "
                "code or JSONL files, or leave it out with --exclude"
            )
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                f"{error.start}): convert it or leave it out with --exclude"
            ) from None


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_args(ReportConfig, argv=argv, prog="layer_report.py")
    refuse_several_processes("layer_report.py")  # every process would take the folder's lock
    check_output_dir(config.output_dir, overwrite=config.overwrite, own_files=REPORT_FILES)
    for name in [config.model, *config.compare]:
        facts = inspect_model(name)  # config.json and weight files, before reading any data
        if facts is not None and config.seq_len:
            check_seq_len(name, config.seq_len, facts.context_length)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    files = resolve_files(config.data, config.exclude)
    check_text_files(files, config.text_field)
    texts = []
    for path in files:
        for number, text in enumerate(read_texts([path], config.text_field), 1):
            require_utf8(text, f"{path}: document {number}")  # a JSON "\ud800" escape
            texts.append(text)
    # One report is written into a folder at a time; the folder is created here.
    with output_dir_lock(config.output_dir) as output_dir:
        _report(config, files, texts, output_dir)
    return 0


def _report(config: ReportConfig, files: list[Path], texts: list[str], output_dir: Path) -> None:
    sections = [report_model(name, texts, config) for name in [config.model, *config.compare]]
    document = {
        "config": asdict(config),
        "files": [str(path) for path in files],
        "models": sections,
    }
    write_json_atomic(output_dir / "layer_report.json", document)
    plot(sections, output_dir / "layer_report.png")
    for section in sections:
        logger.info("%s\n%s", section["model"], format_table(section["exits"]))
        if "draft_exit" in section:
            logger.info("draft exit: %s", json.dumps(section["draft_exit"]))
    logger.info(
        "wrote %s and %s", output_dir / "layer_report.json", output_dir / "layer_report.png"
    )


def format_table(rows: list[dict]) -> str:
    """A Markdown table of per-exit rows."""
    lines = [
        "| exit layer | accuracy | perplexity | agreement with last |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['exit_layer']} | {row['accuracy']:.3f} | {row['perplexity']:.2f} | {row['agreement']:.3f} |"
        for row in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main, prog="layer_report.py")
