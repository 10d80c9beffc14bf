"""Fashion-MNIST made long-tailed like CIFAR-100-LT (IDX files, as Debian's dataset-fashion-mnist ships them)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from .base import DataError, Source, Split, longtail_counts, longtail_subset, require_dir

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
HOW = ("Install it with `apt-get install dataset-fashion-mnist` (make does this for you), "
       "or set DATA_ROOT= to a folder holding train-images-idx3-ubyte.gz and its three siblings.")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
N_MAX = 500
PAD = 2  # 28x28 images are zero-padded to 32x32, the CIFAR ResNet's input size


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array, checking its header against its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read IDX file ({error}). Reinstall the data. {HOW}") from error
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but the file holds {body.size} values")
    return body.reshape(shape)


def _split(root: Path, prefix: str, name: str) -> Split:
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{root}: {prefix} has {len(images)} images but {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise DataError(f"{root}: {prefix} labels go up to {labels.max()}, Fashion-MNIST has 10 classes")
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))[..., None]  # [N, 32, 32, 1]
    return Split(name=name, labels=labels, ids=np.arange(len(labels), dtype=np.int64), images=padded)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"fmnist-lt: {root / (stem + '.gz')} is missing. {HOW}")


def load_full(root: Path | None = None) -> tuple[Split, Split]:
    """The whole balanced Fashion-MNIST: (train, test) splits, images padded to 32x32."""
    root = require_dir(Path(root) if root else DEFAULT_ROOT, "fmnist-lt", HOW)
    return _split(root, "train", "train"), _split(root, "t10k", "test")


def load(root: Path | None = None, imbalance: float = 100) -> Source:
    """Long-tailed Fashion-MNIST: class c keeps its first floor(500 * (1/IF)^(c/9)) training images."""
    root = require_dir(Path(root) if root else DEFAULT_ROOT, "fmnist-lt", HOW)
    train = _split(root, "train", "train")
    counts = longtail_counts(10, N_MAX, imbalance)
    return Source(
        name="fmnist-lt", num_classes=10, train=longtail_subset(train, counts),
        test=_split(root, "t10k", "test"), class_names=CLASSES,
        mean=(0.2860,), std=(0.3530,), info={"imbalance": imbalance, "root": str(root)},
    )
