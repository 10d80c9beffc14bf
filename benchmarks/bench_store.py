"""Benchmark the logit store: codec fidelity, write and read throughput, and one streamed iNat-shaped epoch.

    python benchmarks/bench_store.py                 # defaults: < 4 minutes on 2 cores, ~4 GB temporary
    python benchmarks/bench_store.py --inat-n 40000 --batch 512

Everything is written under a temporary folder that is deleted at the end. The epoch is read in a
subprocess, so its peak RSS is the reader's own. "cold" drops the store's pages from the page cache with
posix_fadvise first; "warm" reads right after writing, from the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from store import codecs  # noqa: E402
from store.location import RemotePath  # noqa: E402
from store.reader import LogitStore  # noqa: E402
from store.writer import StoreWriter  # noqa: E402

TAUS = (1, 3, 9)


def realistic_logits(rng: np.random.Generator, rows: int, c: int) -> np.ndarray:
    """Gaussian logits of scale 5 with the true class boosted by 10."""
    z = rng.normal(0, 5, (rows, c)).astype(np.float32)
    z[np.arange(rows), rng.integers(0, c, rows)] += 10
    return z


def softmax(z: np.ndarray, tau: float) -> np.ndarray:
    z = z.astype(np.float64) / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def fidelity(rows: int, large_rows: int) -> list[tuple]:
    """Per (C, codec): bytes per view, then (max |p - p^|, mean KL(p || p^)) for each tau."""
    rng = np.random.default_rng(0)
    table = []
    for c in (10, 100, 8142):
        z = realistic_logits(rng, rows if c <= 100 else large_rows, c)
        for codec in codecs.DENSE:  # topk on a real teacher's logits: make bench-codecs
            parts = codecs.encode(z, codec)
            decoded = codecs.decode(parts, codec)
            per_view = sum(a[0].nbytes for a in parts.values())
            cells = []
            for tau in TAUS:
                p, q = softmax(z, tau), softmax(decoded, tau)
                kl = (p * (np.log(p + 1e-300) - np.log(q + 1e-300))).sum(-1).mean()
                cells.append((np.abs(p - q).max(), kl))
            table.append((c, codec, per_view, cells))
    return table


def write_store(path: Path, n: int, v: int, c: int, codec: str, k: int = 0,
                checksums: bool = True) -> tuple[float, int]:
    """Write an iNat-shaped store from a pool of random shards; return (seconds, stored bytes)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, c, n)
    attrs = {"recipe": {"bench": True}, "view_spec": {}, "fingerprints": {"teacher": "0" * 64}}
    writer = StoreWriter.create_or_resume(path, n, v, c, codec, labels, np.arange(n),
                                          np.bincount(labels, minlength=c), attrs, k=k, checksums=checksums)
    rows = writer.layout.shard
    pool = [realistic_logits(rng, rows * v, c).reshape(rows, v, c) for _ in range(3)]
    params = rng.random((rows, v, 8), dtype=np.float32)
    start = time.perf_counter()
    for shard in writer.missing_shards():
        size = shard.stop - shard.start
        writer.write_shard(shard.index, pool[shard.index % 3][:size], params[:size])
    writer.mark_complete()
    seconds = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if isinstance(path, Path) else 0
    return seconds, stored


def drop_page_cache(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_epoch_child(path: str, epoch: int, batch: int) -> None:
    """In a subprocess: stream one epoch and print samples/s, bytes read and RSS as JSON."""
    store = LogitStore.open(path, sharpness=1 / 3)  # what a topk store decodes for (tau 3, p 1)
    rss_open = _status_kb("VmRSS")
    samples, checksum = 0, 0.0
    start = time.perf_counter()
    for index, _, logits, params in store.stream(epoch, seed=0, batch_size=batch):
        samples += len(index)
        checksum += float(logits[0, 0])  # touch the data, like a consumer would
    seconds = time.perf_counter() - start
    stored_row = (codecs.row_bytes(store.codec, store.c, store.k) + (8 if store.codec == "int8" else 0)
                  + 4 * store.p)
    print(json.dumps({"samples": samples, "seconds": seconds, "mb": samples * stored_row / 1e6,
                      "rss_open_mb": rss_open / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024}))


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def read_epoch(path, epoch: int, batch: int, cold: bool) -> dict:
    if cold:
        drop_page_cache(path)
    out = subprocess.run([sys.executable, __file__, "--child-read", str(path), "--epoch", str(epoch),
                          "--batch", str(batch)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def random_reads(path: Path, count: int, batch: int) -> tuple[float, float]:
    """read() of random (sample, view) pairs: samples/s and stored MB/s actually read (whole chunks)."""
    store = LogitStore.open(path, sharpness=1 / 3)  # what a topk store decodes for (tau 3, p 1)
    rng = np.random.default_rng(2)
    start, chunks = time.perf_counter(), 0
    for _ in range(count // batch):
        index, views = rng.integers(0, store.n, batch), rng.integers(0, store.v, batch)
        chunks += len(np.unique(index // store.chunk * store.v + views))
        store.read(index, views)
    seconds = time.perf_counter() - start
    chunk_mb = store.chunk * codecs.row_bytes(store.codec, store.c, store.k) / 1e6
    return count / seconds, chunks * chunk_mb / seconds


def print_fidelity(table: list[tuple]) -> None:
    print("\nCodec fidelity vs float32 (Gaussian logits, scale 5, true class +10)")
    head = " ".join(f"{'tau=' + str(t) + ' max|dp|':>15} {'KL':>9}" for t in TAUS)
    print(f"{'C':>5} {'codec':>8} {'bytes/view':>10} {head}")
    for c, codec, per_view, cells in table:
        row = " ".join(f"{dp:15.2e} {kl:9.2e}" for dp, kl in cells)
        print(f"{c:5d} {codec:>8} {per_view:10d} {row}")


def throughput(root: Path, args: argparse.Namespace) -> None:
    """Write an iNat-shaped store per codec, read it randomly and stream one epoch warm and one cold."""
    print(f"\nStore throughput, N={args.inat_n} V={args.v} C={args.c}, batch {args.batch}, {os.cpu_count()} "
          f"CPUs (load average {os.getloadavg()[0]:.1f} before starting)")
    print(f"{'codec':>8} {'store GB':>8} {'write MB/s':>10} {'random read':>18} "
          f"{'epoch':>5} {'stream samples/s':>16} {'read MB/s':>9} {'RSS open/peak MB':>17}")
    streamed = {}
    for name, codec, k, crc in (("float16", "float16", 0, True), ("no crc", "float16", 0, False),
                                ("int8", "int8", 0, True), ("topk100", "topk", 100, True)):
        path = root / f"{name.replace(' ', '-')}.zarr"
        seconds, stored = write_store(path, args.inat_n, args.v, args.c, codec, k, crc)
        rand_sps, rand_mbs = random_reads(path, args.random_reads, args.batch)
        for epoch, cold in ((0, False), (1, True)):
            r = read_epoch(path, epoch, args.batch, cold)
            assert r["samples"] == args.inat_n
            streamed[name, cold] = r["samples"] / r["seconds"]
            print(f"{name:>8} {stored / 1e9:8.2f} {stored / 1e6 / seconds:10.0f} "
                  f"{rand_sps:8.0f} smp/s {rand_mbs:4.0f}MB/s {'cold' if cold else 'warm':>5} "
                  f"{r['samples'] / r['seconds']:16.0f} {r['mb'] / r['seconds']:9.0f} "
                  f"{r['rss_open_mb']:8.0f}/{r['peak_rss_mb']:<8.0f}")
        shutil.rmtree(path)
    print(f"(load average {os.getloadavg()[0]:.1f} at the end)")
    bucket_row(root, args, streamed)
    for cold in (False, True):
        ratio = streamed["float16", cold] / streamed["no crc", cold]
        print(f"checksums, {'cold' if cold else 'warm'}: float16 with crc32c streams at {ratio:.3f} x the rate "
              f"without ({100 * (1 - ratio):+.1f}% cost)")


def bucket_row(root: Path, args: argparse.Namespace, streamed: dict) -> None:
    """The float16 store written to and streamed from a SeaweedFS bucket on loopback, against local disk."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from seaweed_server import seaweedfs

    with seaweedfs(root / "seaweedfs") as s3:
        url = f"{s3['url']}/bench/float16.zarr"
        seconds, _ = write_store(url, args.inat_n, args.v, args.c, "float16")
        stored = sum(f.stat_size() for f in RemotePath(url).rglob())
        r = read_epoch(url, 0, args.batch, cold=False)
        streamed["bucket", False] = r["samples"] / r["seconds"]
        print(f"{'bucket':>8} {stored / 1e9:8.2f} {stored / 1e6 / seconds:10.0f} "
              f"{'':>18} {'s3':>5} {streamed['bucket', False]:16.0f} {r['mb'] / r['seconds']:9.0f} "
              f"{r['rss_open_mb']:8.0f}/{r['peak_rss_mb']:<8.0f}")
    ratio = streamed["bucket", False] / streamed["float16", False]
    print(f"bucket: float16 streams from the loopback S3 bucket at {ratio:.3f} x the rate from local disk (warm)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inat-n", type=int, default=20000, help="samples in the iNat-shaped stores")
    parser.add_argument("--v", type=int, default=8)
    parser.add_argument("--c", type=int, default=8142)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4000, help="logit rows for fidelity at C <= 100")
    parser.add_argument("--large-rows", type=int, default=500, help="logit rows for fidelity at C = 8142")
    parser.add_argument("--random-reads", type=int, default=2048, help="samples read by random read()")
    parser.add_argument("--child-read", help=argparse.SUPPRESS)
    parser.add_argument("--epoch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_read:
        return read_epoch_child(args.child_read, args.epoch, args.batch)
    print_fidelity(fidelity(args.rows, args.large_rows))
    root = Path(tempfile.mkdtemp(prefix="bench_store."))
    try:
        throughput(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nwrite MB/s: stored bytes / (encode + write + fsync + done markers). random read: read() of "
          "random (sample, view)\npairs, each costs a whole chunk (MB/s of chunks read). stream: one "
          "epoch = one view of every sample\nin quasi-random order; read MB/s counts the stored bytes used. "
          "RSS of the reading process after open / peak.")


if __name__ == "__main__":
    main()
