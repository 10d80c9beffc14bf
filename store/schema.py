"""Layout of the logit store: one zarr v3 group holding the teacher's raw logits and each view's parameters.

Arrays (N samples, V views per sample, C classes, P view parameters):

    logits        [N, V, C]  float16, or int8 with ``logit_affine`` [N, V, 2] float32, or
                  [N, V, 2K + 10] uint16 records of codec topk (see ``store.codecs``, ``store.topk``)
    params        [N, V, P]  float32: x0, y0, w, h, flip, brightness, contrast, saturation
    labels        [N]        int64
    ids           [N]        int64   (the dataset's id of each stored row)
    class_counts  [C]        int64

Group attributes: ``format_version``, ``codec``, ``layout``, ``versions``, ``recipe``, ``view_spec``,
``fingerprints`` and any other key the cache stage passes.

Every chunk of every array ends in a crc32c of its bytes (zarr v3's ``crc32c`` codec; a shard's index has one
too), so a flipped bit on disk or in transit is caught where it is read: ``store.reader`` turns zarr's
checksum error into ``DamagedChunk``, which names the array, the chunk, its sample rows and view. Measured on
2 cores (``make bench-cache``), see the README for the cost.

Progress and completion live in plain files beside the zarr metadata, never in zarr attributes: zarr does
no locking and rewrites a whole ``zarr.json`` to change one attribute, so concurrent ranks would race and
a crash could leave the metadata torn. Instead each finished shard gets its own marker ``done/<k>.json``
(one writer per file, so ranks never collide), and ``COMPLETE.json`` is written last, through a temporary
file and a rename, once every shard is done. A file is also what Make can see.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from store import codecs
from store.location import location, zarr_store
from store.manifest import ArtifactError, jsonable

FORMAT_VERSION = 2  # 2: crc32c on every chunk (1: no checksums)
CHECKSUM_BYTES = 4  # the crc32c appended to each stored chunk
COMPLETE = "COMPLETE.json"
DONE_DIR = "done"
PARAM_NAMES = ("x0", "y0", "w", "h", "flip", "brightness", "contrast", "saturation")
META_ARRAYS = ("labels", "ids", "class_counts")
RESERVED_ATTRS = ("format_version", "codec", "layout", "versions")
REQUIRED_ATTRS = ("recipe", "view_spec", "fingerprints")

# Chunking. Students read ONE view of EVERY sample per epoch, so a logits inner chunk holds one view of a
# run of samples, (chunk, 1, C): an epoch then reads exactly 1/V of the logits and every byte it reads is
# used. Each zarr read costs ~1 ms of Python however small it is (and a sharded chunk costs two reads: the
# shard index, then the chunk), so chunks must be big enough to amortise that: ~4 MiB per inner chunk, 256
# samples at iNaturalist (C = 8142, float16 rows of 16 KB). Measured on 2 cores, 256-sample chunks
# streamed at ~33k samples/s against ~28k for 128, and a window of 4 such chunks is the shuffle unit.
# A logits shard is all V views of one chunk's samples, (chunk, V, C): the cache stage computes the V views
# of a run of samples together, so the writer always writes whole shards (no read-modify-write, no two
# ranks in one file), and a shard is also the unit of resume. One chunk per shard (multiple 1): the shard
# is already V x 4 MiB (33 MB at V = 8); a bigger one would only cost writer memory and coarser resume.
# MAX_SHARD_BYTES bounds a shard when V is large (V = 200 views of C = 8142 would otherwise be 800 MB), and
# MAX_CHUNK_SAMPLES keeps small-C stores (C = 10: 20-byte rows) in several chunks, so the epoch order
# still shuffles chunks and several ranks get shards to write.
# The small side arrays (params, logit_affine: 8 and 2 floats per view) are not sharded where their bytes are
# negligible next to the logits: one plain chunk per writer shard, (shard, V, width), holds all views of a
# shard's samples (64 KB at iNaturalist). Reading all V views costs more bytes than one, but it is one read
# instead of the two of a shard (measured 0.54 against 1.1 ms). Where reading all V views of them would cost
# more bytes than the one view of logits they serve (V * side > logits row: many views, few classes, or codec
# topk), they are sharded like the logits instead (``side_per_view``): at iNaturalist, V = 90 and topk K = 100,
# all views of the params were 1.2 of a student epoch's 1.3 GiB of reads.
CHUNK_TARGET_BYTES = 4 << 20
MAX_SHARD_BYTES = 64 << 20
MAX_CHUNK_SAMPLES = 256

@dataclass(frozen=True)
class Layout:
    """Shape, codec and chunking of a store; recorded in the ``layout`` attribute."""

    n: int
    v: int
    c: int
    p: int
    codec: str
    chunk: int
    shard: int
    k: int = 0  # logits kept per view by codec topk (0 for the dense codecs; absent from older stores)
    side_per_view: bool = False  # side arrays chunked a view at a time like the logits (see above)

    @classmethod
    def choose(cls, n: int, v: int, c: int, p: int, codec: str, chunk: int | None = None,
               shard: int | None = None, k: int = 0) -> "Layout":
        """The default layout for these sizes (see the chunking comment above), or the one given."""
        for name, value in (("n", n), ("v", v), ("c", c), ("p", p)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        k = codecs.check_k(codec, k, c)
        row = codecs.row_bytes(codec, c, k)
        if chunk is None:
            fit = min(CHUNK_TARGET_BYTES // row, MAX_SHARD_BYTES // (row * v), MAX_CHUNK_SAMPLES)
            chunk = 1 << max(0, int(fit).bit_length() - 1)  # largest power of two <= fit
        shard = chunk if shard is None else shard
        if chunk < 1 or shard % chunk:
            raise ValueError(f"shard ({shard}) must be a positive multiple of chunk ({chunk})")
        stored = codecs.stored_arrays(codec, c, k)
        side = 4 * p + sum(np.dtype(dtype).itemsize * width for name, (dtype, width) in stored.items()
                           if name != "logits")
        return cls(int(n), int(v), int(c), int(p), codec, int(chunk), int(shard), k, bool(v * side > row))

    def per_view(self, name: str) -> bool:
        """Whether array ``name`` is sharded and chunked a view at a time (else one chunk per shard)."""
        return name == "logits" or self.side_per_view

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard)

    def shard_range(self, k: int) -> tuple[int, int]:
        """Sample rows [start, stop) of shard ``k``."""
        if not 0 <= k < self.n_shards:
            raise IndexError(f"shard {k} out of range 0..{self.n_shards - 1}")
        return k * self.shard, min(self.n, (k + 1) * self.shard)

    def to_dict(self) -> dict:
        return asdict(self)


def user_attrs(attrs: dict) -> dict:
    """Check the caller's attributes (recipe, view_spec, fingerprints, extras) and normalise them."""
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise ValueError(f"store attributes need {missing}")
    clash = [key for key in RESERVED_ATTRS if key in attrs]
    if clash:
        raise ValueError(f"attributes {clash} are set by the store itself")
    if not isinstance(attrs["fingerprints"], dict):
        raise ValueError("attrs['fingerprints'] must be a dict of name -> sha256")
    return jsonable(attrs)


def create_arrays(group: zarr.Group, layout: Layout, labels: np.ndarray, ids: np.ndarray,
                  class_counts: np.ndarray, checksums: bool = True) -> None:
    """Create the data arrays (empty) and write the small per-sample and per-class arrays. ``checksums``
    False (no crc32c) exists only so that ``make bench-cache`` can measure what the checksums cost."""
    crc = [Crc32cCodec()] if checksums else None
    for name, (dtype, width) in data_arrays(layout).items():
        shape = (layout.n, layout.v, width)
        if layout.per_view(name):
            group.create_array(name, shape=shape, dtype=dtype, chunks=(layout.chunk, 1, width),
                               shards=(layout.shard, layout.v, width), compressors=crc, fill_value=0)
        else:
            group.create_array(name, shape=shape, dtype=dtype, chunks=(layout.shard, layout.v, width),
                               compressors=crc, fill_value=0)
    for name, data, size in (("labels", labels, layout.n), ("ids", ids, layout.n),
                             ("class_counts", class_counts, layout.c)):
        data = np.asarray(data)
        if data.shape != (size,) or not np.issubdtype(data.dtype, np.integer):
            raise ValueError(f"{name} must be integers of shape ({size},), got {data.dtype} {data.shape}")
        group.create_array(name, data=data.astype(np.int64), chunks=(size,), compressors=crc)


def data_arrays(layout: Layout) -> dict[str, tuple[str, int]]:
    """The per-sample-view arrays: name -> (dtype, last dimension)."""
    arrays = dict(codecs.stored_arrays(layout.codec, layout.c, layout.k))
    arrays["params"] = ("float32", layout.p)
    return arrays


def open_attrs(path) -> dict:
    """The group attributes of the store at ``path`` (a folder or a URL), or ArtifactError if there is none."""
    path = location(path)
    if not (path / "zarr.json").is_file():
        raise ArtifactError(f"no logit store at {path}. Run the cache stage (`make cache`) to make it.")
    return dict(zarr.open_group(zarr_store(path, read_only=True), mode="r").attrs)


def check_format(path: str | Path, attrs: dict) -> None:
    """Refuse a store written in another format version."""
    found = attrs.get("format_version")
    if found == 1:
        raise ArtifactError(
            f"{path} is a logit store of format version 1, which has no chunk checksums; this code reads version "
            f"{FORMAT_VERSION} only. Rebuild it: delete the cache folder and run `make cache` (or `dive cache`) "
            f"again, or read it with a dive version from before checksums.")
    if found != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} is a logit store of format version {found}, this code reads version {FORMAT_VERSION}. "
            f"Re-dump the cache with this code (`make cache`), or use the dive version that wrote it.")


def is_complete(path) -> bool:
    return (location(path) / COMPLETE).is_file()


def done_path(path, k: int):
    return location(path) / DONE_DIR / f"{k}.json"


def done_shards(path: str | Path) -> set[int]:
    """Shards whose done marker exists (temporary files of an interrupted marker write are ignored)."""
    folder = location(path) / DONE_DIR
    if not folder.is_dir():
        return set()
    return {int(name[:-5]) for name in (entry.name for entry in folder.iterdir())
            if name.endswith(".json") and name[:-5].isdigit()}
