"""glyph-lt: the first C characters of GB2312 level 1, rendered in Debian's CJK typefaces, long-tailed.

Many classes that share parts (土 士, 未 末, 己 已 巳, 日 曰, 千 干 于, 大 太 犬 differ by a stroke), which is
what DiVE's virtual examples need, and it runs on a CPU: 32 x 32 grey images like Fashion-MNIST.

- Train counts: n_c = floor(n_max (1/IF)^(r_c / (C - 1))) by rank r_c, ranks over a class order shuffled by a
  fixed seed, so that look-alike characters are not all head or all tail. Test: TEST_PER_CLASS a class.
- Each sample is rendered from its own seed (split, class, k): train and test seeds never meet.
- The set is rendered once into ``glyph-lt-c<C>-if<IF>-...npz`` under the data root (default
  ``~/.cache/dive/glyph-lt``, or DATA_ROOT=), beside ``<file>.sha256``, its fingerprint. Reading it needs no
  fonts; a file whose bytes do not match its fingerprint is refused. What could differ on another machine
  (FreeType and Pillow versions, the font files) is recorded in the file and its fingerprint tells sets apart.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from store.manifest import sha256_file

from . import glyph_render as render
from .base import DataError, Source, Split, longtail_counts

DEFAULT_CLASSES = 300
N_MAX = 150  # over 100, so that Many (over 100 train images) holds classes
TEST_PER_CLASS = 20
ORDER_SEED = 0x474C5950  # shuffles which character gets which rank of the tail
FORMAT = 2  # bump when rendering changes: old files are then rendered anew, not reused (2: wider ranges)
_SPLIT_CODES = {"train": 0, "test": 1}
# Figures' default classes: 巴 and characters built on it, which the default set spreads over all three groups
# (巴 115 and 靶 102 train images, 耙 79 and 把 67, 吧 13 and 叭 1): the look-alikes DiVE should help most.
SHOWCASE = "巴靶耙把吧叭"
MEAN, STD = (0.2843,), (0.2932,)  # normalization, on [0, 1]: the format-1 set's statistics (format 2's: 0.283, 0.262)


def default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dive" / "glyph-lt"


def check_settings(classes: int, imbalance: float) -> None:
    if not 2 <= classes <= render.LEVEL1:
        raise DataError(f"glyph-lt: classes={classes} is out of range: 2 to {render.LEVEL1} (GB2312 level 1)")
    if not 1 <= imbalance <= N_MAX:
        raise DataError(f"glyph-lt: imbalance={imbalance:g} is out of range: 1 to {N_MAX}, so that the rarest "
                        f"class keeps at least one of the {N_MAX} images of the most common")


def train_counts(classes: int, imbalance: float) -> np.ndarray:
    """Train images of each class (in character order): the long tail's counts over a shuffled rank order."""
    ranks = np.random.default_rng(ORDER_SEED).permutation(classes)
    return longtail_counts(classes, N_MAX, imbalance)[ranks]


def file_name(classes: int, imbalance: float) -> str:
    return f"glyph-lt-c{classes}-if{imbalance:g}-n{N_MAX}-t{TEST_PER_CLASS}-f{FORMAT}.npz"


def render_split(chars: str, covering: np.ndarray, counts: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 32, 32, 1] and labels of ``counts[c]`` samples of each class, class by class."""
    labels = np.repeat(np.arange(len(chars)), counts).astype(np.int64)
    k = np.concatenate([np.arange(n) for n in counts]) if len(labels) else np.zeros(0, np.int64)
    images = np.stack([render.render(chars[c], covering[c], (FORMAT, _SPLIT_CODES[split], int(c), int(i)))
                       for c, i in zip(labels, k)])
    return images[..., None], labels


def build(path: Path, classes: int, imbalance: float, log=print) -> None:
    """Render the set into ``path`` (atomically) and write its fingerprint beside it, last."""
    render.check_fonts()
    chars = render.gb2312_level1(classes)
    covering = render.coverage(chars)
    if not covering.any(axis=1).all():
        bad = "".join(c for c, row in zip(chars, covering) if not row.any())
        raise DataError(f"glyph-lt: no installed font has {bad!r}")
    counts = train_counts(classes, imbalance)
    log(f"glyph-lt: rendering {int(counts.sum()):,} train and {classes * TEST_PER_CLASS:,} test images of "
        f"{classes} characters in {len(render.STYLES)} styles into {path}")
    train_x, train_y = render_split(chars, covering, counts, "train")
    test_x, test_y = render_split(chars, covering, np.full(classes, TEST_PER_CLASS), "test")
    meta = {"classes": classes, "imbalance": imbalance, "n_max": N_MAX, "test_per_class": TEST_PER_CLASS,
            "format": FORMAT, "order_seed": ORDER_SEED, "styles": [s.name for s in render.STYLES],
            "fonts": render.font_digests(), "styles_per_class": covering.sum(1).tolist(), **render.versions()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y,
                 chars=np.array(list(chars)), meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    fingerprint_path(path).write_text(sha256_file(path) + "\n")


def fingerprint_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read(path: Path) -> dict:
    """The arrays of a rendered set, refused (DataError) unless its bytes match the fingerprint beside it."""
    recorded = fingerprint_path(path)
    if not recorded.is_file():
        raise DataError(f"glyph-lt: {path} has no fingerprint ({recorded.name}): its rendering was interrupted. "
                        f"Delete {path} to render it again.")
    expected, found = recorded.read_text().strip(), sha256_file(path)
    if found != expected:
        raise DataError(f"glyph-lt: {path} does not match its fingerprint (sha256 {found[:12]}..., recorded "
                        f"{expected[:12]}...): the file was changed or damaged. Delete it and {recorded.name} "
                        f"to render it again.")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load(root: Path | None = None, imbalance: float = 100, classes: int = 0, log=print) -> Source:
    """glyph-lt with ``classes`` characters (0: DEFAULT_CLASSES) at imbalance factor ``imbalance``, rendered
    into ``root`` the first time."""
    classes = classes or DEFAULT_CLASSES
    check_settings(classes, imbalance)
    path = Path(root or default_root()) / file_name(classes, imbalance)
    if not path.is_file():
        build(path, classes, imbalance, log)
    data = read(path)
    meta = json.loads(str(data["meta"]))
    chars = "".join(data["chars"].tolist())
    train = Split("train", data["train_labels"], np.arange(len(data["train_labels"]), dtype=np.int64),
                  images=data["train_images"])
    test = Split("test", data["test_labels"], np.arange(len(data["test_labels"]), dtype=np.int64),
                 images=data["test_images"])
    digest = fingerprint_path(path).read_text().strip()
    meta["showcase"] = [chars.index(ch) for ch in SHOWCASE if ch in chars]
    return Source(name="glyph-lt", num_classes=classes, train=train, test=test, class_names=tuple(chars),
                  mean=MEAN, std=STD, info={"imbalance": imbalance, "root": str(path.parent), "file": str(path),
                                            "sha256": digest, **meta}, content=digest)
