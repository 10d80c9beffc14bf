"""Codec fidelity on a real teacher's cache (``make bench-codecs``, glyph-lt's BSCE teacher by default).

The float32 reference: the teacher run again on recorded views of the cache (the cache's own bf16 and
channels_last settings, so only the storage differs). Every codec then encodes those float32 logits, and for
each tau x p the soft targets t = softmax(p z / tau) of the decoded logits are compared with the float32
ones: bytes a view, mean KL(t || t^), max |t - t^|, and the largest relative error of a class's virtual count
(the sum of its targets over the views, for classes with at least one example's worth).

Candidates: float16, int8, topk at K in {5, 10, 20, 50, 100}; codec sampled (``store.sampled``: topk's record
plus K importance-sampled tail classes, 8K + 20 bytes) at K // 2, so at no more bytes than each topk; and, for
reference, a purely sampled code at the same bytes as each topk ("sampled-all"; Anshumann et al., ACL 2025,
sample classes from the teacher instead of keeping the top ones): S = K + 5 (class, logit) draws, with
replacement, from q = softmax(z / 4) over all classes, and the target at sharpness beta by self-normalised
importance weights, t^_i proportional to count_i * exp((beta - 1/4) z_i).

A sampled code's estimate of one view is sparse (classes never drawn get 0), so its per-view KL is huge and
its total variation large by construction; its sums over views are nearly unbiased, which is what virtual
counts (and the student's gradient, averaged over views) see. Compare sampled codes by the count error.

    python benchmarks/bench_codecs.py [--cache DIR] [--views 4] [--out runs/glyph-lt/bench-codecs.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.analysis.virtual import soft_targets_np  # noqa: E402
from pipeline.data.loaders import make_executor  # noqa: E402
from pipeline.data.sources import load_source  # noqa: E402
from pipeline.data.targets import positions_of  # noqa: E402
from pipeline.device import autocast, to_device  # noqa: E402
from stages.artifacts import STORE, load_teacher  # noqa: E402
from stages.student import cache_teacher, teacher_dir_of  # noqa: E402
from store import codecs  # noqa: E402
from store.manifest import read_manifest  # noqa: E402
from store.reader import LogitStore  # noqa: E402

TAUS, POWERS = (1, 2, 3, 6, 9), (0.5, 1)
KS = (5, 10, 20, 50, 100)
PROPOSAL = 0.25  # sharpness of the sampled code's proposal
NEG = np.float32(-1e30)  # the decoded logit of a class never drawn: a target of exactly 0


def default_cache() -> Path:
    out = subprocess.run([sys.executable, "-m", "stages.paths", "--dataset", "glyph-lt"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return REPO / out[1]


def reference_logits(cache: Path, views: int, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """float32 teacher logits of ``views`` recorded views of every sample, [n * views, C], and the labels."""
    store = LogitStore.open(cache / STORE)
    teacher = cache_teacher(cache)
    source = load_source(teacher.dataset, None, teacher.imbalance, teacher.classes)
    runtime = read_manifest(cache, "cache")["config"]["runtime"]
    device = torch.device("cpu")
    model = load_teacher(teacher_dir_of(read_manifest(cache, "cache")["config"]), device, runtime["channels_last"])
    executor = make_executor(source.train, teacher.view_spec(), source.mean, source.std, batch, 2, device)
    rows = np.repeat(np.arange(store.n), views)
    chosen = np.tile(np.arange(views), store.n) * (store.v // views)  # views spread over the recorded ones
    out = []
    for start in range(0, len(rows), batch):
        r, v = rows[start:start + batch], chosen[start:start + batch]
        _, params = store.read(r, v)
        images = executor.run(positions_of(store.ids[r], source.train.ids), params)
        with torch.no_grad(), autocast(device, runtime["bf16"]):
            out.append(model(to_device(images, device, runtime["channels_last"]))["logits"].float().numpy())
    return np.concatenate(out), store.labels[rows]


def sampled_encode(z: np.ndarray, slots: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``slots`` draws of classes from softmax(PROPOSAL * z) per row: (classes [rows, S], their float16 logits)."""
    n, c = z.shape
    cdf = np.cumsum(soft_targets_np(z, 1 / PROPOSAL, 1.0), axis=1)
    cdf /= cdf[:, -1:]
    offset = np.arange(n)[:, None]  # row r's cdf lies in [r, r + 1]: one sorted array for every row at once
    u = np.random.default_rng(seed).random((n, slots)) + offset
    draws = np.searchsorted((cdf + offset).ravel(), u.ravel()).reshape(n, slots) - offset * c
    draws = np.clip(draws, 0, c - 1)
    return draws, np.take_along_axis(z, draws, 1).astype(np.float16)


def sampled_decode(draws: np.ndarray, logits: np.ndarray, c: int, beta: float) -> np.ndarray:
    """Logits whose softmax at ``beta`` is the self-normalised importance estimate of the target."""
    counts = np.zeros((len(draws), c), np.float32)
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1.0)
    z = np.zeros((len(draws), c), np.float32)
    np.put_along_axis(z, draws, logits.astype(np.float32), axis=1)
    with np.errstate(divide="ignore"):
        dense = ((beta - PROPOSAL) * z + np.log(counts)) / beta
    return np.where(counts > 0, dense, NEG).astype(np.float32)


def candidates(c: int) -> list[tuple[str, int, object]]:
    """(name, bytes a view, decode(z, beta) -> logits) of every candidate code."""
    out = [("float16", codecs.row_bytes("float16", c), None), ("int8", codecs.row_bytes("int8", c) + 8, None)]
    for k in (k for k in KS if k < c):
        out.append((f"topk K={k}", codecs.row_bytes("topk", c, k), k))
    for k in (k for k in KS if k // 2 < c):
        out.append((f"sampled K={k // 2}", codecs.row_bytes("sampled", c, k // 2), ("codec", k // 2)))
    for k in (k for k in KS if k < c):
        out.append((f"sampled-all S={k + 5}", codecs.row_bytes("topk", c, k), ("sampled", k + 5)))
    return out


def measure(z: np.ndarray) -> list[dict]:
    c = z.shape[1]
    rows = []
    for name, size, how in candidates(c):
        start = time.perf_counter()
        if how is None:
            parts = codecs.encode(z, name)
            decode = lambda beta, parts=parts, name=name: codecs.decode(parts, name)  # noqa: E731
        elif isinstance(how, int) or how[0] == "codec":
            codec, k = ("topk", how) if isinstance(how, int) else ("sampled", how[1])
            parts = codecs.encode(z, codec, k)
            decode = lambda beta, parts=parts, k=k, codec=codec: codecs.decode(parts, codec, c, k, beta)  # noqa: E731
        else:
            draws, logits = sampled_encode(z, how[1])
            decode = lambda beta, d=draws, g=logits: sampled_decode(d, g, c, beta)  # noqa: E731
        encode_s = time.perf_counter() - start
        for tau in TAUS:
            for power in POWERS:
                beta = power / tau
                t, t_hat = soft_targets_np(z, tau, power), soft_targets_np(decode(beta), tau, power)
                with np.errstate(divide="ignore", invalid="ignore"):
                    kl = np.where(t > 0, t * (np.log(t) - np.log(np.maximum(t_hat, 1e-300))), 0).sum(1)
                counts, counts_hat = t.sum(0), t_hat.sum(0)
                real = counts >= 1
                rows.append({"codec": name, "bytes_per_view": size, "tau": tau, "power": power,
                             "mean_kl": float(kl.mean()), "max_abs_dp": float(np.abs(t - t_hat).max()),
                             "mean_tv": float(0.5 * np.abs(t - t_hat).sum(1).mean()),
                             "max_rel_count_error": float((np.abs(counts_hat - counts)[real] / counts[real]).max()),
                             "encode_seconds": encode_s})
    return rows


def table(rows: list[dict], c: int) -> str:
    names = list(dict.fromkeys(r["codec"] for r in rows))
    head = (f"{'codec':<18}{'B/view':>8}{'B/logit':>9}  {'mean KL (worst tau,p)':>22}  {'max |dp|':>9}  "
            f"{'mean TV':>8}  {'count rel err':>13}  {'KL at tau 3,p .5':>17}  {'count err there':>15}")
    lines = [head, "-" * len(head)]
    for name in names:
        mine = [r for r in rows if r["codec"] == name]
        worst = max(mine, key=lambda r: r["mean_kl"])
        at = next(r for r in mine if r["tau"] == 3 and r["power"] == 0.5)
        lines.append(f"{name:<18}{mine[0]['bytes_per_view']:>8}{mine[0]['bytes_per_view'] / c:>9.3f}  "
                     f"{worst['mean_kl']:>10.2e} ({worst['tau']:g},{worst['power']:g}){'':>4}  "
                     f"{max(r['max_abs_dp'] for r in mine):>9.2e}  {max(r['mean_tv'] for r in mine):>8.3f}  "
                     f"{max(r['max_rel_count_error'] for r in mine):>13.2e}  {at['mean_kl']:>17.2e}  "
                     f"{at['max_rel_count_error']:>15.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None, help="a cache folder (default: glyph-lt's BSCE teacher)")
    parser.add_argument("--views", type=int, default=4, help="recorded views per sample to re-run (default 4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON of all figures (default: CACHE/bench-codecs.json)")
    args = parser.parse_args()
    cache = args.cache or default_cache()
    if not (cache / "manifest.json").is_file():
        sys.exit(f"error: no complete cache at {cache}. Make it first: make teacher cache DATASET=glyph-lt")
    start = time.perf_counter()
    z, _ = reference_logits(cache, args.views)
    print(f"bench-codecs: {cache}: float32 teacher logits of {len(z):,} views ({args.views} a sample), "
          f"{z.shape[1]} classes, in {time.perf_counter() - start:.0f}s", flush=True)
    rows = measure(z)
    print(table(rows, z.shape[1]))
    print(f"tau in {TAUS} x p in {POWERS}; 'count rel err': largest |V^_c - V_c| / V_c over classes with V_c >= 1 "
          f"and over the settings; 'mean TV': the worst setting's mean total variation 0.5 sum |t - t^| a view")
    out = args.out or cache / "bench-codecs.json"
    out.write_text(json.dumps({"cache": str(cache), "views": len(z), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
