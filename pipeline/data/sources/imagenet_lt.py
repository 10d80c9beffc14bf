"""ImageNet-LT (Liu et al., OLTR, 2019): ImageNet-2012 JPEGs listed by the fixed ImageNet_LT_*.txt splits."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataError, Source, Split, require_dir

DEFAULT_ROOT = Path("data/imagenet")
SUBFOLDER = "ImageNet_LT"  # where the OLTR release puts the split files, if not in the root itself
HOW = ("Set DATA_ROOT= to the ImageNet-2012 (ILSVRC) image root, the folder the paths in the split files "
       "are relative to (it holds train/ and val/). Put ImageNet_LT_train.txt, ImageNet_LT_val.txt and "
       "ImageNet_LT_test.txt (from the OLTR release, github.com/zhmiao/OpenLongTailRecognition-OLTR) in "
       "DATA_ROOT or in DATA_ROOT/ImageNet_LT.")
NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def find_split_file(root: Path, split: str) -> Path:
    """``ImageNet_LT_<split>.txt`` from ``root``, else from ``root/ImageNet_LT``."""
    name = f"ImageNet_LT_{split}.txt"
    for candidate in (root / name, root / SUBFOLDER / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"imagenet-lt: {name} is in neither {root} nor {root / SUBFOLDER}. {HOW}")


def parse_line(line: str, path: Path, number: int) -> tuple[str, int]:
    """One ``relative/path.JPEG label`` line; a malformed line is an error naming file and line."""
    fields = line.split()
    label = _integer(fields[1]) if len(fields) == 2 else None
    if len(fields) != 2:
        problem = f"expected 2 fields (path and label), found {len(fields)}"
    elif label is None:
        problem = f"label {fields[1]!r} is not an integer"
    elif not 0 <= label < NUM_CLASSES:
        problem = f"label {label} is outside 0..{NUM_CLASSES - 1}"
    else:
        return fields[0], label
    raise DataError(f"{path}, line {number}: {problem}: {line.rstrip()!r}. "
                    f"Each line must read `relative/path.JPEG label`; fix or re-download the split file.")


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def read_listing(path: Path) -> list[tuple[str, int]]:
    """All (relative path, label) pairs of a split file, in file order; blank lines are skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the split file ({error}). {HOW}") from error
    entries = [parse_line(line, path, i) for i, line in enumerate(lines, start=1) if line.strip()]
    if not entries:
        raise DataError(f"{path}: the split file lists no images. {HOW}")
    return entries


def check_first_file(split: Split, listing: Path, root: Path, how: str) -> None:
    """Opening 100k images up front is too slow, but a wrong image root shows on the first one."""
    first = Path(split.files[0])
    if not first.is_file():
        raise DataError(f"{first} (first image listed in {listing}) does not exist; is {root} the image "
                        f"root the paths in {listing.name} are relative to? {how}")


def read_split(root: Path, split: str, name: str) -> Split:
    """One split file as a file-backed split with absolute image paths under ``root``."""
    listing = find_split_file(root, split)
    entries = read_listing(listing)
    split_ = Split(
        name=name,
        labels=np.array([label for _, label in entries], dtype=np.int64),
        ids=np.arange(len(entries), dtype=np.int64),
        files=tuple(str(root / rel) for rel, _ in entries),
        root=str(root),
    )
    check_first_file(split_, listing, root, HOW)
    return split_


def load(root: Path | None = None, imbalance: float = 100) -> Source:
    """ImageNet-LT's fixed split: train from ImageNet_LT_train.txt, test from ImageNet_LT_test.txt.

    The split files are looked up in ``root`` first, then in ``root/ImageNet_LT``; image paths in them
    are relative to ``root``.
    ``imbalance`` is ignored; the split's own long tail (1280 to 5 images per class) is the only one.
    """
    del imbalance
    root = require_dir(Path(root) if root else DEFAULT_ROOT, "imagenet-lt", HOW).absolute()
    return Source(
        name="imagenet-lt", num_classes=NUM_CLASSES, train=read_split(root, "train", "train"),
        test=read_split(root, "test", "test"), mean=MEAN, std=STD,
        info={"root": str(root), "val_list": _val_listing(root)},
    )


def _val_listing(root: Path) -> str | None:
    """The validation list is optional (Source has no val split) but, when present, must parse."""
    try:
        listing = find_split_file(root, "val")
    except DataError:
        return None
    read_listing(listing)
    return str(listing)
