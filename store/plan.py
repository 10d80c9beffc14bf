"""What a logit store of given sizes will take, before anything is dumped: its layout, the exact bytes of its
chunk files, and what one student epoch reads.

zarr writes every chunk at its full shape, the edge chunks included, and stores them uncompressed here with a
4-byte crc32c after each chunk, so the chunk files' sizes follow from the layout alone:

- a sharded array (``logits``, and the side arrays where ``Layout.side_per_view``) is one file per shard:
  ``shard x V x width`` values, then the shard index, 16 bytes per inner chunk (offset and length) and a
  4-byte crc32c of the index;
- a plain side array (``params``, ``logit_affine``) is otherwise one chunk ``shard x V x width`` per shard;
- ``labels``, ``ids`` (8 bytes a sample) and ``class_counts`` (8 a class) are one chunk each.

The exception is a chunk whose values all equal the fill value 0: zarr does not write it (all-zero labels do
that). The JSON metadata (a few KiB) is estimated, not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store import codecs
from store.schema import CHECKSUM_BYTES, Layout

INDEX_ENTRY = 16  # bytes per inner chunk in a shard index (uint64 offset, uint64 length)
INDEX_CHECKSUM = 4  # crc32c of the shard index
METADATA_ESTIMATE = 6 << 10  # zarr.json files, done markers, COMPLETE.json: about 6 KiB at any size


@dataclass(frozen=True)
class StorePlan:
    """A store's layout, the bytes of each array's chunk files, and one student epoch's reads."""

    layout: Layout
    array_bytes: dict[str, int]
    epoch_read_bytes: int

    @property
    def chunk_bytes(self) -> int:
        """Bytes of every chunk file (what a dump writes, but for the JSON metadata)."""
        return sum(self.array_bytes.values())

    @property
    def total_bytes(self) -> int:
        return self.chunk_bytes + METADATA_ESTIMATE

    def bytes_per_view(self) -> float:
        """Stored bytes per (sample, view), every array included."""
        return self.chunk_bytes / (self.layout.n * self.layout.v)


def plan_store(n: int, v: int, c: int, codec: str, k: int = 0, p: int = 8, chunk: int | None = None,
               shard: int | None = None) -> StorePlan:
    """The plan of a store of ``n`` samples, ``v`` views and ``c`` classes in ``codec`` (``k`` for topk)."""
    layout = Layout.choose(n, v, c, p, codec, chunk, shard, k)
    rows = layout.n_shards * layout.shard  # the edge shard is stored at full size
    inner = layout.shard // layout.chunk * layout.v  # inner chunks per shard
    sizes, epoch = {}, 0
    arrays = dict(codecs.stored_arrays(codec, c, layout.k))
    arrays["params"] = ("float32", p)
    for name, (dtype, width) in arrays.items():
        item = np.dtype(dtype).itemsize
        if layout.per_view(name):
            index = inner * INDEX_ENTRY + INDEX_CHECKSUM
            chunks = layout.n_shards * inner
            sizes[name] = rows * v * width * item + chunks * CHECKSUM_BYTES + layout.n_shards * index
            # an epoch reads one view of every chunk, and each read fetches its shard's index first
            epoch += rows * width * item + (rows // layout.chunk) * (CHECKSUM_BYTES + index)
        else:
            sizes[name] = rows * v * width * item + layout.n_shards * CHECKSUM_BYTES
            epoch += sizes[name]  # the side arrays are read whole, all V views of a chunk at once
    sizes["labels"] = sizes["ids"] = 8 * n + CHECKSUM_BYTES
    sizes["class_counts"] = 8 * c + CHECKSUM_BYTES
    return StorePlan(layout, sizes, epoch)
