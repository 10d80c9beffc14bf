"""How raw logits are stored: ``float16`` (default), ``int8``, ``topk`` (see ``store.topk``) or ``sampled``
(``store.sampled``: topk plus K importance-sampled tail classes).

float16 keeps ~3 significant decimal digits; decoding gives exactly ``z.astype(float16)``. Logits are
stored uncompressed: on realistic float16 logits zstd/blosc saved only ~8% of the bytes and cut the read
rate by ~2.5x (measured on Gaussian logits, C = 8142), and reading speed is what every student epoch pays.

int8 halves the bytes again with a per-row (per sample-view) affine code anchored at the row's maximum:

    step = (max - min) / 255            (1 where max == min)
    q    = 127 - round((max - z) / step)        in [-128, 127]
    z^   = max - (127 - q) * step

``logit_affine`` [..., 2] float32 stores (max, step). Anchoring at the max, rather than at the min, makes
the top logit decode exactly, and softmax is invariant to a shift, so the teacher's arg-max and the
distances below it are what matter. The error is |z^ - z| <= step / 2 (plus float32 rounding), i.e. at most
(max - min) / 510. We also tried a square-root companded code (finer steps near the max): it cut
KL(p || p^) at tau = 1 by ~3.6x but raised it ~1.7x at tau = 9, and distillation uses high temperatures,
so the plain affine code stays.

float16 and int8 decode to the logits themselves. ``topk`` and ``sampled`` keep K logits per view and a
summary of the rest (and ``sampled`` K drawn tail classes), and decode to logits that are right for one target
sharpness p / tau at a time, so their readers pass one.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from store import sampled, topk

CODECS = ("float16", "int8", "topk", "sampled")
DENSE = ("float16", "int8")  # codecs that decode to the logits whatever the sharpness
SPARSE = {"topk": topk, "sampled": sampled}  # codecs that keep K logits a view (``topk=K``), by their module
ENCODE_ROWS = 2048  # the sparse codecs encode a shard this many views at a time (float64 work ~130 MB a block
#                     at C = 8142, so ~1 GB with ENCODE_THREADS = 8 blocks at once)
ENCODE_THREADS = min(8, os.cpu_count() or 1)  # blocks encoded at once: a GPU host's cores keep up with its teacher


def check(codec: str) -> str:
    """Return ``codec`` if it is known, else raise ValueError listing the known ones."""
    if codec not in CODECS:
        raise ValueError(f"unknown logit codec {codec!r}; use one of {CODECS}")
    return codec


def name(codec: str, k: int = 0) -> str:
    """The codec as people read it: ``float16``, ``topk K=20``."""
    return f"{codec} K={k}" if codec in SPARSE else codec


def check_k(codec: str, k: int, c: int) -> int:
    """The K of ``codec`` for ``c`` classes: topk and sampled need 1 <= K < C; the dense codecs take no K (0)."""
    if check(codec) in SPARSE:
        return topk.check_k(k, c)
    if k:
        raise ValueError(f"topk={k} applies to codec=topk or sampled only; codec {codec} stores every logit")
    return 0


def stored_arrays(codec: str, c: int, k: int = 0) -> dict[str, tuple[str, int]]:
    """The arrays a codec stores per sample-view: name -> (dtype, last dimension). ``logits`` is the one
    that is read a view at a time (sharded); the others are small side arrays."""
    if check(codec) == "float16":
        return {"logits": ("float16", c)}
    if codec in SPARSE:
        return {"logits": ("uint16", SPARSE[codec].width(k))}
    return {"logits": ("int8", c), "logit_affine": ("float32", 2)}


def row_bytes(codec: str, c: int, k: int = 0) -> int:
    """Bytes of the ``logits`` array per sample-view (int8's 8-byte side array not included)."""
    if check(codec) in SPARSE:
        return SPARSE[codec].row_bytes(k)
    return c * (2 if codec == "float16" else 1)


def encode(z: np.ndarray, codec: str = "float16", k: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Encode float logits [..., C] into the arrays ``stored_arrays(codec, C, k)`` names. ``seed`` seeds the
    draws of codec sampled (the writer passes the shard's index, so a re-dumped shard comes out the same)."""
    z = np.asarray(z, dtype=np.float32)
    lo, hi = (z.min(), z.max()) if z.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN propagates through min/max: one cheap pass
        raise ValueError("teacher logits contain NaN or inf; refusing to store them")
    if check(codec) != "int8" and max(-lo, hi) > np.finfo(np.float16).max:  # the sparse codecs keep float16 too
        raise ValueError(f"teacher logits exceed the float16 range (|z| > 65504) of codec {codec}; use codec=int8")
    if codec == "float16":
        return {"logits": z.astype(np.float16)}
    if codec in SPARSE:
        return {"logits": _encode_sparse(z, codec, k, seed)}
    return _encode_int8(z)


def _encode_sparse(z: np.ndarray, codec: str, k: int, seed: int) -> np.ndarray:
    """Blocks of ``ENCODE_ROWS`` views encoded on ``ENCODE_THREADS`` threads (numpy's sorts and ufuncs release
    the GIL). Each block's draws come from its own generator, seeded by (seed, block), so the bytes do not
    depend on how many threads ran."""
    c = z.shape[-1]
    topk.check_k(k, c)
    flat = z.reshape(-1, c)
    out = np.empty((len(flat), stored_arrays(codec, c, k)["logits"][1]), dtype=np.uint16)

    def block(start: int) -> None:
        rows = flat[start:start + ENCODE_ROWS]
        if codec == "topk":
            out[start:start + len(rows)] = topk.encode(rows, k)
        else:
            rng = np.random.default_rng([seed, start // ENCODE_ROWS, 0x5A3D])
            out[start:start + len(rows)] = sampled.encode(rows, k, rng)

    starts = range(0, len(flat), ENCODE_ROWS)
    if len(starts) > 1 and ENCODE_THREADS > 1:
        with ThreadPoolExecutor(min(ENCODE_THREADS, len(starts))) as pool:
            list(pool.map(block, starts))  # list(): re-raise a block's error here
    else:
        for start in starts:
            block(start)
    return out.reshape(*z.shape[:-1], out.shape[-1])


def _encode_int8(z: np.ndarray) -> dict[str, np.ndarray]:
    top = z.max(axis=-1)
    step = (top - z.min(axis=-1)) / np.float32(255)
    step = np.where(step > 0, step, np.float32(1)).astype(np.float32)
    levels = np.subtract(top[..., None], z)  # in place from here on: a shard is ~17M values
    levels /= step[..., None]
    np.rint(levels, out=levels)
    np.clip(levels, 0, 255, out=levels)
    np.subtract(np.float32(127), levels, out=levels)
    return {"logits": levels.astype(np.int8), "logit_affine": np.stack([top, step], axis=-1)}


def decode(parts: dict[str, np.ndarray], codec: str = "float16", c: int = 0, k: int = 0,
           sharpness: float | None = None) -> np.ndarray:
    """Decode stored arrays back to float32 logits [..., C]. topk and sampled need ``c``, ``k`` and the
    sharpness p / tau of the targets that will be made from the logits (see ``store.topk``)."""
    if check(codec) == "float16":
        return parts["logits"].astype(np.float32)
    if codec in SPARSE:
        if sharpness is None:
            raise ValueError(f"a {codec} store decodes to logits for one target sharpness p / tau; pass "
                             f"sharpness= (LogitStore.open(..., sharpness=power / tau))")
        return SPARSE[codec].decode(parts["logits"], k, c, sharpness)
    affine = parts["logit_affine"]
    top, step = affine[..., 0:1], affine[..., 1:2]
    return top - (np.float32(127) - parts["logits"].astype(np.float32)) * step


def int8_error_bound(parts: dict[str, np.ndarray]) -> np.ndarray:
    """Per-row bound on |decode - z| for int8: step / 2 plus float32 rounding of the decode."""
    top, step = parts["logit_affine"][..., 0], parts["logit_affine"][..., 1]
    rounding = 4 * np.finfo(np.float32).eps * (np.abs(top) + 255 * step)
    return step / 2 + rounding
