"""A KV cache addressed by explicit columns, so that rolling back costs nothing.

Every decoder layer owns two preallocated buffers ``[batch, kv_heads, capacity, head_dim]``.
A call through layers [start, end) first tells the cache which columns its new tokens
occupy (``ColumnKVCache.write_columns``, one row of columns per sequence); the model's own
attention modules then call ``update`` and the new keys and values land in those columns.
Attention reads the whole buffer; the mask built from the same columns hides what a query
may not see (left padding, the future, stale columns, positions outside a sliding window).

Why this makes rollback free (gpt-fast's static cache, with per-row columns): a query at
column c only ever sees columns <= c, and its own column was written in the same call,
before attention. After verification rejects drafts, the engine simply writes the next
step at the first rejected column; nothing needs to be erased, cropped or copied.
Columns are per row, so the rows of a batch advance independently.

Static buffers (CUDA graphs): the compiled passes' caches take their buffers from a
``BufferPool``, which keeps them from one generation to the next, one set per capacity
bucket (capacities rounded up to ``CAPACITY_STEP`` columns) with room for a power-of-two
batch. A cache uses the first rows of its set (a view, at the set's address), and every
buffer is marked a static address (``torch._dynamo.mark_static_address``, as transformers'
``StaticCache`` does), so that inductor captures the passes that write it in CUDA graphs
and replays them instead of skipping them for mutating an input. Nothing is reallocated
during a generation: rolling back moves lengths only, and a shrinking batch moves its kept
rows to the front of the same buffers (``select_rows``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from transformers import Cache

from self_speculation.trees import TreeColumns

logger = logging.getLogger(__name__)

CAPACITY_STEP = 128  # capacity buckets: one compiled shape (and CUDA graph) per bucket
MAX_POOLED_CAPACITIES = 4  # buffer sets a pool keeps (least recently used ones go)


def capacity_bucket(capacity: int) -> int:
    """Columns of the buffers that serve ``capacity`` columns (a multiple of CAPACITY_STEP)."""
    return -(-capacity // CAPACITY_STEP) * CAPACITY_STEP


def batch_bucket(rows: int) -> int:
    """Rows of the buffers that serve ``rows`` rows (the next power of two)."""
    return 1 << max(rows - 1, 0).bit_length()


def mark_static(tensor: torch.Tensor) -> None:
    """Mark ``tensor`` a static address without a guard on its identity: torch < 2.9 guards
    by default, and each generation's new views of the pooled buffers then recompiled every
    compiled pass ("Cache line invalidated because L['cache'].keys[6] got deallocated")."""
    torch._dynamo.mark_static_address(tensor, guard=False)


def is_static_address(tensor: torch.Tensor) -> bool:
    """Whether dynamo treats ``tensor`` as living at a fixed address (CUDA graphs)."""
    return getattr(tensor, "_dynamo_static_input_type", None) is not None


class BufferPool:
    """Key/value buffers kept across generations: per capacity bucket, one
    ``[rows, heads, capacity, head_dim]`` pair per cache layer, allocated on first use and
    again only for more rows or another shape (never during a generation: a cache takes
    its buffers at the prompt's pass).

    A pool serves one generation at a time (a ``ForwardPasses`` decodes one batch at a
    time): a new cache of the same capacity reuses, and overwrites, the same buffers.
    """

    def __init__(self, max_capacities: int = MAX_POOLED_CAPACITIES) -> None:
        self.max_capacities = max_capacities
        # capacity -> layer -> (keys, values)
        self._sets: OrderedDict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.allocations = 0  # buffer pairs allocated so far (tests and logs)

    def take(
        self, layer: int, capacity: int, rows: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of ``layer`` with at least ``rows`` rows and ``capacity`` columns, laid
        out for keys/values like ``key`` / ``value`` [batch, heads, new, head_dim], their
        first ``rows`` rows zero. (Attention weighs masked columns by zero, and 0 x NaN is
        NaN: a column left non-finite by an earlier generation, float16 overflowing, would
        poison every later one; reused buffers are zeroed in place, at the same address.)"""
        buffers = self._sets.setdefault(capacity, {})
        self._sets.move_to_end(capacity)
        while len(self._sets) > self.max_capacities:
            self._sets.popitem(last=False)
        held = buffers.get(layer)
        if held is None or not all(
            _fits(buffer, like, rows) for buffer, like in zip(held, (key, value))
        ):
            buffers.pop(layer, None)  # the old pair is freed before its replacement is made
            held = None
            try:
                held = _zeros_like_keys(key, value, batch_bucket(rows), capacity)
            except torch.OutOfMemoryError:
                # The sets kept for other capacities (up to max_capacities of them, each as
                # large as an eager decode's whole cache) are what a long run of varied
                # prompt lengths holds beyond eager decoding: freed, then tried once more.
                if not self.release_others(capacity):
                    raise
                logger.warning(
                    "out of memory for the key/value buffers of %d columns: the pool's "
                    "buffers for other prompt lengths were freed (their compiled CUDA "
                    "graphs record again when used)",
                    capacity,
                )
                held = _zeros_like_keys(key, value, batch_bucket(rows), capacity)
            for buffer in held:
                mark_static(buffer)
            buffers[layer] = held
            self.allocations += 1
        else:
            for buffer in held:
                buffer[:rows].zero_()
        return held

    def release_others(self, capacity: int) -> bool:
        """Free the buffer sets of every capacity but ``capacity``; whether there were any."""
        others = [kept for kept in self._sets if kept != capacity]
        for kept in others:
            del self._sets[kept]
        if others and torch.cuda.is_available():
            torch.cuda.empty_cache()  # back to the device, for the allocation that failed
        return bool(others)

    def nbytes(self) -> int:
        """Bytes held by the pool's buffers."""
        return sum(
            buffer.numel() * buffer.element_size()
            for buffers in self._sets.values()
            for pair in buffers.values()
            for buffer in pair
        )


def _zeros_like_keys(
    key: torch.Tensor, value: torch.Tensor, rows: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero [rows, heads, capacity, head_dim] pair laid out like ``key`` / ``value``."""
    # Normal tensors even inside torch.inference_mode(): the pool outlives the generation,
    # and an inference tensor cannot be written outside that mode.
    with torch.inference_mode(False):
        return tuple(
            like.new_zeros(rows, like.shape[1], capacity, like.shape[-1]) for like in (key, value)
        )


def _fits(buffer: torch.Tensor, like: torch.Tensor, rows: int) -> bool:
    return (
        buffer.shape[0] >= rows
        and buffer.shape[1] == like.shape[1]
        and buffer.shape[3] == like.shape[-1]
        and buffer.dtype == like.dtype
        and buffer.device == like.device
    )


def write_at_columns(
    keys: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
) -> None:
    """Write keys/values [batch, heads, new, head_dim] into one layer's buffers ``keys`` /
    ``values`` [batch, heads, capacity, head_dim] at ``columns`` [batch, new], per row."""
    if columns.shape[0] == 1 and keys.shape[0] == 1:
        keys.index_copy_(2, columns[0], key_states)
        values.index_copy_(2, columns[0], value_states)
    else:
        # Advanced indexing, not scatter_: inductor updates a graph input in place with
        # index_put_, but turns scatter_ into copies of the whole buffer (measured: 24
        # layers at batch 8, 3.5 ms against 0.27 ms).
        rows = torch.arange(columns.shape[0], device=columns.device)[:, None]  # [batch, 1]
        keys[rows, :, columns] = key_states.transpose(1, 2)  # [batch, new, heads, dim]
        values[rows, :, columns] = value_states.transpose(1, 2)


class ColumnKVCache(Cache):
    """Static per-layer key/value buffers written at per-row columns.

    Args:
        num_layers: decoder layers of the model (one buffer pair each).
        batch_size: rows.
        capacity: columns per row (longest prompt + generated tokens + drafting slack).
        dynamic: mark the column dimension dynamic for ``torch.compile``, so that caches
            of other capacities (other prompt lengths) reuse the same compiled code.
        pool: take the buffers from this pool (static addresses, kept across
            generations; the capacity is rounded up to its bucket); None: allocate them
            for this cache alone.

    Buffers are taken on a layer's first ``update`` (the prefill), with the dtype,
    device, head count and head size of the keys the model's own attention produced.
    ``keys[i]`` / ``values[i]`` are the first ``rows`` rows of the layer's buffers.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        capacity: int,
        dynamic: bool = False,
        pool: BufferPool | None = None,
    ) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.rows = batch_size
        self.pool = pool
        self.capacity = capacity_bucket(capacity) if pool is not None else capacity
        self.dynamic = dynamic
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # The whole buffers of each layer (keys, values); ``keys`` / ``values`` view them.
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        # [batch, new tokens] columns of the tokens of the current call; set by the engine.
        self.write_columns: torch.Tensor | None = None
        # Set by a token-tree call: what its tokens see instead of the columns before them.
        self.tree: TreeColumns | None = None

    def __len__(self) -> int:
        return self.num_layers

    def _allocate(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.pool is not None:
            self._buffers[layer] = self.pool.take(layer, self.capacity, self.rows, key, value)
        else:
            self._buffers[layer] = tuple(
                like.new_zeros(self.rows, like.shape[1], self.capacity, like.shape[-1])
                for like in (key, value)
            )
        self._use_first_rows(layer)

    def _use_first_rows(self, layer: int) -> None:
        """Point ``keys[layer]`` / ``values[layer]`` at the first ``rows`` rows of the
        layer's buffers (same address: the rows come first)."""
        keys, values = (buffer[: self.rows] for buffer in self._buffers[layer])
        for view in (keys, values):
            if self.pool is not None:
                mark_static(view)
            if self.dynamic:
                torch._dynamo.maybe_mark_dynamic(view, 2)
        self.keys[layer], self.values[layer] = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [batch, heads, new, head_dim] at ``write_columns``; return all."""
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        write_at_columns(keys, values, self.write_columns, key_states, value_states)
        return keys, values

    def move_columns(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        """Copy every layer's entries at columns ``sources`` to ``destinations`` (both
        [batch, n], per row): an accepted tree path moves behind its root. All sources are
        read before anything is written."""
        rows = torch.arange(sources.shape[0], device=sources.device)[:, None]  # [batch, 1]
        for keys, values in zip(self.keys, self.values):
            if keys is None:
                continue
            for buffer in (keys, values):
                buffer[rows, :, destinations] = buffer[rows, :, sources]

    def select_rows(self, rows: torch.Tensor, first_column: int = 0) -> None:
        """Keep only ``rows`` (indices into the batch, in their new order) and the columns
        from ``first_column`` on (left padding no kept row needs), in the same buffers:
        the kept entries move to the first rows and columns (the last ``first_column``
        columns are zeroed), and
        ``keys`` / ``values`` view the first ``len(rows)`` rows. No buffer is allocated or
        moved, so compiled passes (and their CUDA graphs) keep their addresses."""
        width = self.capacity - first_column
        for layer in range(self.num_layers):
            if self._buffers[layer] is None:
                continue
            for current, buffer in zip(
                (self.keys[layer], self.values[layer]), self._buffers[layer]
            ):
                kept = current[rows, :, first_column:]  # [kept, heads, width, dim], a copy
                buffer[: len(rows), :, :width].copy_(kept)
                # What was left there may be a dropped row's, non-finite (0 x NaN: see
                # BufferPool.take).
                buffer[: len(rows), :, width:].zero_()
        self.rows = len(rows)
        for layer in range(self.num_layers):
            if self._buffers[layer] is not None:
                self._use_first_rows(layer)

    def columns(self, layer_idx: int) -> int:
        """Columns of a layer's buffers (read from the buffer, so that a compiled caller
        can treat it as a dynamic size)."""
        keys = self.keys[layer_idx]
        return self.capacity if keys is None else keys.shape[2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns allocated (not filled: fill levels are the engine's, per row)."""
        return self.capacity if self.keys[layer_idx] is not None else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    @property
    def is_compileable(self) -> bool:
        return True

    def nbytes(self) -> int:
        """Bytes held by the allocated buffers."""
        return sum(
            buffer.numel() * buffer.element_size()
            for buffer in (*self.keys, *self.values)
            if buffer is not None
        )


class LayerColumns(Cache):
    """One decoder layer's buffers of a ``ColumnKVCache``, as that layer's attention sees
    the cache: made from tensors alone, so that a compiled pass can trace one decoder layer
    once and call it for every layer of the same shape (``model_surgery._layer_region``).

    Args:
        keys, values: the layer's buffers, ``ColumnKVCache.keys[i]`` / ``values[i]``.
        columns: the new tokens' columns, ``ColumnKVCache.write_columns``.
        layer_idx: the cache index the layer's attention must ask for (checked); None when
            compiling (the check would make each layer's traced code its own).
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        columns: torch.Tensor,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(layers=[])
        self.keys, self.values, self.write_columns = keys, values, columns
        self.layer_idx = layer_idx

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [batch, heads, new, head_dim] at the columns; return all."""
        if self.layer_idx is not None and layer_idx != self.layer_idx:
            raise RuntimeError(
                f"a decoder layer asked for cache layer {layer_idx}, not its own "
                f"{self.layer_idx}: its attention reads another layer's keys"
            )
        write_at_columns(self.keys, self.values, self.write_columns, key_states, value_states)
        return self.keys, self.values

    def columns(self, layer_idx: int = 0) -> int:
        return self.keys.shape[2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys.shape[2]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.keys.shape[2]

    @property
    def is_compileable(self) -> bool:
        return True
