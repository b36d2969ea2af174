"""The run-over-a-dataset loop shared by benchmark.py, sweep.py and correctness.py, and
the files a run writes.

A run takes samples (already sharded for this rank) and one or more generation configs;
for each sample it runs every config in turn (interleaved, so that slow drifts of the
machine hit every strategy alike) and yields one *row* per (sample, config): the prompt,
reference, prediction, generated token ids, the engine's speed figures and optionally the
text metrics. Rows are appended to a JSONL file as they come, so an interruption loses
nothing; the run's single result document is written atomically at the end.

Sampling is seeded per sample (``seed + sample index``), so a sample's output does not
depend on which rank ran it or on what ran before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from self_speculation.config import UNSET, GenerationConfig, GenerationStrategyName
from self_speculation.distributed import DistributedContext, broadcast, gather
from self_speculation.errors import ConfigError, expand_home, real_location
from self_speculation.generator import Generator
from self_speculation.metrics import text_metrics
from self_speculation.model_support import unapplied_generation_settings
from self_speculation.output_safety import hold_output_dir, replaced_when_done
from self_speculation.sampling import applied_checkpoint_settings

logger = logging.getLogger(__name__)


class Sample(Protocol):
    """What the loop needs from a sample (data.EvaluationExample fits)."""

    index: int
    input: str
    output: str


def _task_id(sample: Sample) -> dict[str, str]:
    """``{"task_id": ...}`` for a sample that has one (HumanEval), else nothing."""
    metadata = getattr(sample, "metadata", None) or {}
    return {"task_id": metadata["task_id"]} if "task_id" in metadata else {}


def _json_ready(value: Any) -> Any:
    """``value`` with NaN/inf turned into None and tuples/paths/enums into JSON types."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_ready(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and isinstance(value.value, str | int):  # enums
        return value.value
    if value is None or isinstance(value, str | int | bool):
        return value
    if callable(getattr(value, "item", None)):  # numpy / torch scalars
        try:
            return _json_ready(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def write_json_atomic(path: str | os.PathLike, document: Mapping[str, Any]) -> None:
    """Write ``document`` as one valid JSON file: to a temporary file, then renamed over
    ``path``, so a reader never sees half a document."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_ready(document), indent=2, allow_nan=False)
    # Not mkstemp: its files are 0600, the result would be hidden from other users.
    with replaced_when_done(path) as temporary, open(temporary, "x", encoding="utf-8") as stream:
        stream.write(text + "\n")


def repair_last_line(
    path: str | os.PathLike, is_complete: Callable[[str], bool] = lambda line: False
) -> str | None:
    """Make ``path`` end at a line boundary before rows are appended to it, so that a new row
    is never glued onto a line a killed writer (or an editor) left unfinished.

    A last line without its newline is kept (the newline is added) when ``is_complete``
    says it is a whole row, e.g. an editor dropped the final newline; otherwise it is cut
    off.

    Returns:
        The unfinished line that was cut off, or None when nothing was lost.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, "rb+") as stream:
        stream.seek(-1, os.SEEK_END)
        if stream.read(1) == b"\n":
            return None
        stream.seek(0)
        data = stream.read()
        keep = data.rfind(b"\n") + 1  # 0 when the file is one unfinished line
        last = data[keep:].decode("utf-8", errors="replace")
        if is_complete(last):
            stream.seek(0, os.SEEK_END)
            stream.write(b"\n")
            return None
        stream.truncate(keep)
    return last


def files_fingerprint(path: str) -> list:
    """Name, size and modification time of a local file, or of the files in a local folder
    (one level, as models and saved datasets are laid out); [] for a hub id."""
    where = Path(os.path.expanduser(path))
    files = sorted(where.iterdir()) if where.is_dir() else [where] if where.is_file() else []
    return [
        (item.name, item.stat().st_size, item.stat().st_mtime_ns)
        for item in files
        if item.is_file()
    ]


def setting_digest(relevant: dict, paths: dict[str, str | None]) -> str:
    """A 12-hex-digit hash of a run's setting: ``relevant`` (JSON-able values) plus, for
    each named local path, what it holds (``files_fingerprint``), so that a model retrained
    or data rewritten in place counts as another setting. A local path counts by its real
    location, not by its spelling (``runs/x/``, a symlink, ``~``, another working
    directory): by what it holds alone, two models of one architecture whose files have
    the same names, sizes and times (unpacked from archives, copied with ``cp -a``) were
    one setting, and one answered from the other's rows or request cache."""
    keyed = dict(relevant)
    for name, path in paths.items():
        if path is not None:
            keyed[f"{name}_files"] = files_fingerprint(path)
            if keyed[f"{name}_files"]:
                keyed[name] = real_location(path)
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one whole line (``line`` + newline) in a single write, flushed to disk.

    Raises:
        OSError: naming ``path`` (a full disk, say).
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        try:
            _write_all(descriptor, (line.rstrip("\n") + "\n").encode("utf-8"))
        except OSError:
            with contextlib.suppress(OSError):  # no half line (a file size limit, a full disk)
                os.ftruncate(descriptor, size)
            raise
        os.fsync(descriptor)
    except OSError as error:
        raise _naming(error, path) from None
    finally:
        os.close(descriptor)


def _write_all(descriptor: int, data: bytes) -> None:
    """Write all of ``data`` (os.write may write part of it)."""
    while data:
        written = os.write(descriptor, data)
        data = data[written:]


def _naming(error: OSError, path: str | os.PathLike) -> OSError:
    """``error`` with ``path`` as its file name (os.write's errors name none)."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, os.fspath(path))


class JsonlWriter:
    """Appends one JSON object per line, each with its own unbuffered write, so rows survive
    a crash; a row that cannot be written whole (a full disk) is cut off again, so the file
    holds whole rows only, and the error names the file.

    Used as a context manager, a file that got no row before an error is removed: a run
    that fails at the start leaves no empty samples file behind. The file must be new: an
    existing one (another run's rows) is never truncated or appended to.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._descriptor: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
        )
        self._size = 0  # bytes of the whole rows written
        self.num_rows = 0

    def write(self, row: Mapping[str, Any]) -> None:
        data = (json.dumps(_json_ready(row), allow_nan=False) + "\n").encode("utf-8")
        try:
            _write_all(self._descriptor, data)
        except OSError as error:
            with contextlib.suppress(OSError):  # no half row
                os.ftruncate(self._descriptor, self._size)
                os.lseek(self._descriptor, self._size, os.SEEK_SET)
            raise _naming(error, self.path) from None
        self._size += len(data)
        self.num_rows += 1
        if os.fstat(self._descriptor).st_nlink == 0:
            # The file (or its folder) was deleted meanwhile: the rows go nowhere, and the
            # run would end saying it wrote them.
            raise FileNotFoundError(
                errno.ENOENT,
                "removed while the run was writing it (its rows are lost); stopped",
                os.fspath(self.path),
            )

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close()
        if exc_type is not None and self.num_rows == 0:
            self.path.unlink(missing_ok=True)


def read_jsonl_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


@dataclass(frozen=True)
class RunFiles:
    """The files of one run: the result document and its per-sample rows.

    Under torchrun each rank streams its rows to ``rank_samples``; rank 0 merges them into
    ``samples`` (sample order) at the end.
    """

    result: Path
    samples: Path
    rank_samples: Path


def run_files(output_dir: str, script: str, context: DistributedContext) -> RunFiles:
    """Timestamped file names under ``output_dir`` (``~`` expanded), agreed on by every
    rank; the directory is created and held with a shared lock for the rest of the run
    (a training run or sweep writing there meanwhile is refused, and refuses this one)."""
    stamp = broadcast(datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"), context)
    directory = Path(expand_home(output_dir, "--output_dir"))
    hold_output_dir(directory)
    stem = directory / f"{script}_{stamp}"
    rank_samples = (
        stem.with_name(f"{stem.name}.samples.rank{context.rank}.jsonl")
        if context.world_size > 1
        else stem.with_name(f"{stem.name}.samples.jsonl")
    )
    return RunFiles(
        result=stem.with_name(f"{stem.name}.json"),
        samples=stem.with_name(f"{stem.name}.samples.jsonl"),
        rank_samples=rank_samples,
    )


def merge_rank_rows(
    files: RunFiles, rows: Sequence[Mapping[str, Any]], context: DistributedContext
) -> None:
    """On rank 0 under torchrun: write every rank's rows, in sample order, to one JSONL and
    drop the per-rank files. Nothing to do for a single process (already streamed)."""
    if context.world_size == 1 or not context.is_main:
        return
    ordered = sorted(rows, key=lambda row: (row["index"], row.get("order", 0)))
    temporary = files.samples.with_name(f".{files.samples.name}.tmp")
    temporary.unlink(missing_ok=True)  # left by a run killed while merging
    with JsonlWriter(temporary) as writer:
        for row in ordered:
            writer.write(row)
    os.replace(temporary, files.samples)
    for rank in range(context.world_size):
        rank_file = files.samples.with_name(
            files.samples.name.replace(".samples.jsonl", f".samples.rank{rank}.jsonl")
        )
        if rank_file.exists():
            rank_file.unlink()


def environment_info(
    generator: Generator,
    context: DistributedContext,
    configs: Sequence[GenerationConfig] = (),
) -> dict[str, Any]:
    """Versions, device and dtype: what a reader needs to compare two results files
    decoded with ``configs``."""
    import transformers

    device = generator.layerwise.device
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(generator.layerwise.dtype).removeprefix("torch."),
        "torch_num_threads": torch.get_num_threads(),
        # Other work on the machine skews every timing: record how busy it was.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "world_size": context.world_size,
        "num_layers": generator.num_layers,
        # Which decoding path ran, and what compiling it cost (kept out of every timing).
        "decoding_path": _decoding_path(generator),
        "compile_seconds": generator.compile_seconds,
        "draft": _draft_description(generator),
        # The model's own generation config: what of it decoding applied changes the tokens
        # as the generation configs above do (a checkpoint's repetition penalty, say), and
        # what transformers' generate would apply and the engine did not.
        "checkpoint_generation_settings": applied_checkpoint_settings(
            getattr(generator.model, "generation_config", None), configs
        ),
        "checkpoint_settings_not_applied": unapplied_generation_settings(generator.model),
    }
    for package in ("datasets", "lm_eval"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            pass
    return info


def _draft_description(generator: Generator) -> dict[str, Any] | None:
    """How drafts left the model, as it ran (the flags say -1 for "the adapter's own"):
    the exit adapter's exit and copied layer, and the draft vocabulary's size; None for
    the plain early exit."""
    draft = generator.draft
    if draft is None:
        return None
    adapter = draft.adapter
    return {
        "adapter_exit_layer": None if adapter is None else adapter.exit_layer,
        "adapter_init_layer": None if adapter is None else adapter.init_layer,
        "draft_vocab_size": None if draft.vocab is None else len(draft.vocab),
    }


def _decoding_path(generator: Generator) -> str:
    """Which decoding path ran: a compiled pass that fell back made the rest eager."""
    fallback = generator.fast_path_fallback()
    if fallback:
        return f"eager (fast path off: {fallback})"
    return "fast (torch.compile)" if generator.compile_seconds else "eager"


def first_difference(first: Sequence[int], second: Sequence[int]) -> int | None:
    """Index of the first position where two token sequences differ (a length difference
    counts at the shorter length); None when they are equal."""
    for position, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return position
    return None if len(first) == len(second) else min(len(first), len(second))


def _sample_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _sample_name(sample: Sample) -> str:
    """A sample's name in messages: "sample I", and the data row it came from where known
    (counted from 1, as data errors count rows; shuffled, sample 0 is any row)."""
    source_row = getattr(sample, "source_row", None)
    row = "" if source_row is None else f" (row {source_row + 1} of the data)"
    return f"sample {sample.index}{row}"


def check_prompts(generator: Generator, samples: Sequence[Sample]) -> None:
    """Fail before generating anything, rather than hours into a run, when a prompt is empty
    (whitespace only: generated from a BOS token alone, its metrics would mean nothing;
    ``generate.py --prompt`` refuses it too) or does not fit the model's context. Called
    with every sample before they are sharded, so that under torchrun every rank refuses
    the run at once, before any has written anything."""
    for sample in samples:
        if not sample.input.strip():
            raise ConfigError(f"{_sample_name(sample)}: the prompt is empty (whitespace only)")
    context_limit = generator.layerwise.context_length
    if context_limit is None:
        return
    for sample in samples:
        length, prefix = _prompt_length(generator, sample.input, context_limit)
        if length >= context_limit:
            counted = f"{length} tokens" if prefix is None else (
                f"over {length} tokens in its first {prefix} characters alone"
            )  # fmt: skip
            raise ConfigError(
                f"{_sample_name(sample)}: the prompt has {counted}; the model's context is "
                f"{context_limit} tokens (choose shorter prompts or a model with a longer context)"
            )


def _prompt_length(generator: Generator, prompt: str, limit: int) -> tuple[int, int | None]:
    """(token count, None) of ``prompt``; for a prompt far longer than ``limit`` tokens,
    (the token count of a prefix, its length in characters) as soon as a prefix has twice
    ``limit``: encoding a 50 MB data row whole took minutes and 10 GB before it was refused
    (twice: however the cut splits the prefix's last word, the whole is over ``limit``)."""
    size = 32 * limit
    while size < len(prompt):
        length = len(generator.encode(prompt[:size]))
        if length >= 2 * limit:
            return length, size
        size *= 4
    return len(generator.encode(prompt)), None


def generate_rows(
    generator: Generator,
    samples: Sequence[Sample],
    configs: Sequence[GenerationConfig],
    seed: int,
    with_text_metrics: bool = True,
    progress: bool = True,
    description: str = "samples",
    log_samples: bool = True,
) -> Iterator[dict[str, Any]]:
    """Run every config on every sample (configs interleaved per sample); yield the rows.

    Args:
        generator: the loaded model's generator.
        samples: this rank's samples (checked by ``check_prompts`` before sharding).
        configs: resolved generation configs (one per strategy / grid point).
        seed: base seed; sample i is sampled with ``seed + i``.
        with_text_metrics: add ROUGE/BLEU/exact match/edit distance to each row.
        progress: show a tqdm bar.
        log_samples: log each sample's figures at INFO (else DEBUG).
    """
    device = generator.layerwise.device
    if samples:  # untimed warm-up: first-call allocations and lazy imports stay out of the figures
        for config in configs:
            generator.generate(
                samples[0].input, dataclasses.replace(config, max_steps=min(4, config.max_steps))
            )
        if with_text_metrics:
            text_metrics("warm up", "warm up")
    bar = tqdm(
        total=len(samples) * len(configs),
        desc=description,
        unit="gen",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar, logging_redirect_tqdm():
        for sample in samples:
            for order, config in enumerate(configs):
                result = generator.generate(
                    sample.input, config, generator=_sample_generator(device, seed + sample.index)
                )
                row: dict[str, Any] = {
                    "index": sample.index,
                    "source_row": getattr(sample, "source_row", None),
                    **_task_id(sample),
                    "order": order,
                    "generation_strategy": config.generation_strategy.value,
                    "prompt": sample.input,
                    "reference": sample.output,
                    "prediction": result.text,
                    "token_ids": result.token_ids,
                    **result.metrics(),
                }
                if with_text_metrics:
                    row.update(text_metrics(result.text, sample.output))
                acceptance = result.acceptance_rate
                logger.log(
                    logging.INFO if log_samples else logging.DEBUG,
                    "sample %d %s: %d tokens, %.1f tokens/s%s",
                    sample.index,
                    config.generation_strategy.value,
                    result.num_generated_tokens,
                    result.tokens_per_second,
                    "" if acceptance is None else f", acceptance {acceptance:.2f}",
                )
                bar.set_postfix(tok_s=f"{result.tokens_per_second:.1f}", refresh=False)
                bar.update(1)
                yield row


def full_model_config(config: GenerationConfig, num_layers: int) -> GenerationConfig:
    """The autoregressive full-model baseline with ``config``'s other settings (sampling,
    max_steps, stops): what self-speculative decoding is compared with."""
    return dataclasses.replace(
        config,
        generation_strategy=GenerationStrategyName.AUTOREGRESSIVE,
        exit_layer=num_layers,
        num_speculations=UNSET,
        adaptive_exit_layers=None,
        tree_branching=None,
    )


def gather_rows(rows: list[dict[str, Any]], context: DistributedContext) -> list[dict[str, Any]]:
    """Every rank's rows, in rank order, on every rank (this process's alone without
    torchrun)."""
    return [row for part in gather(rows, context) for row in part]


def collect_rows(
    rows: Iterable[dict[str, Any]], files: RunFiles, context: DistributedContext
) -> list[dict[str, Any]]:
    """Stream this rank's ``rows`` to ``files.rank_samples`` as they come, then return every
    rank's rows; under torchrun rank 0 also merges them into ``files.samples``."""
    kept = []
    with JsonlWriter(files.rank_samples) as writer:
        for row in rows:
            writer.write(row)
            kept.append(row)
    all_rows = gather_rows(kept, context)
    merge_rank_rows(files, all_rows, context)
    return all_rows


def compare_strategies(
    rows: Sequence[Mapping[str, Any]], strategies: Sequence[str]
) -> dict[str, Any]:
    """How the strategies did on the same samples, against the first one (the baseline).

    Returns:
        baseline; speedup per strategy (its total tokens / total time over the baseline's);
        num_samples compared; num_mismatches and mismatch_pct (samples whose token ids differ
        from the baseline's); outputs_identical; and per mismatch the sample index, the
        strategy and the first differing position.
    """
    baseline = strategies[0]
    by_sample: dict[int, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_sample.setdefault(int(row["index"]), {})[row["generation_strategy"]] = row

    def throughput(strategy: str) -> float | None:
        chosen = [row for row in rows if row["generation_strategy"] == strategy]
        tokens = sum(int(row["num_generated_tokens"]) for row in chosen)
        seconds = sum(float(row["total_time"]) for row in chosen)
        return tokens / seconds if seconds > 0 else None

    base_rate = throughput(baseline)
    speedup = {}
    for strategy in strategies:
        rate = throughput(strategy)
        speedup[strategy] = rate / base_rate if rate is not None and base_rate else None

    mismatches = []
    for index in sorted(by_sample):
        runs = by_sample[index]
        for strategy in strategies[1:]:
            if baseline not in runs or strategy not in runs:
                continue
            position = first_difference(runs[baseline]["token_ids"], runs[strategy]["token_ids"])
            if position is not None:
                mismatches.append(
                    {"index": index, "generation_strategy": strategy, "first_difference": position}
                )
    compared = len(by_sample)
    mismatched_samples = len({mismatch["index"] for mismatch in mismatches})
    return {
        "baseline": baseline,
        "speedup": speedup,
        "num_samples": compared,
        "num_mismatches": mismatched_samples,
        "mismatch_pct": 100.0 * mismatched_samples / compared if compared else 0.0,
        "outputs_identical": not mismatches,
        "mismatches": mismatches,
    }
