"""Training data: text and code files, JSONL, or a hub dataset -> packed token blocks.

Documents are tokenized as ``<bos> text <eos>``, concatenated and cut into blocks of
``seq_len`` tokens (the tail shorter than a block is dropped). Blocks are visited in a
seeded random order, reshuffled every epoch, so a run's data position is one integer: the
number of blocks consumed so far (:class:`BlockStream`).
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from self_speculation.errors import ConfigError, expand_home, json_refusal, require_utf8

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"


def resolve_files(
    patterns: Sequence[str], exclude: Sequence[str] = (), flag: str = "--data"
) -> list[Path]:
    """Files matching any glob of ``patterns`` (``**`` recursive; given by ``flag``) and
    none of ``exclude``.

    ``exclude`` globs are matched (fnmatch) against the whole path, however either side
    is spelled: ``./data/x`` and ``data/x``, a relative rule and an absolute ``--data`` glob
    (or the reverse) are the same file; a rule naming directories (``data/held``,
    ``data/*/held``) leaves out what is under them. The result is sorted and free of duplicates so that a run sees the same files in
    the same order everywhere. A pattern that matches no file, or an exclude rule that
    leaves out nothing, is warned about (a typo would otherwise train on the wrong data).

    Raises:
        ConfigError: no file matches.
    """
    found: dict[str, Path] = {}  # real path -> the smallest name it was found under
    rules = [_exclude_forms(expand_home(rule, "--exclude")) for rule in exclude]
    used = [False] * len(rules)
    for pattern in patterns:
        matched = False
        for name in sorted(_expand_glob(expand_home(pattern, flag))):
            path = Path(name)
            if not path.is_file():
                continue
            matched = True
            names = (str(path), os.path.abspath(path))
            hits = [
                any(fnmatch.fnmatch(names[absolute], form) for form, absolute in forms)
                for forms in rules
            ]
            if any(hits):
                used = [was or hit for was, hit in zip(used, hits)]
                continue
            real = os.path.realpath(path)
            if real not in found or path < found[real]:
                found[real] = path  # a file reached through a symlink too counts once
        if not matched and len(patterns) > 1:
            logger.warning("%s %s matches no file", flag, pattern)
    if found:
        for rule, was_used in zip(exclude, used):
            if not was_used:
                logger.warning("--exclude %s leaves out no file", rule)
    if not found:
        shown = " ".join(patterns) if patterns else "(none given)"
        raise ConfigError(
            f"no data files match {shown}"
            + (f" minus --exclude {' '.join(exclude)}" if exclude else "")
        )
    return sorted(found.values())


def _exclude_forms(rule: str) -> list[tuple[str, bool]]:
    """The spellings of an exclude rule, each with whether it is matched against a file's
    absolute path (else against the path as the glob found it): as given and normalised
    (``./x`` -> ``x``), absolute (a relative rule is relative to the working directory,
    so it is never matched against the working directory's own name), and each of them as
    a directory, with everything under it: ``data/held`` and a glob of directories
    (``data/*/held``, which left out nothing) alike."""
    forms = {(rule, False), (os.path.normpath(rule), False), (os.path.abspath(rule), True)}
    forms |= {(os.path.join(form, "*"), absolute) for form, absolute in list(forms)}
    return sorted(forms)


def _expand_glob(pattern: str) -> Iterator[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` enters each real directory
    once: glob follows symlinked directories, so a symlink to a parent made it list the
    same files dozens of times, and two such symlinks made it run for ever."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        yield from glob.glob(pattern)
        return
    cut = parts.index("**")
    # parts[:1] == [""]: an absolute pattern's root ("/**/x")
    head = os.sep.join(parts[:cut]) or (os.sep if cut else "")
    tail = os.sep.join(parts[cut + 1 :])
    roots = glob.glob(head) if glob.has_magic(head) else [head]
    seen: set[str] = set()
    for root in roots:
        for directory, subdirectories, _ in os.walk(root or os.curdir, followlinks=True):
            real = os.path.realpath(directory)
            if real in seen:
                subdirectories[:] = []
                continue
            seen.add(real)
            subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
            base = directory if root else os.path.relpath(directory)
            if tail:  # a directory's name is not a pattern ("data[1]")
                yield from _expand_glob(
                    os.path.join(glob.escape(base), tail) if base != os.curdir else tail
                )
            else:
                yield base
                yield from (
                    os.path.join(base, name)
                    for name in os.listdir(directory)
                    if not name.startswith(".")
                )


JSONL_SUFFIXES = (".jsonl", ".ndjson")
GZIP_MAGIC = b"\x1f\x8b"


def is_gzipped(path: Path | str) -> bool:
    """Whether ``path`` is gzip-compressed, by its first bytes rather than its name (Debian's
    ``changelog.Debian.gz``, a ``.txt.gz`` corpus, JSONL gzipped under a plain name)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == GZIP_MAGIC
    except OSError:  # said when the file is read
        return False


def document_bytes(path: Path, gzipped: bool) -> bytes:
    """A document file's bytes, decompressed when ``gzipped``; of a gzipped binary (a
    ``.tar.gz`` caught by a glob, known by a NUL in its first 64 KiB) only that start, to be
    skipped as binary without inflating it whole in memory.

    Raises:
        ConfigError: a gzipped file cut short or corrupt.
    """
    if not gzipped:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            head = handle.read(1 << 16)
            return head if b"\0" in head else head + handle.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None


def records_kind(path: Path, text_field: str) -> tuple[str | list | None, bool]:
    """(how ``path`` holds records: "lines" (JSON Lines), the records themselves (a JSON
    array of them, parsed once) or None (a document), is gzipped), from its name (less a
    ``.gz``), case-insensitively, and for ``.json`` from its content: datasets' ``to_json``
    writes JSON Lines or an array of records under that name, while a code corpus holds .json
    files that are documents (package.json). Gzipped: by the file's first bytes."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    gzipped = is_gzipped(path)
    suffix = suffixes[-1] if suffixes else ""
    if suffix in JSONL_SUFFIXES:
        return "lines", gzipped
    if suffix != ".json":
        return None, gzipped
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            first = next((line for line in handle if line.strip()), "").lstrip()
            if first.startswith("{") and _is_record(first, text_field):
                return "lines", gzipped
            if first.startswith("["):
                handle.seek(0)
                records = json.loads(handle.read())
                if isinstance(records, list) and records and _is_record(records[0], text_field):
                    return records, gzipped
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:  # a .gz cut short or corrupt
        raise ConfigError(f"cannot read {path}: {error}") from None
    except (OSError, UnicodeDecodeError, RecursionError, ValueError):
        pass  # read as a document below, which skips what is not text with a warning
    return None, gzipped


def _is_record(record: object, text_field: str) -> bool:
    """``record`` (or the JSON text of one) is an object with ``text_field``."""
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except (RecursionError, ValueError):
            return False
    return isinstance(record, dict) and text_field in record


def read_texts(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """The documents of ``files``: one per JSON Lines record (its ``text_field``; .jsonl,
    .ndjson, and .json files holding such records, or an array of them), else one per file;
    gzipped files are read decompressed.

    A binary or non-UTF-8 file among plain-text files (a glob can catch a .pyc or a
    Latin-1 test file) is skipped with a warning rather than scored as replacement
    characters; a JSONL file must be UTF-8 JSON throughout.
    """
    skipped: list[str] = []
    for path in files:
        kind, gzipped = records_kind(path, text_field)
        if isinstance(kind, list):
            yield from _array_texts(path, kind, text_field)
            continue
        if kind is not None:
            opener = gzip.open if gzipped else open
            try:
                with opener(path, "rt", encoding="utf-8-sig") as lines:  # a BOM is fine
                    yield from _jsonl_texts(path, lines, text_field)
            except UnicodeDecodeError as error:
                raise ConfigError(
                    f"{path} is not UTF-8 (byte 0x{error.object[error.start]:02x}): convert it"
                ) from None
            except (EOFError, zlib.error, gzip.BadGzipFile) as error:
                raise ConfigError(f"cannot read {path}: {error}") from None
            continue
        data = document_bytes(path, gzipped)
        try:
            text = data.decode("utf-8-sig")  # a BOM (Notepad) is not text
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:
            skipped.append(str(path))
            continue
        if text.strip():
            yield text
    if skipped:
        logger.warning("skipped %d binary or non-UTF-8 file(s), e.g. %s", len(skipped), skipped[0])


def _array_texts(path: Path, records: list, text_field: str) -> Iterator[str]:
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ConfigError(f"{path}: record {number} has no string field '{text_field}'")
        require_utf8(record[text_field], f"{path}: record {number}'s field '{text_field}'")
        yield record[text_field]


def _jsonl_texts(path: Path, lines: Iterable[str], text_field: str) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (RecursionError, ValueError) as error:
            raise ConfigError(
                f"{path}:{number}: not JSON ({json_refusal(error)}); a JSON Lines file holds "
                "one object per line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ConfigError(f"{path}:{number}: no string field '{text_field}'")
        # a JSON "\ud800" escape: the tokenizer would fail on it with a bare traceback
        require_utf8(record[text_field], f"{path}:{number}: field '{text_field}'")
        yield record[text_field]


def hub_texts(name: str, config_name: str | None, split: str, text_field: str) -> list[str]:
    """The ``text_field`` column of a ``datasets`` dataset (needs the network or a local cache)."""
    try:
        import datasets

        dataset = datasets.load_dataset(name, config_name, split=split)
    except Exception as error:  # noqa: BLE001 - any loading failure is the user's to fix
        raise ConfigError(
            f"cannot load dataset '{name}': {str(error).splitlines()[0] if str(error) else error!r}"
        ) from None
    if text_field not in dataset.column_names:
        raise ConfigError(
            f"dataset '{name}' has no column '{text_field}' (columns: {', '.join(dataset.column_names)})"
        )
    values = dataset[text_field]
    texts = [text for text in values if isinstance(text, str) and text.strip()]
    not_text = [value for value in values if not isinstance(value, str)]
    if not_text:  # a null or a number in a column of texts, or the wrong column
        if not texts:
            raise ConfigError(
                f"dataset '{name}': column '{text_field}' holds no strings "
                f"(e.g. {not_text[0]!r}); choose the text column with --text_field"
            )
        logger.warning(
            "dataset '%s': skipped %d of %d rows whose '%s' is not a string (e.g. %r)",
            name,
            len(not_text),
            len(values),
            text_field,
            not_text[0],
        )
    return texts


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` with ``tokenizers``.

    Byte-level means every string is encodable (no unknown token). Encoding adds the BOS
    token in front, as the training documents have it.
    """
    if vocab_size < 300:
        raise ConfigError(
            f"vocab_size must be >= 300 for a byte-level BPE (256 bytes + specials), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_pieces_for_training(texts), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
    )


# The BPE trainer's time grows faster than quadratically with a word's length (a 400,000
# letter run: 3 minutes; a 5 MB one: hours), and the byte-level pre-tokenizer makes a word
# of each run of letters, of digits or of other symbols: a digits table, a generated or
# minified file makes one. For training only, such runs are cut into pieces of this many
# characters (longer than any in Python's standard library and site-packages, 1,864;
# encoding them stays linear, and a corpus without one trains the same tokenizer).
TRAINING_RUN_CHARS = 4096
_LONGER = f"{{{TRAINING_RUN_CHARS + 1},}}"  # a regex count: more than TRAINING_RUN_CHARS
_LONG_RUN = re.compile(rf"[^\W\d_]{_LONGER}|\d{_LONGER}|(?:_|[^\s\w]){_LONGER}")


def _pieces_for_training(texts: Iterable[str]) -> Iterator[str]:
    """``texts``, with every run of more than ``TRAINING_RUN_CHARS`` letters, digits or
    other symbols cut into separate pieces of at most that many (a text without one is
    passed whole)."""
    for text in texts:
        start = 0
        for match in _LONG_RUN.finditer(text):
            if match.start() > start:
                yield text[start : match.start()]
            run = match.group()
            yield from (
                run[offset : offset + TRAINING_RUN_CHARS]
                for offset in range(0, len(run), TRAINING_RUN_CHARS)
            )
            start = match.end()
        yield text[start:] if start else text


def pack_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int
) -> torch.Tensor:
    """Token blocks [num_blocks, seq_len] of ``<bos> text <eos>`` documents back to back.

    Raises:
        ConfigError: the data holds fewer than ``seq_len`` tokens.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    chunk = 256
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False)[
            "input_ids"
        ]
        for ids in encoded:
            if bos is not None:
                stream.append(bos)
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    num_blocks = len(stream) // seq_len
    if num_blocks == 0:
        raise ConfigError(
            f"the data has {len(stream)} tokens, fewer than one block of seq_len {seq_len}"
        )
    return torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


class BlockStream:
    """An endless, seeded, epoch-wise shuffled stream of block indices.

    Position ``i`` of the stream is block ``perm_e[i % N]`` of epoch ``e = i // N``, with
    ``perm_e`` a permutation drawn from ``seed + e``; a run's data position is the count of
    positions consumed, so resuming needs no other state.
    """

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks = num_blocks
        self.seed = seed
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.num_blocks, generator=generator)
            self._epoch = epoch
        return self._order

    def indices(self, start: int, count: int) -> list[int]:
        """Block indices at stream positions ``start .. start + count - 1``."""
        picked = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_blocks)
            picked.append(int(self._permutation(epoch)[offset]))
        return picked
