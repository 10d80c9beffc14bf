"""A scale rehearsal at iNaturalist 2018's class count: ``make rehearsal``.

1. Writes an iNaturalist-2018-format dataset with the real 8,142 classes: ``train_val2018/<supercategory>/<id>/
   <file>.jpg`` and COCO-style ``train2018.json`` / ``val2018.json``, images listed in shuffled (not class)
   order. Images are small crops of real photos from Debian's opencv-doc and libjxl-testdata, JPEG-encoded in
   varied ways (quality, chroma subsampling, baseline or progressive, size). Train counts fall from 16 to 2
   (n_c = floor(16 (2/16)^(c/(C-1))), 54,7xx images); val has 3 images a class (24,426), as iNat2018's does.
2. Runs ``teacher cache student inspect report shift-eval`` on it through the CLI, with the real inat2018
   reader and DALI decoding, a ResNet-32 at 32 px, one epoch and V = 2.
3. Prints and writes (``OUT/rehearsal.md``) a table: per stage, wall time, images/s, peak RSS and the disk
   it wrote, against the targets (the whole rehearsal in 20 minutes, every stage under 4 GiB peak RSS).

Each stage runs as its own process (as `make` runs it), so its peak RSS is its own (``os.wait4``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from photo_data import encode, photos  # real Debian photos, JPEG-encoded in varied ways

REPO = Path(__file__).resolve().parents[1]
CLASSES, N_MAX, N_MIN, VAL_PER_CLASS = 8142, 16, 2, 3
# iNat2018's 14 supercategories (the folder level above each class)
SUPER = ("Actinopterygii", "Amphibia", "Animalia", "Arachnida", "Aves", "Bacteria", "Chromista", "Fungi",
         "Insecta", "Mammalia", "Mollusca", "Plantae", "Protozoa", "Reptilia")
TARGET_SECONDS, TARGET_RSS = 20 * 60, 4 * 2 ** 30
TINY = ["--set", "model=resnet32", "--set", "crop_size=32", "--set", "resize=36", "--set", "epochs=1"]


def train_counts(classes: int = CLASSES) -> np.ndarray:
    """Train images per class: floor(16 (2/16)^(c/(C-1))), from 16 down to 2."""
    c = np.arange(classes)
    return np.floor(N_MAX * (N_MIN / N_MAX) ** (c / (classes - 1))).astype(np.int64)


_PHOTOS: list[np.ndarray] = []


def _init(images: list[np.ndarray]) -> None:
    _PHOTOS[:] = images


def write_images(jobs: list[tuple[str, int, int]]) -> int:
    """Write (path, class, sample seed) JPEGs: a crop around the class's own place in its photo."""
    for path, label, seed in jobs:
        cls = np.random.default_rng([label, 7])
        photo = _PHOTOS[label % len(_PHOTOS)]
        h, w = photo.shape[:2]
        side = int(cls.integers(48, min(h, w) // 2))
        cy, cx = int(cls.integers(side // 2, h - side // 2)), int(cls.integers(side // 2, w - side // 2))
        rng = np.random.default_rng([label, seed, 11])
        s = max(16, int(side * rng.uniform(0.8, 1.2)))
        y0 = int(np.clip(cy - s // 2 + rng.integers(-side // 8, side // 8 + 1), 0, h - s))
        x0 = int(np.clip(cx - s // 2 + rng.integers(-side // 8, side // 8 + 1), 0, w - s))
        size = (int(rng.integers(36, 65)), int(rng.integers(36, 65)))
        crop = Image.fromarray(photo[y0:y0 + s, x0:x0 + s]).resize(size, Image.BILINEAR)
        Path(path).write_bytes(encode(np.asarray(crop), rng))
    return len(jobs)


def write_dataset(root: Path, classes: int = CLASSES, workers: int = 2) -> dict:
    """The iNat2018-format tree under ``root``; returns the counts written."""
    counts = train_counts(classes)
    categories = [{"id": c, "name": f"species {c:04d}", "supercategory": SUPER[c * len(SUPER) // classes]}
                  for c in range(classes)]
    rng = np.random.default_rng(2018)
    jobs, docs, next_id = [], {}, 0
    for split, per_class in (("train", counts), ("val", np.full(classes, VAL_PER_CLASS))):
        labels = np.repeat(np.arange(classes), per_class)
        order = rng.permutation(len(labels))  # listed in shuffled order, as iNat's files are not by class
        images, annotations = [], []
        for k in order:
            label, image_id = int(labels[k]), next_id
            next_id += 1
            rel = f"train_val2018/{categories[label]['supercategory']}/{label}/{image_id:08x}.jpg"
            images.append({"id": image_id, "file_name": rel, "width": 0, "height": 0})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": label})
            jobs.append((str(root / rel), label, image_id))
        docs[split] = {"info": {"description": "dive rehearsal in iNat2018's format"}, "images": images,
                       "annotations": annotations, "categories": categories}
    for c in categories:
        (root / "train_val2018" / c["supercategory"] / str(c["id"])).mkdir(parents=True, exist_ok=True)
    chunks = [jobs[i:i + 2000] for i in range(0, len(jobs), 2000)]
    with Pool(workers, initializer=_init, initargs=(photos(),)) as pool:
        written = sum(pool.imap_unordered(write_images, chunks))
    for split, doc in docs.items():
        (root / f"{split}2018.json").write_text(json.dumps(doc))
    return {"train": int(counts.sum()), "val": classes * VAL_PER_CLASS, "files": written}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_stage(args: list[str], env: dict) -> tuple[float, int, str]:
    """Run ``dive ARGS`` as its own process; (seconds, peak RSS bytes, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"rehearsal: `dive {' '.join(args)}` failed:\n{output[-4000:]}")
    return seconds, usage.ru_maxrss * 1024, output


def table(rows: list[dict], total: float) -> str:
    lines = ["| stage | wall s | images | images/s | peak RSS GiB | disk written MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['images'] / r['seconds']:,.0f}" if r["images"] else "–"
        rss = f"{r['rss'] / 2**30:.2f}" if r["rss"] else "–"
        lines.append(f"| {r['stage']} | {r['seconds']:,.1f} | {r['images']:,} | {rate} | {rss} | "
                     f"{r['disk'] / 2**20:,.1f} |")
    worst = max(r["rss"] for r in rows)
    lines += ["", f"Total {total / 60:.1f} min (target <= {TARGET_SECONDS // 60} min: "
              f"{'met' if total <= TARGET_SECONDS else 'MISSED'}); largest peak RSS {worst / 2**30:.2f} GiB "
              f"(target <= {TARGET_RSS / 2**30:.0f} GiB per stage: {'met' if worst <= TARGET_RSS else 'MISSED'})."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/rehearsal"))
    parser.add_argument("--keep-data", action="store_true", help="reuse a dataset written before")
    args = parser.parse_args()
    out = args.out.absolute()
    data, runs = out / "inat2018", out / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows, start = [], time.perf_counter()
    if not (args.keep_data and (data / "val2018.json").is_file()):
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        t0 = time.perf_counter()
        counts = write_dataset(data)
        rows.append({"stage": "write dataset", "seconds": time.perf_counter() - t0, "images": counts["files"],
                     "rss": 0, "disk": disk_bytes(data)})
        print(f"rehearsal: wrote {counts['train']:,} train and {counts['val']:,} val JPEGs of {CLASSES:,} classes "
              f"under {data} in {rows[-1]['seconds']:.0f}s", flush=True)
    shutil.rmtree(runs, ignore_errors=True)
    n_train, n_val = int(train_counts().sum()), CLASSES * VAL_PER_CLASS
    teacher = runs / "inat2018" / "teacher"
    cache = runs / "inat2018" / "cache"
    student = cache / "students" / "dive"
    root = ["--data-root", str(data)]
    stages = [
        ("teacher", ["teacher", "--dataset", "inat2018", *root, *TINY, "--out", str(teacher)], n_train + n_val),
        ("cache", ["cache", "--teacher", str(teacher), *root, "--set", "views=2", "--out", str(cache)], 2 * n_train),
        ("student", ["student", "--cache", str(cache), *root, "--set", "model=resnet32", "--set", "epochs=1",
                     "--out", str(student)], n_train + n_val),
        ("inspect", ["inspect", "--cache", str(cache)], 2 * n_train),
        ("report", ["report", "--runs", str(runs / "inat2018")], 0),
        ("shift-eval", ["shift-eval", "--runs", str(runs / "inat2018")], 2 * n_val),
    ]
    for name, stage_args, images in stages:
        before = disk_bytes(runs)
        seconds, rss, output = run_stage(stage_args, env)
        rows.append({"stage": name, "seconds": seconds, "images": images, "rss": rss,
                     "disk": disk_bytes(runs) - before})
        print(f"rehearsal: {name} done in {seconds:.0f}s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
        if name in ("report", "shift-eval"):
            print(output[-3000:], flush=True)
    total = time.perf_counter() - start
    text = table(rows, total)
    head = (f"# Rehearsal at iNaturalist 2018's class count\n\n{CLASSES:,} classes, {n_train:,} train and {n_val:,} "
            f"val JPEGs in iNat2018's format; ResNet-32 at 32 px, 1 epoch, V = 2; {os.cpu_count()} CPUs. images: "
            f"train + test images through the model (teacher, student), views dumped (cache) or read (inspect), "
            f"test logits compared (shift-eval: 2 models).\n\n")
    (out / "rehearsal.md").write_text(head + text + "\n")
    print(head + text)
    ok = total <= TARGET_SECONDS and all(r["rss"] <= TARGET_RSS for r in rows)
    print(f"rehearsal: {'PASS' if ok else 'targets MISSED'}; table in {out / 'rehearsal.md'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
