"""What every dataset source gives: sample lists, labels, class counts and frequency groups."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.manifest import sha256_arrays

# Class groups by number of training images, as in OLTR / DiVE.
MANY_ABOVE = 100  # Many: more than 100 training images
FEW_BELOW = 20  # Few: fewer than 20; Medium: 20..100
GROUPS = ("many", "medium", "few")


class DataError(RuntimeError):
    """Dataset files are missing or malformed. The message names the file and says what to do."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset, either held in memory (``images``) or as image files (``files``).

    ``ids`` are the samples' indices in the split's original file order, so a long-tailed subset
    still says which original samples it kept.
    """

    name: str
    labels: np.ndarray  # int64 [N]
    ids: np.ndarray  # int64 [N]
    images: np.ndarray | None = None  # uint8 [N, H, W, C]
    files: tuple[str, ...] | None = None  # image paths, absolute
    root: str = ""  # the data root ``files`` sit under; fingerprints use paths relative to it

    def __post_init__(self) -> None:
        if (self.images is None) == (self.files is None):
            raise ValueError("a split holds either images in memory or image files, not both or neither")
        n = len(self.labels)
        size = len(self.images) if self.images is not None else len(self.files)
        if size != n or len(self.ids) != n:
            raise ValueError(f"split {self.name}: {size} samples, {n} labels, {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, index: np.ndarray) -> "Split":
        """The samples at ``index``, keeping their original ids."""
        index = np.asarray(index, dtype=np.int64)
        return Split(
            name=self.name,
            labels=self.labels[index],
            ids=self.ids[index],
            images=None if self.images is None else self.images[index],
            files=None if self.files is None else tuple(self.files[i] for i in index),
            root=self.root,
        )

    def relative_files(self) -> tuple[str, ...]:
        """File paths relative to the data root, so a dataset moved or mounted elsewhere keeps its identity."""
        if not self.files:
            return ()
        return tuple(os.path.relpath(f, self.root) if self.root else f for f in self.files)

    def fingerprint(self) -> str:
        """sha256 of the sample list: ids, labels and relative file names (not the pixels of in-memory data)."""
        return sha256_arrays(self.ids, self.labels, strings=self.relative_files())


@dataclass(frozen=True)
class Source:
    """A dataset as the stages see it: a training split, a test split, and its class structure."""

    name: str
    num_classes: int
    train: Split
    test: Split
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    info: dict = field(default_factory=dict)
    content: str = ""  # sha256 of a rendered dataset's file (glyph-lt); empty for datasets read from files

    @property
    def in_channels(self) -> int:
        """Channels of the images a model sees: the stored channels in memory, RGB for decoded files."""
        return self.train.images.shape[-1] if self.train.in_memory else 3

    @property
    def class_counts(self) -> np.ndarray:
        """Training images per class, int64 [C]."""
        return np.bincount(self.train.labels, minlength=self.num_classes).astype(np.int64)

    def groups(self) -> dict[str, np.ndarray]:
        """Boolean class masks for the Many / Medium / Few groups."""
        return class_groups(self.class_counts)

    def fingerprint(self) -> str:
        """Fingerprint of the training sample list and class count, which a cache is bound to; for a rendered
        dataset also its pixels' digest (``content``), since another machine may render other pixels."""
        content = [self.content] if self.content else []  # empty: the fingerprints made before it stay valid
        return sha256_arrays(np.array([self.num_classes]), self.train.ids, self.train.labels,
                             strings=(self.name, *self.train.relative_files(), *content))


def class_groups(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Many (>100), Medium (20..100) and Few (<20) class masks from training counts."""
    counts = np.asarray(counts)
    return {
        "many": counts > MANY_ABOVE,
        "medium": (counts >= FEW_BELOW) & (counts <= MANY_ABOVE),
        "few": counts < FEW_BELOW,
    }


def longtail_counts(num_classes: int, n_max: int, imbalance: float) -> np.ndarray:
    """CIFAR-LT class sizes: class c keeps floor(n_max * (1/IF)^(c/(C-1))) images."""
    if imbalance < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance}")
    c = np.arange(num_classes)
    return np.array([math.floor(n_max * (1.0 / imbalance) ** (k / (num_classes - 1))) for k in c],
                    dtype=np.int64)


def longtail_subset(split: Split, counts: np.ndarray, shuffle_seed: int | None = None) -> Split:
    """Keep ``counts[c]`` images of each class c: the first ones in file order, or, with ``shuffle_seed``, the
    ones the LDAM / BBN code keeps (numpy's legacy generator seeded once, then class by class in class order a
    shuffle of that class's indices, the first n_c kept), which is the split the papers' CIFAR-LT numbers use.
    The kept images stay in file order."""
    legacy = np.random.RandomState(shuffle_seed) if shuffle_seed is not None else None  # = np.random.seed()
    keep = []
    for c, n in enumerate(counts):
        where = np.flatnonzero(split.labels == c)
        if len(where) < n:
            raise DataError(f"class {c} of {split.name} has {len(where)} images, the long tail needs {n}")
        if legacy is not None:
            legacy.shuffle(where)
        keep.append(where[:n])
    return split.subset(np.sort(np.concatenate(keep)))


def require_dir(root: Path, dataset: str, how: str) -> Path:
    """Return ``root`` if it is a directory, else raise a DataError that says how to get the data."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} for {dataset} does not exist. {how}")
    return root


def require_file(path: Path, dataset: str, how: str) -> Path:
    """Return ``path`` if it is a file, else raise a DataError that says how to get it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{dataset}: {path} is missing. {how}")
    return path
