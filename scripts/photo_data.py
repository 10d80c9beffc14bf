"""Data written from the real photos of Debian's opencv-doc and libjxl-testdata, for the rehearsal, the loader
benchmark and the GPU check: the photos, varied JPEG encodings of crops, and a small ImageNet-LT tree."""
from __future__ import annotations

import glob
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_GLOBS = ("/usr/share/doc/opencv-doc/examples/data/*.jpg",
               "/usr/share/libjxl-testdata/jxl/flower/flower_cropped.jpg",
               "/usr/share/libjxl-testdata/jxl/flower/flower.png.im_q85_420.jpg")
PHOTOS_ENV = "DIVE_PHOTOS"  # a folder of copies of those photos, where Debian's packages are not installed


def photo_files(patterns=PHOTO_GLOBS) -> list[str]:
    """The photo files: Debian's, and the ``*.jpg`` of the folder named by $DIVE_PHOTOS (the GPU bundle's)."""
    extra = os.environ.get(PHOTOS_ENV)
    found = {f for pattern in patterns for f in glob.glob(pattern)}
    if extra:
        found |= set(glob.glob(os.path.join(extra, "*.jpg")))
    return sorted(found)


def photos() -> list[np.ndarray]:
    """The colour photos of Debian's opencv-doc and libjxl-testdata, decoded once."""
    files = photo_files()
    images = []
    for path in files:
        with Image.open(path) as image:
            if image.mode == "RGB" and min(image.size) >= 128:
                images.append(np.asarray(image))
    if len(images) < 8:
        sys.exit("this needs Debian's opencv-doc and libjxl-testdata: apt-get install opencv-doc "
                 "libjxl-testdata (the make targets that use them install them)")
    return images


def encode(pixels: np.ndarray, rng: np.random.Generator) -> bytes:
    """A JPEG of the crop, encoded in one of several ways."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=int(rng.integers(40, 96)),
                                 subsampling=int(rng.integers(0, 3)), progressive=bool(rng.integers(0, 2)),
                                 optimize=bool(rng.integers(0, 2)))
    return out.getvalue()


def write_jpeg_tree(root: Path, images: int, side: int, classes: int = 10, test: int = 20) -> Path:
    """An ImageNet-LT-format tree (``ImageNet_LT_{train,test}.txt`` and ``<split>/n<label>/*.JPEG``) of
    square ``side`` px crops of the real photos, labels cycling over ``classes``; returns ``root``."""
    pictures = photos()
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for split, count in (("train", images), ("test", test)):
        for i in range(count):
            label = i % classes
            photo = pictures[i % len(pictures)]
            h, w = photo.shape[:2]
            crop = min(h, w, side)
            y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            rel = f"{split}/n{label:08d}/{split}_{i:05d}.JPEG"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encode(np.ascontiguousarray(photo[y0:y0 + crop, x0:x0 + crop]), rng))
            lines[split].append(f"{rel} {label}")
    for split, rows in lines.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(rows) + "\n")
    return root
