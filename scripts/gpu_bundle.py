"""The folder a bare GPU machine needs for ``make gpu-check``: wheels it lacks, and the data tier 1 reads.

Such a machine has Python 3.12 and torch, but no network, no zarr, numcodecs or DALI, and takes files in
transfers of at most 64 MiB each. Here (with network):

    python scripts/gpu_bundle.py                  # writes gpu-bundle/ (every file at most --piece-mib)
    python scripts/gpu_bundle.py --no-dali        # tier 1 only: without DALI and its codec libraries

Copy ``gpu-bundle/`` into the repository's folder on the GPU machine, file by file. There, ``make gpu-check``
(or ``bash scripts/gpu_check.sh``) finds it, joins the split wheels, checks every wheel's SHA-256 against
``manifest.json``, and installs without network, into ``.gpu-env/site`` (put on PYTHONPATH), only what that
Python lacks: its own numpy, torchvision and pillow are kept, as its torch was built with them. To join and
check by hand: ``python scripts/gpu_bundle.py --join gpu-bundle``.

Layout: ``wheels/`` (whole wheels: zarr, numcodecs, typer, pillow and their dependencies, and the
torchvision built for the machine's torch (``--torch``), for CPython 3.12 on x86-64 Linux), ``pieces/``
(wheels larger than one piece, such as DALI's, cut into ``<wheel>.partNN``), ``fmnist/`` (Debian's
Fashion-MNIST IDX files), ``photos/`` (the JPEG photos of Debian's opencv-doc and libjxl-testdata, for tier
2) and ``manifest.json``.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

PIECE_MIB = 60  # under the 64 MiB a transfer may carry, with room for the transfer's own framing
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
SMALL = ("zarr>=3.1,<3.2", "numcodecs>=0.16,<0.17", "typer>=0.9", "pillow>=9")
TORCH = "2.11"  # the lent GPU machine's torch; torchvision must be the one built for it
FMNIST = Path("/usr/share/datasets/fashion-mnist")
PHOTO_GLOBS = ("/usr/share/doc/opencv-doc/examples/data/*.jpg", "/usr/share/libjxl-testdata/jxl/flower/*.jpg")
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz")


def dali_requirement() -> str:
    """DALI at the version installed here (the one the tests ran with), else the newest CUDA 13 build."""
    try:
        return f"nvidia-dali-cuda130=={importlib.metadata.version('nvidia-dali-cuda130')}"
    except importlib.metadata.PackageNotFoundError:
        return "nvidia-dali-cuda130"


def torchvision_for(torch_version: str) -> str:
    """The torchvision release built for torch ``major.minor`` (torch 2.N pairs with torchvision 0.(N + 15))."""
    major, minor = (int(x) for x in torch_version.split(".")[:2])
    if major != 2:
        raise SystemExit(f"--torch {torch_version}: only torch 2.x is known here; give --torch as 2.N")
    return f"torchvision==0.{minor + 15}.*"


def download(requirements: list[str], into: Path, python: str, no_deps: bool = False) -> None:
    """Wheels of ``requirements`` (and, unless ``no_deps``, their dependencies) for CPython ``python`` on
    x86-64 Linux."""
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "--dest", str(into), "--progress-bar", "off"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + (["--no-deps"] if no_deps else []) + requirements, check=True)


def distribution(wheel: str) -> str:
    """The normalized distribution name of a wheel file name (``nvidia_dali_cuda130-2.4.0-...`` ->
    ``nvidia-dali-cuda130``)."""
    return wheel.split("-", 1)[0].replace("_", "-").replace(".", "-").lower()


def missing_here(wheels: list[Path]) -> list[Path]:
    """The wheels whose distribution this Python lacks: the machine's own packages (numpy, torchvision,
    pillow, ...) are kept, as its torch was built and tested with them."""
    installed = {(d.metadata["Name"] or "").replace("_", "-").replace(".", "-").lower()
                 for d in importlib.metadata.distributions()}
    return [w for w in wheels if distribution(w.name) not in installed]


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file. Not store.manifest's: this script runs on the GPU machine before numpy, which
    that module imports, may be installed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def split_large(wheels: Path, pieces: Path, piece_bytes: int) -> dict[str, dict]:
    """Cut every wheel over ``piece_bytes`` into numbered pieces (and remove it whole); returns the manifest
    entry of every wheel: its SHA-256, size and, for a cut one, its pieces in order."""
    entries = {}
    for wheel in sorted(wheels.glob("*.whl")):
        entry = {"sha256": sha256(wheel), "bytes": wheel.stat().st_size, "pieces": []}
        if entry["bytes"] > piece_bytes:
            pieces.mkdir(parents=True, exist_ok=True)
            with open(wheel, "rb") as f:
                k = 0
                while block := f.read(piece_bytes):
                    piece = pieces / f"{wheel.name}.part{k:02d}"
                    piece.write_bytes(block)
                    entry["pieces"].append(piece.name)
                    k += 1
            wheel.unlink()
        entries[wheel.name] = entry
    return entries


def join(bundle: Path) -> list[Path]:
    """Join the cut wheels of ``bundle`` into ``bundle/wheels`` and check every wheel's SHA-256; returns the
    wheels. A missing piece or a wrong hash stops with the file's name."""
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"{manifest_path}: no manifest; build the bundle with `python scripts/gpu_bundle.py`")
    manifest = json.loads(manifest_path.read_text())
    wheels = bundle / "wheels"
    wheels.mkdir(exist_ok=True)
    out = []
    for name, entry in manifest["wheels"].items():
        target = wheels / name
        if entry["pieces"] and not (target.is_file() and target.stat().st_size == entry["bytes"]):
            missing = [p for p in entry["pieces"] if not (bundle / "pieces" / p).is_file()]
            if missing:
                sys.exit(f"{bundle / 'pieces'}: missing {', '.join(missing)} of {name}; copy every piece over")
            with open(target, "wb") as f:
                for piece in entry["pieces"]:
                    f.write((bundle / "pieces" / piece).read_bytes())
        if not target.is_file():
            sys.exit(f"{target}: missing; copy the whole gpu-bundle folder over")
        if sha256(target) != entry["sha256"]:
            sys.exit(f"{target}: SHA-256 differs from {manifest_path}; the copy is damaged, copy it (or its "
                     f"pieces) again")
        out.append(target)
    return out


def build(out: Path, piece_mib: int, dali: bool, python: str, torch_version: str) -> None:
    if out.exists():
        shutil.rmtree(out)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    download(list(SMALL) + ([dali_requirement()] if dali else []), wheels, python)
    download([torchvision_for(torch_version)], wheels, python, no_deps=True)  # not torch: the machine has it
    entries = split_large(wheels, out / "pieces", piece_mib * 2**20)
    data = out / "fmnist"
    data.mkdir()
    for name in FMNIST_FILES:
        if not (FMNIST / name).is_file():
            sys.exit(f"{FMNIST / name}: missing; apt-get install dataset-fashion-mnist")
        shutil.copy2(FMNIST / name, data / name)
    photos = out / "photos"  # tier 2's real JPEGs (scripts/photo_data.py reads them through $DIVE_PHOTOS)
    photos.mkdir()
    for pattern in PHOTO_GLOBS:
        for f in glob.glob(pattern):
            shutil.copy2(f, photos / f"{Path(f).parent.name}_{Path(f).name}")
    manifest = {"python": python, "torch": torch_version, "piece_bytes": piece_mib * 2**20, "wheels": entries,
                "fmnist": {name: sha256(data / name) for name in FMNIST_FILES}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    files = sorted(f for f in out.rglob("*") if f.is_file())
    largest = max(f.stat().st_size for f in files)
    total = sum(f.stat().st_size for f in files)
    print(f"{out}: {len(files)} files, {total / 2**20:,.0f} MiB in all, the largest {largest / 2**20:.1f} MiB")
    for name, entry in entries.items():
        if entry["pieces"]:
            print(f"  {name}: {entry['bytes'] / 2**20:,.0f} MiB in {len(entry['pieces'])} pieces")
    print(f"copy {out}/ next to the repository on the GPU machine, then run `make gpu-check` there")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-bundle"))
    parser.add_argument("--piece-mib", type=int, default=PIECE_MIB, help="largest file, MiB")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    parser.add_argument("--torch", default=TORCH, help="the GPU machine's torch version (for its torchvision)")
    parser.add_argument("--no-dali", action="store_true", help="leave DALI out (tier 1 only)")
    parser.add_argument("--join", type=Path, metavar="BUNDLE", help="on the GPU machine: join and check")
    parser.add_argument("--missing", action="store_true", help="with --join: print the wheels this Python lacks")
    args = parser.parse_args()
    if args.join:
        wheels = join(args.join)
        if args.missing:
            print("\n".join(str(w) for w in missing_here(wheels)))
        else:
            print(f"{args.join}: {len(wheels)} wheels joined and checked")
        return
    build(args.out, args.piece_mib, not args.no_dali, args.python, args.torch)


if __name__ == "__main__":
    main()
