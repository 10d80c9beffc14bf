"""Image-file datasets through the real stages: an ImageNet-LT-format tree of JPEGs, decoded by DALI.

A bad image met by the cache stage stops it with an error naming the file; the shards already written stay
intact, and once the file is fixed a rerun finishes only what was missing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from PIL import Image

from pipeline.data.targets import row_order

from .conftest import REPO, run_cli

N, CLASSES = 300, 3
TINY = ["--set", "model=resnet32", "--set", "crop_size=32", "--set", "resize=36", "--set", "batch_size=50",
        "--set", "epochs=1", "--set", "warmup_epochs=0", "--set", "workers=1",
        "--set", "lr=0.01"]


def write_imagenet_lt(root):
    """A small ImageNet-LT tree: JPEGs of several sizes and the three split files."""
    rng = np.random.default_rng(0)
    lines = {"train": [], "val": [], "test": []}
    for split, count in (("train", N), ("val", 6), ("test", 30)):
        for i in range(count):
            label = int(rng.integers(0, CLASSES)) if split == "train" else i % CLASSES
            rel = f"{split}/n{label:08d}/img_{i:04d}.JPEG"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
            base = np.zeros((h, w, 3), dtype=np.uint8) + np.array([80 * label, 60, 255 - 80 * label], dtype=np.uint8)
            pixels = (base + rng.integers(0, 40, (h, w, 3))).astype(np.uint8)
            Image.fromarray(pixels).save(root / rel, quality=90)
            lines[split].append(f"{rel} {label}")
    for split, rows in lines.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(rows) + "\n")
    return lines


def test_imagenet_lt_files_train_cache_and_name_a_bad_image(tmp_path):
    data = tmp_path / "imagenet"
    lines = write_imagenet_lt(data)
    teacher, cache = tmp_path / "teacher", tmp_path / "cache"
    run_cli("teacher", "--dataset", "imagenet-lt", "--data-root", str(data), *TINY, "--out", str(teacher))
    # damage an image stored in the second shard (store rows 256..299): a truncated JPEG
    bad = data / lines["train"][int(row_order(N, 1)[280])].split()[0]
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])
    args = ["cache", "--teacher", str(teacher), "--set", "views=2", "--data-root", str(data), "--out", str(cache)]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr
    assert (cache / "logits.zarr" / "done" / "0.json").is_file()  # the first shard was written and kept
    assert not (cache / "manifest.json").exists()
    first = zarr.open_group(str(cache / "logits.zarr"), mode="r")["logits"][:256]
    bad.write_bytes(good_bytes)
    proc = run_cli(*args)
    assert "resuming" in proc.stdout
    store = zarr.open_group(str(cache / "logits.zarr"), mode="r")
    assert np.array_equal(store["logits"][:256], first)
    assert np.isfinite(store["logits"][:].astype(np.float32)).all()


def test_missing_image_is_named(tmp_path):
    data = tmp_path / "imagenet"
    lines = write_imagenet_lt(data)
    missing = data / lines["train"][5].split()[0]
    missing.unlink()
    proc = run_cli("teacher", "--dataset", "imagenet-lt", "--data-root", str(data), *TINY,
                   "--out", str(tmp_path / "t"), check=False)
    assert proc.returncode == 2 and str(missing) in proc.stderr


def test_the_rehearsals_dataset_is_read_by_the_inat2018_reader(tmp_path):
    """make rehearsal's writer at 60 classes: iNat2018's layout and files, counts 16 down to 2, 3 val images a
    class, listed out of class order, real-photo crops that decode."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from rehearsal import train_counts, write_dataset

    from pipeline.data.sources import load_source

    counts = write_dataset(tmp_path, classes=60, workers=1)
    source = load_source("inat2018", tmp_path)
    assert source.num_classes == 60 and counts["train"] == len(source.train) and len(source.test) == 180
    assert source.class_counts.tolist() == train_counts(60).tolist()
    assert source.class_counts[0] == 16 and source.class_counts[-1] == 2
    assert np.bincount(source.test.labels).tolist() == [3] * 60
    assert not np.all(np.diff(source.train.labels) >= 0)  # not sorted by class
    first = Path(source.train.files[0])
    assert first.parts[-4] == "train_val2018" and first.parts[-2] == str(source.train.labels[0])
    with Image.open(first) as image:
        assert image.format == "JPEG" and 36 <= min(image.size) <= 64
