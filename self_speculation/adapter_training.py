"""Training an exit adapter on a frozen model by self-distillation (Kangaroo-style).

Two phases, each resumable:

1. **Targets.** The frozen model reads the corpus once, in blocks of ``seq_len`` tokens: the
   hidden states leaving layer E (for every E asked for, bfloat16) and the full model's
   top-K next-token probabilities are written to shards on disk. This is the expensive
   part (one full forward per token); it stops at a token or time budget, and a rerun
   continues after the last complete shard.
2. **Adapter.** Only the adapter is trained, on the cached states: loss = cross-entropy of
   the draft exit's distribution (over the draft vocabulary when one is used) against the
   full model's top-K probabilities, i.e. KL(full || draft) up to a constant, truncated to
   the top K. No base weight is touched; the adapter starts as a copy of a base layer.

The draft vocabulary is ranked by how often each token is the full model's greedy choice
on the corpus (ties: how often it appears in the text), so the N kept rows cover as many
of the tokens verification will want as N rows can.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from self_speculation.benchmarking import write_json_atomic
from self_speculation.draft import DraftExit
from self_speculation.errors import ConfigError, one_line, real_location
from self_speculation.loading import user_turn
from self_speculation.model_surgery import LayerwiseModel

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_BLOCKS = 16  # blocks per target shard (a rerun loses at most one shard's work)


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard_{index:05d}.pt"


def weights_sum(model: torch.nn.Module) -> float:
    """The sum of |w| over every weight of ``model``, in float64."""
    return sum(float(p.detach().double().abs().sum()) for p in model.parameters())


def weights_fingerprint(total: float) -> str:
    """A model's ``weights_sum`` as recorded with what was computed from it: to 12 digits,
    the same whatever the summation order."""
    return f"{total:.12g}"


def corpus_fingerprint(blocks: torch.Tensor) -> str:
    """A short hash of the token blocks (a target cache is only valid for the same data)."""
    return hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16]


@dataclass
class TargetSettings:
    """What a target cache was computed with (its manifest)."""

    model: str
    exit_layers: list[int]
    seq_len: int
    top_k: int
    num_blocks: int
    fingerprint: str
    model_weights: str = ""  # ``weights_fingerprint``: a model retrained in place is another
    dtype: str = ""  # what the model was loaded in (its weights, so their fingerprint, too)


@torch.no_grad()
def compute_targets(
    model: LayerwiseModel,
    blocks: torch.Tensor,
    settings: TargetSettings,
    folder: Path,
    batch_size: int = 4,
    max_seconds: float | None = None,
) -> int:
    """Write target shards for ``blocks`` [num_blocks, seq_len] into ``folder``.

    Returns:
        The number of blocks with targets on disk (a prefix of ``blocks``).

    Raises:
        ConfigError: ``folder`` holds targets made with other settings.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST_NAME
    wanted = {**settings.__dict__, "model": real_location(settings.model)}
    if (
        manifest.exists()
        and not manifest.read_bytes().strip()
        and not any(folder.glob("shard_*.pt"))
    ):
        manifest.unlink()  # a run cut short while creating it: nothing was computed yet
    if manifest.exists():
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{manifest} is damaged ({one_line(error)}); delete {folder} to compute the "
                "targets again"
            ) from None
        if isinstance(found, dict) and isinstance(found.get("model"), str):
            # as an earlier run spelled it
            found = {**found, "model": real_location(found["model"])}
        if isinstance(found, dict):
            # A setting an earlier version did not record is taken as unchanged (as
            # train_adapter.py's checkpoint settings are).
            found = {**{name: wanted[name] for name in ("model_weights", "dtype")}, **found}
        if found != wanted:
            if isinstance(found, dict) and found["dtype"] != wanted["dtype"]:
                raise ConfigError(
                    f"{folder} holds targets computed with --dtype {found['dtype']}, not "
                    f"{settings.dtype}: give that --dtype, or use another --cache_dir"
                )
            if isinstance(found, dict) and {**found, "model_weights": None} == {
                **wanted,
                "model_weights": None,
            }:
                raise ConfigError(
                    f"{folder} holds targets computed from other weights of {settings.model} "
                    "(retrained or replaced since?); delete it to compute them again, or use "
                    "another --cache_dir"
                )
            raise ConfigError(
                f"{folder} holds targets for other settings ({found}); use another --cache_dir"
            )
    else:  # atomically: an interrupted run never leaves an empty manifest behind
        write_json_atomic(manifest, wanted)
    exits = sorted(settings.exit_layers)
    num_shards = math.ceil(len(blocks) / SHARD_BLOCKS)
    started = time.monotonic()
    done = sum(1 for index in range(num_shards) if _shard_path(folder, index).exists())
    progress = tqdm(total=len(blocks) * blocks.shape[1], unit="tok", desc="targets")
    progress.update(min(done * SHARD_BLOCKS, len(blocks)) * blocks.shape[1])
    completed = 0
    for index in range(num_shards):
        path = _shard_path(folder, index)
        shard = blocks[index * SHARD_BLOCKS : (index + 1) * SHARD_BLOCKS]
        if path.exists():
            completed += len(shard)
            continue
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            break
        states: dict[int, list[torch.Tensor]] = {exit_layer: [] for exit_layer in exits}
        top_p, top_idx = [], []
        for start in range(0, len(shard), batch_size):
            tokens = shard[start : start + batch_size].to(model.device)  # [batch, seq]
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            hidden, previous = model.embed(tokens), 0
            for exit_layer in exits:
                hidden = model.run_layers(hidden, previous, exit_layer, None, positions)
                states[exit_layer].append(hidden.to(torch.bfloat16).cpu())
                previous = exit_layer
            hidden = model.run_layers(hidden, previous, model.num_layers, None, positions)
            log_probs = torch.log_softmax(model.unembed(hidden).float(), dim=-1)
            values, indices = log_probs.topk(settings.top_k, dim=-1)  # [batch, seq, K]
            top_p.append(values.exp().to(torch.float16).cpu())
            top_idx.append(indices.to(torch.int32).cpu())
            progress.update(tokens.numel())
        record = {
            "tokens": shard.to(torch.int32),
            "states": {exit_layer: torch.cat(parts) for exit_layer, parts in states.items()},
            "top_p": torch.cat(top_p),
            "top_idx": torch.cat(top_idx),
        }
        partial = path.with_suffix(".tmp")
        torch.save(record, partial)
        partial.replace(path)  # a shard on disk is always complete
        completed += len(shard)
    progress.close()
    return completed


@dataclass
class Targets:
    """Cached targets in memory: tokens [n, seq], layer E's states [n, seq, hidden],
    the full model's top-K probabilities and ids [n, seq, K]."""

    tokens: torch.Tensor
    states: torch.Tensor
    top_p: torch.Tensor
    top_idx: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, held_out: int) -> tuple[Targets, Targets]:
        """(the first n - held_out blocks, the last held_out blocks)."""
        cut = len(self) - held_out
        first = Targets(self.tokens[:cut], self.states[:cut], self.top_p[:cut], self.top_idx[:cut])
        last = Targets(self.tokens[cut:], self.states[cut:], self.top_p[cut:], self.top_idx[cut:])
        return first, last


def load_targets(folder: Path, exit_layer: int) -> Targets:
    """Every complete shard of ``folder``, with layer ``exit_layer``'s states.

    Raises:
        ConfigError: no shard, or no states for ``exit_layer``.
    """
    paths = sorted(folder.glob("shard_*.pt"))
    if not paths:
        raise ConfigError(f"{folder} holds no target shards")
    parts = []
    for path in paths:
        try:
            parts.append(torch.load(path, weights_only=True))
        except Exception as error:  # a truncated file makes torch raise anything
            raise ConfigError(
                f"target shard {path} is damaged ({one_line(error)}); delete it and run again: "
                "a missing shard is computed again"
            ) from None
    if exit_layer not in parts[0]["states"]:
        raise ConfigError(
            f"{folder} holds states for exit layers {sorted(parts[0]['states'])}, not {exit_layer}"
        )
    return Targets(
        tokens=torch.cat([part["tokens"] for part in parts]),
        states=torch.cat([part["states"][exit_layer] for part in parts]),
        top_p=torch.cat([part["top_p"] for part in parts]),
        top_idx=torch.cat([part["top_idx"] for part in parts]),
    )


def rank_draft_vocab(targets: Targets, vocab_size: int) -> torch.Tensor:
    """All token ids ranked for a draft vocabulary: by how often the full model chooses
    them greedily, then by how often they occur in the text, then by id."""
    greedy = torch.bincount(targets.top_idx[..., 0].flatten().long(), minlength=vocab_size)
    seen = torch.bincount(targets.tokens.flatten().long(), minlength=vocab_size)
    score = greedy[:vocab_size] * (int(seen.sum()) + 1) + seen[:vocab_size]
    return torch.sort(-score, stable=True).indices


def draft_log_probs(draft: DraftExit, states: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the draft exit over its vocabulary [batch, seq, N] for whole
    blocks of layer-E states [batch, seq, hidden] (a fresh causal pass, no cache)."""
    positions = torch.arange(states.shape[1], device=states.device).expand(states.shape[:2])
    adapted = draft.adapt(states, None, positions)
    return torch.log_softmax(draft.small_logits(adapted).float(), dim=-1)


def distillation_loss(
    log_q: torch.Tensor, top_p: torch.Tensor, top_idx: torch.Tensor, full_to_draft: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the draft distribution [.., N] against the full model's top-K
    probabilities; target tokens outside the draft vocabulary carry no gradient."""
    index = full_to_draft[top_idx.long()]  # [.., K], -1 outside the draft vocabulary
    inside = index >= 0
    picked = log_q.gather(-1, index.clamp_min(0))  # [.., K]
    return -(top_p.float() * picked * inside).sum(-1).mean()


@torch.no_grad()
def agreement(draft: DraftExit, targets: Targets, batch_size: int = 8) -> dict[str, float]:
    """On ``targets``: how often the draft exit's greedy token is the full model's
    (``agreement``), the draft cross-entropy against the top-K targets (``loss``), and the
    share of the full model's greedy tokens inside the draft vocabulary (``coverage``)."""
    full_to_draft = draft.full_to_draft()
    agree, loss, covered, count = 0.0, 0.0, 0.0, 0
    for start in range(0, len(targets), batch_size):
        states = targets.states[start : start + batch_size].to(
            draft.model.device, draft.model.dtype
        )
        log_q = draft_log_probs(draft, states)
        top_idx = targets.top_idx[start : start + batch_size].to(states.device)
        top_p = targets.top_p[start : start + batch_size].to(states.device)
        chosen = draft.draft_ids(log_q.argmax(-1))  # full-vocabulary ids
        agree += float((chosen == top_idx[..., 0]).sum())
        loss += float(distillation_loss(log_q, top_p, top_idx, full_to_draft)) * states.shape[0]
        covered += float((full_to_draft[top_idx[..., 0].long()] >= 0).sum())
        count += states.shape[0]
    tokens = count * targets.states.shape[1]
    return {"agreement": agree / tokens, "loss": loss / count, "coverage": covered / tokens}


def batches(num_blocks: int, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Block indices of one epoch, in a seeded order."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + epoch))
    for start in range(0, num_blocks - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def default_chat_prompts() -> list[str]:
    """Instruction prompts for self-generated chat data (disjoint from the benchmark's
    chat prompts): every request applied to every topic."""
    requests = (
        "Explain {} to a beginner.",
        "What are the main advantages and disadvantages of {}?",
        "Write a short paragraph about {}.",
        "Give me three practical tips about {}.",
        "Summarize the history of {} in a few sentences.",
        "Write a Python function related to {}, with a docstring.",
    )
    topics = (
        "photosynthesis",
        "the water cycle",
        "public transport",
        "machine learning",
        "healthy sleep",
        "the French revolution",
        "volcanoes",
        "saving money",
        "learning a language",
        "recursion",
        "climate change",
        "the internet",
        "gardening",
        "databases",
        "the solar system",
        "time management",
        "electric cars",
        "sorting algorithms",
        "coffee",
        "renewable energy",
        "version control",
        "the human heart",
        "chess",
        "unit testing",
    )
    return [request.format(topic) for topic in topics for request in requests]


def chat_texts(tokenizer, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
    """Whole conversations as the model sees them (chat template, then the answer)."""
    texts = []
    for prompt, response in zip(prompts, responses, strict=True):
        opening = user_turn(tokenizer, prompt, tokenize=False)
        texts.append(opening + response + (tokenizer.eos_token or ""))
    return texts
