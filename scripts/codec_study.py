"""Students from lossy caches against float16 (``make codec-study``, glyph-lt by default).

From the BSCE teacher (seed 0) of the dataset, one cache per codec: float16 (the reference, the default
cache), int8, the compact codecs (topk K = 20 and sampled K = 10, both 100 bytes a view, which is 0.1 byte
a logit at C = 1000) and topk K = 100 (the K of the iNat plan); a DiVE student (the recipe's tau, p and alpha,
seed 0) from each; then seeds 1 and 2 of the compact codec whose seed-0 student scored the higher top-1 (they
take the same bytes), or of the codec named by ``--default`` (float16 already has its three from
``make glyph-study``); topk K = 100 comes last. Every step is a
``make`` target, so the study resumes where it stopped. The table (top-1, Few, mean ± std where seeds ran) goes
to ``RUNS/<dataset>/codec-study/codecs.md`` and ``codecs.json``.

    python scripts/codec_study.py [--dataset glyph-lt] [--default "topk 20"] [--dry-run] [--report-only]
                                  [MAKE_VARIABLE=value ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from study_table import mean_std  # scripts/, on the path of a script run from it

REPO = Path(__file__).resolve().parents[1]
DENSE = (("float16", 0), ("int8", 0))  # (codec, K): every logit kept
COMPACT = (("topk", 20), ("sampled", 10))  # 100 bytes a view each: the candidates for a default
WIDER = (("topk", 100),)  # 420 bytes a view: the K the iNat plan uses (0.05 byte a logit at C = 8,142)
CODECS = (*DENSE, *COMPACT, *WIDER)
SEEDS = (0, 1, 2)


def cache_vars(codec: str, k: int) -> list[str]:
    return [f"CODEC={codec}", *([f"CACHE_SET=topk={k}"] if k else [])]


def make(args: list[str], dataset: str, extra: list[str], dry: bool) -> None:
    cmd = ["make", "--no-print-directory", *args, f"DATASET={dataset}", *extra]
    print("+", " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, cwd=REPO, check=True)


def folders(runs: str, dataset: str, codec: str, k: int, seed: int = 0) -> tuple[Path, Path]:
    """(cache folder, student folder) of the codec's cache and its seed-``seed`` student (``stages.paths``)."""
    keys = ["--cache", f"codec={codec}", *(["--cache", f"topk={k}"] if k else []), "--student", f"seed={seed}"]
    out = subprocess.run([sys.executable, "-m", "stages.paths", "--runs", runs, "--dataset", dataset, *keys],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return REPO / out[1], REPO / out[2]  # an absolute folder stays as it is


def student_metrics(runs: str, dataset: str, codec: str, k: int, seed: int) -> dict | None:
    path = folders(runs, dataset, codec, k, seed)[1] / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def bytes_per_view(runs: str, dataset: str, codec: str, k: int) -> float | None:
    """The cache's bytes on disk over its views (logits, view parameters and metadata), if it is complete."""
    manifest = folders(runs, dataset, codec, k)[0] / "manifest.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    return m["bytes"] / (m["layout"]["n"] * m["layout"]["v"])


def report(runs: str, dataset: str) -> None:
    rows = []
    for codec, k in CODECS:
        seeds = {s: m for s in SEEDS if (m := student_metrics(runs, dataset, codec, k, s))}
        rows.append({"codec": codec, "k": k, "bytes_per_view": bytes_per_view(runs, dataset, codec, k),
                     "seeds": {s: {"top1": m["top1"], "few": m["few"]} for s, m in seeds.items()}})
    lines = [f"# Students from each codec: {dataset}", "",
             "DiVE students at the recipe's tau, p and alpha from one BSCE teacher's caches; mean ± std over the "
             "seeds that ran.", "", "| codec | bytes a view (store) | seeds | top-1 | Few |", "|---|---|---|---|---|"]
    for r in rows:
        s, size = r["seeds"], r["bytes_per_view"]
        name = f"{r['codec']} K={r['k']}" if r["k"] else r["codec"]
        lines.append(f"| {name} | {f'{size:,.0f}' if size else '–'} | {len(s)} | "
                     f"{mean_std([m['top1'] for m in s.values()])} | {mean_std([m['few'] for m in s.values()])} |")
    out = REPO / runs / dataset / "codec-study"
    out.mkdir(parents=True, exist_ok=True)
    (out / "codecs.json").write_text(json.dumps(rows, indent=1))
    (out / "codecs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'codecs.md'} and codecs.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="glyph-lt")
    parser.add_argument("--default", default=None,
                        help="'CODEC K' to train at 3 seeds (default: the better compact codec at seed 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the make commands only")
    parser.add_argument("--report-only", action="store_true", help="only write the table of what ran")
    parser.add_argument("extra", nargs="*", help="Make variables passed to every step")
    args = parser.parse_args()
    dataset, extra, dry = args.dataset, args.extra, args.dry_run
    chosen = None
    if args.default:
        name, _, k = args.default.partition(" ")
        chosen = (name, int(k) if k.isdigit() else 0)
        if chosen not in CODECS:
            sys.exit(f"error: --default {args.default!r} is not one of the study's codecs {CODECS}")
    runs = next((v.split("=", 1)[1] for v in extra if v.startswith("RUNS=")), "runs")
    if not args.report_only:
        make(["teacher"], dataset, extra, dry)
        for codec, k in (*DENSE, *COMPACT):
            make(["cache", "student", *cache_vars(codec, k)], dataset, extra, dry)
        if chosen is None and not dry:
            scored = {c: m["top1"] for c in COMPACT if (m := student_metrics(runs, dataset, *c, 0))}
            chosen = max(scored, key=scored.get)
            print(f"three seeds for {chosen[0]} K={chosen[1]} (seed-0 top-1 {scored[chosen]:.2f})", flush=True)
        for seed in SEEDS[1:]:
            make(["student", *cache_vars(*(chosen or COMPACT[0])), f"STUDENT_SEED={seed}"], dataset, extra, dry)
        for codec, k in WIDER:  # last: the seeds of a default come first
            make(["cache", "student", *cache_vars(codec, k)], dataset, extra, dry)
    if not dry:
        report(runs, dataset)


if __name__ == "__main__":
    main()
