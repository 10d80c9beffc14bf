"""Check the DALI executor on a GPU: mixed (nvJPEG) decoding against CPU decoding, accuracy and speed.

    python scripts/gpu_check.py                  # needs a CUDA GPU; about a minute on an H100
    python scripts/gpu_check.py --allow-cpu      # the CPU half only, where there is no GPU
    python scripts/gpu_check.py --files a.jpg b.jpg --count 500 --size 224

It replays the same views (resized crops with colour jitter) of the same JPEGs on each device and prints:
- executor vs the torch reference (views.apply_view), fed the pixels that device's decoder gives: this is
  the executor's own error, and must be float rounding only;
- GPU vs CPU executor on lossless PNG copies of the files: the operators alone, without decoder differences;
- GPU vs CPU decoded pixels, and GPU vs CPU executor outputs on the JPEGs (nvJPEG and libjpeg-turbo round
  differently, so these are reported, not checked);
- images/s of each device over ``--count`` decodes.
Differences are in [0, 255] pixel units; the output is a Markdown table. Exits 1 when a checked difference
is over its tolerance, 2 when there is no GPU and --allow-cpu was not given.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data import views  # noqa: E402
from pipeline.data.dali import DaliExecutor, image_sizes  # noqa: E402
from photo_data import photo_files  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_GLOBS = ("/usr/share/doc/opencv-doc/examples/data/*.jpg", "/usr/share/libjxl-testdata/jxl/flower/*.jpg")
REFERENCE_TOL = 0.05  # [0, 255] units; measured 5e-3 on the CPU at size 224
OPERATOR_TOL = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", nargs="*", help="JPEG files (default: Debian's opencv-doc and libjxl "
                        "test images, else synthetic JPEGs)")
    parser.add_argument("--max-pixels", type=int, default=1_000_000, help="skip larger default files")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--count", type=int, default=384, help="decodes timed per device")
    parser.add_argument("--threads", type=int, default=4, help="DALI CPU threads")
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, run the CPU half only")
    return parser.parse_args(argv)


def default_files(max_pixels: int, folder: Path) -> list[str]:
    """Typical-size real JPEGs where installed, else a few synthetic ones written into ``folder``."""
    found = photo_files(DEFAULT_GLOBS)
    if found:
        sizes = image_sizes(found)
        small = [f for f, (h, w) in zip(found, sizes) if h * w <= max_pixels]
        if small:
            return small
    rng = np.random.default_rng(0)
    paths = []
    for i in range(16):
        noise = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        path = folder / f"synthetic_{i}.jpg"
        Image.fromarray(noise).resize((500, 375), Image.BICUBIC).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def view_params(files: list[str], size: int) -> np.ndarray:
    spec = views.ViewSpec(kind="resized_crop", size=size, jitter=0.4)
    sizes = image_sizes(files)
    return views.view_params(spec, 0, np.arange(len(files)), 0, sizes[:, 0], sizes[:, 1])


def run_all(ex: DaliExecutor, files: list[str], params: np.ndarray) -> torch.Tensor:
    """The executor's output for every file, gathered on the CPU."""
    return torch.cat([ex.run(files[i:i + ex.batch_size], params[i:i + ex.batch_size]).cpu()
                      for i in range(0, len(files), ex.batch_size)])


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized values back to [0, 255] units, so that differences read as pixel levels."""
    return x * (torch.tensor(STD).view(3, 1, 1) * 255.0)


def reference_diff(ex: DaliExecutor, files: list[str], params: np.ndarray, out: torch.Tensor) -> float:
    """Max |executor - views reference| on the pixels this executor's own decoder gives."""
    ref = torch.stack([views.normalize(views.apply_view(torch.from_numpy(ex.decode(f)), p, ex.size), MEAN, STD)
                       for f, p in zip(files, params)])
    return to_pixels(out - ref).abs().max().item()


def images_per_second(ex: DaliExecutor, files: list[str], params: np.ndarray, count: int) -> float:
    """Decode-and-view throughput over ``count`` samples, cycling through the files."""
    index = np.arange(count) % len(files)
    ex.run([files[i] for i in index[:ex.batch_size]], params[index[:ex.batch_size]])  # warm-up
    sync = torch.cuda.synchronize if ex.device == "gpu" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(0, count, ex.batch_size):
        chunk = index[i:i + ex.batch_size]
        ex.run([files[k] for k in chunk], params[chunk])
    sync()
    return count / (time.perf_counter() - start)


def png_copies(files: list[str], folder: Path) -> list[str]:
    """Lossless copies of the files (as PIL decodes them), so both devices decode identical pixels."""
    out = []
    for i, f in enumerate(files):
        path = folder / f"copy_{i}.png"
        with Image.open(f) as im:
            im.convert("RGB").save(path, "PNG", compress_level=1)
        out.append(str(path))
    return out


Row = tuple[str, str, str]  # what was measured, its value, and the verdict (or "reported")


def check_device(device: str, files: list[str], params: np.ndarray,
                 args: argparse.Namespace) -> tuple[DaliExecutor, torch.Tensor, list[Row], bool]:
    """Run one device's executor: its reference error and speed as table rows, its outputs, and pass/fail."""
    ex = DaliExecutor(args.size, MEAN, STD, args.batch, device=device, num_threads=args.threads)
    out = run_all(ex, files, params)
    err = reference_diff(ex, files, params, out)
    rate = images_per_second(ex, files, params, args.count)
    ok = err <= REFERENCE_TOL
    rows = [(f"{device}: executor vs torch reference (own decode), max abs diff", f"{err:.2e}",
             f"{'ok' if ok else '**FAIL**'} (tolerance {REFERENCE_TOL})"),
            (f"{device}: decode + views, images/s ({args.batch} a batch, {args.size} px, {args.threads} CPU threads)",
             f"{rate:,.0f}", "reported")]
    return ex, out, rows, ok


def compare_devices(gpu: DaliExecutor, cpu: DaliExecutor, files: list[str], params: np.ndarray,
                    outs: dict[str, torch.Tensor], folder: Path) -> tuple[list[Row], bool]:
    """GPU vs CPU differences as table rows: decoders, executors on JPEGs, executors on PNG copies (checked)."""
    decode = max(int(np.abs(gpu.decode(f).astype(int) - cpu.decode(f).astype(int)).max()) for f in files)
    jpeg = to_pixels(outs["gpu"] - outs["cpu"]).abs()
    pngs = png_copies(files, folder)
    ops = to_pixels(run_all(gpu, pngs, params) - run_all(cpu, pngs, params)).abs().max().item()
    ok = ops <= OPERATOR_TOL
    rows = [("gpu vs cpu: decoded pixels (nvJPEG vs libjpeg-turbo), max levels", f"{decode}", "reported"),
            ("gpu vs cpu: executor on the JPEGs, max / mean abs diff", f"{jpeg.max().item():.3f} / "
             f"{jpeg.mean().item():.4f}", "reported (decoders round differently)"),
            ("gpu vs cpu: executor on lossless PNG copies (operators only), max abs diff", f"{ops:.2e}",
             f"{'ok' if ok else '**FAIL**'} (tolerance {OPERATOR_TOL})")]
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.allow_cpu:
        print("gpu_check: no CUDA GPU is visible to torch, so there is nothing to compare. "
              "Run it on a GPU machine, or pass --allow-cpu to run the CPU half only.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = args.files or default_files(args.max_pixels, folder)
        params = view_params(files, args.size)
        executors, outs, rows, ok = {}, {}, [], True
        for device in (["gpu", "cpu"] if has_gpu else ["cpu"]):
            executors[device], outs[device], more, passed = check_device(device, files, params, args)
            rows += more
            ok &= passed
        if has_gpu:
            more, passed = compare_devices(executors["gpu"], executors["cpu"], files, params, outs, folder)
            rows += more
            ok &= passed
    print(f"### Tier 2: DALI mixed (nvJPEG) against CPU decoding, on "
          f"{torch.cuda.get_device_name() if has_gpu else 'the CPU only'}\n")
    print(f"{len(files)} JPEG files; views: resized_crop {args.size} px with jitter 0.4; differences in [0, 255] "
          f"pixel levels\n")
    print("| check | value | verdict |\n|---|---:|---|")
    for what, value, verdict in rows:
        print(f"| {what} | {value} | {verdict} |")
    print(f"\ntier 2 decoding: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
