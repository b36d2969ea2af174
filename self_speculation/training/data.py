"""Training data: text and code files, JSONL, or a hub dataset -> packed token blocks.

Documents are tokenized as ``<bos> text <eos>``, concatenated and cut into blocks of
``seq_len`` tokens (the tail shorter than a block is dropped). Blocks are visited in a
seeded random order, reshuffled every epoch, so a run's data position is one integer: the
number of blocks consumed so far (:class:`BlockStream`).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from self_speculation.errors import ConfigError, expand_home, json_refusal

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"


def resolve_files(
    patterns: Sequence[str], exclude: Sequence[str] = (), flag: str = "--data"
) -> list[Path]:
    """Files matching any glob of ``patterns`` (``**`` recursive; given by ``flag``) and
    none of ``exclude``.

    ``exclude`` globs are matched (fnmatch) against the whole path. The result is sorted
    and free of duplicates so that a run sees the same files in the same order everywhere.

    Raises:
        ConfigError: no file matches.
    """
    found: set[Path] = set()
    for pattern in patterns:
        for name in glob.glob(expand_home(pattern, flag), recursive=True):
            path = Path(name)
            if path.is_file() and not any(fnmatch.fnmatch(str(path), rule) for rule in exclude):
                found.add(path)
    if not found:
        shown = " ".join(patterns) if patterns else "(none given)"
        raise ConfigError(
            f"no data files match {shown}"
            + (f" minus --exclude {' '.join(exclude)}" if exclude else "")
        )
    return sorted(found)


def read_texts(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """The documents of ``files``: one per JSONL line (its ``text_field``), else one per file.

    A binary or non-UTF-8 file among plain-text files (a glob can catch a .pyc or a
    Latin-1 test file) is skipped with a warning rather than scored as replacement
    characters; a JSONL file must be UTF-8 JSON throughout.
    """
    skipped: list[str] = []
    for path in files:
        if path.suffix == ".jsonl":
            try:
                with path.open(encoding="utf-8") as lines:
                    yield from _jsonl_texts(path, lines, text_field)
            except UnicodeDecodeError as error:
                raise ConfigError(
                    f"{path} is not UTF-8 (byte 0x{error.object[error.start]:02x}): convert it"
                ) from None
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:
            skipped.append(str(path))
            continue
        if text.strip():
            yield text
    if skipped:
        logger.warning("skipped %d binary or non-UTF-8 file(s), e.g. %s", len(skipped), skipped[0])


def _jsonl_texts(path: Path, lines: Iterable[str], text_field: str) -> Iterator[str]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (RecursionError, ValueError) as error:
            raise ConfigError(f"{path}:{number}: not JSON ({json_refusal(error)})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ConfigError(f"{path}:{number}: no string field '{text_field}'")
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
    return [text for text in dataset[text_field] if isinstance(text, str) and text.strip()]


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
    tokenizer.train_from_iterator(texts, trainer=trainer)
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
