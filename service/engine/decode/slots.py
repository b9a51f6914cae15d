"""A KV cache whose decode step writes one column per row, in place.

transformers' ``DynamicCache`` appends with ``torch.cat``: every step reads and writes every row's
whole cache (at 32 rows x 4k tokens about 16 GB a step on the full model, O(T²) over a generation),
and every join re-pads and copies it again. Here each layer keeps preallocated buffers
``(row slots, kv heads, columns, head dim)``; row ``i`` holds its tokens in columns ``0..len_i - 1``
(right-padded), so:

- **step**: each row's new K/V is written at column ``len_i`` (one indexed write a layer), and
  attention reads ``buffer[:rows, :, :width]``: a view of the columns in use, no copy;
- **join**: the joiners' prefill (their own left-padded cache) is copied into their slots, and
  nothing else moves;
- **leave**: the last row moves into the freed slot (one row's columns), so rows stay contiguous;
- a step that raises half-way leaves the lengths unchanged: the columns it wrote are overwritten
  by the next step, so the cache is as it was.

Buffers grow geometrically (columns by a quarter, rows by half) and are dropped when the batch
empties. transformers' own caches do not fit: ``StaticCache`` keeps one length for the whole batch
(rows that join and leave would need it re-padded), and its continuous-batching cache takes token
ids with contiguous positions, not our embeddings and gapped positions.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin

from ..device import on_device

MIN_COLUMNS = 64
MIN_ROWS = 8  # first buffers hold this many rows: pages join a few at a time


class SlotLayer(CacheLayerMixin):
    """One layer's K and V for every row slot, written in place by :meth:`update`."""

    is_sliding = False

    def __init__(self, slots: SlotCache) -> None:
        super().__init__()
        self.slots = slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("slot buffers are allocated when rows join (SlotCache.append), not by a forward")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write each row's new token (``(rows, heads, 1, dim)``) at its length; return the columns in use."""
        slots = self.slots
        self.keys[slots.write_rows, :, slots.write_columns] = key_states[:, :, 0]
        self.values[slots.write_rows, :, slots.write_columns] = value_states[:, :, 0]
        return self.keys[: slots.rows, :, : slots.width], self.values[: slots.rows, :, : slots.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.width, 0

    def get_seq_length(self) -> int:
        return max(self.slots.lengths, default=0)

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Every running row's K/V in per-layer slot buffers; lengths on the host (see the module docstring)."""

    def __init__(self, n_layers: int) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(n_layers)])
        self.lengths: list[int] = []  # tokens cached per slot, slot order
        self.write_rows: torch.Tensor | None = None
        self.write_columns: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """Columns a step attends over: the longest row plus the token it writes."""
        return max(self.lengths, default=0) + 1

    @property
    def capacity(self) -> tuple[int, int]:
        keys = self.layers[0].keys
        return (0, 0) if keys is None else (keys.shape[0], keys.shape[2])

    # --- a step ------------------------------------------------------------------------------------

    def begin_step(self, device: torch.device) -> None:
        """Where this step writes: column ``len_i`` of every row."""
        self._reserve(self.rows, self.width)
        self.write_rows = torch.arange(self.rows, device=device)
        self.write_columns = on_device(self.lengths, device)  # the batch's step mask reads it too

    def end_step(self) -> None:
        """The step succeeded: every row holds one more token."""
        self.lengths = [n + 1 for n in self.lengths]

    # --- join and leave ----------------------------------------------------------------------------

    def append(self, prefill: DynamicCache, pads: list[int]) -> None:
        """Copy each joiner's prefilled K/V (left-padded by ``pads`` in ``prefill``) into a new slot."""
        width = prefill.layers[0].keys.shape[-2]
        lengths = [width - pad for pad in pads]
        first = self.rows
        if self.layers[0].keys is None:
            self.allocate(prefill, max(len(lengths), MIN_ROWS), width)
        self._reserve(first + len(lengths), max([self.width, *lengths]))
        for mine, theirs in zip(self.layers, prefill.layers, strict=True):
            for j, pad in enumerate(pads):
                mine.keys[first + j, :, : width - pad] = theirs.keys[j, :, pad:]
                mine.values[first + j, :, : width - pad] = theirs.values[j, :, pad:]
        self.lengths += lengths

    def remove(self, slots: list[int]) -> list[int]:
        """Free ``slots``; the last rows move into the holes. Returns, for each slot now in use, the slot it
        held before (so the caller can reorder what it keeps per row)."""
        gone = set(slots)
        order = list(range(self.rows))
        holes = sorted(s for s in gone if s < self.rows - len(gone))
        movers = [s for s in range(self.rows - len(gone), self.rows) if s not in gone]
        for hole, mover in zip(holes, movers, strict=True):
            length = self.lengths[mover]
            for layer in self.layers:
                layer.keys[hole, :, :length] = layer.keys[mover, :, :length]
                layer.values[hole, :, :length] = layer.values[mover, :, :length]
            order[hole] = mover
            self.lengths[hole] = length
        keep = self.rows - len(gone)
        self.lengths = self.lengths[:keep]
        if not self.lengths:
            for layer in self.layers:
                layer.keys = layer.values = None
        return order[:keep]

    def _reserve(self, rows: int, columns: int) -> None:
        """Grow the buffers (rows by half, columns by a quarter) when ``rows`` x ``columns`` does not fit."""
        have_rows, have_columns = self.capacity
        if rows <= have_rows and columns <= have_columns:
            return
        new_rows = max(rows, have_rows + have_rows // 2) if rows > have_rows else have_rows
        new_columns = have_columns
        if columns > have_columns:
            new_columns = max(columns, have_columns + have_columns // 4, MIN_COLUMNS)
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                if old is None:
                    continue
                grown = old.new_zeros(new_rows, old.shape[1], new_columns, old.shape[3])
                grown[: self.rows, :, : old.shape[2]] = old[: self.rows]
                setattr(layer, name, grown)

    def allocate(self, like: DynamicCache, rows: int, columns: int) -> None:
        """First buffers, shaped after a prefill's K/V (heads, head dim, dtype, device)."""
        columns = max(columns + columns // 4, MIN_COLUMNS)
        for mine, theirs in zip(self.layers, like.layers, strict=True):
            keys, values = theirs.keys, theirs.values
            mine.keys = keys.new_zeros(rows, keys.shape[1], columns, keys.shape[3])
            mine.values = values.new_zeros(rows, values.shape[1], columns, values.shape[3])
            mine.is_initialized = True
