"""The glyph-lt study (``make glyph-study``): CE, BSCE and DiVE over 3 seeds, a tau x p sweep, the report.

Every step is a ``make`` target, so the study resumes where it stopped: complete stages are skipped by their
manifests. In order (about 12 minutes a training on 2 cores):

1. BSCE teacher, its cache, the DiVE student at the recipe's tau, p, alpha (seed 0), the CE teacher;
2. seeds 1 and 2 of the DiVE student (same cache), the BSCE teacher and the CE teacher; the report;
3. the sweep from the cache: tau {1, 3, 6} x p {0.5, 1} at seed 0, then its best point at seeds 1 and 2;
4. ``make report`` (runs/glyph-lt/report.md) and ``make inspect`` at the sweep's points.

    python scripts/glyph_study.py [--dry-run] [MAKE_VARIABLE=value ...]   (e.g. VENV=/path/.venv)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = ["DATASET=glyph-lt"]
TAUS, POWERS, SEEDS = (1, 3, 6), (0.5, 1), (0, 1, 2)


def make(args: list[str], extra: list[str], dry: bool) -> None:
    cmd = ["make", "--no-print-directory", *args, *DATASET, *extra]
    print("+", " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, cwd=REPO, check=True)


def student_metrics(runs: str, tau: float, power: float, seed: int) -> dict | None:
    """The metrics of the sweep student (tau, p, seed) from the default cache, or None if not trained."""
    out = subprocess.run([sys.executable, "-m", "stages.paths", "--runs", runs, "--dataset", "glyph-lt", "--student",
                          f"tau={tau}", "--student", f"power={power}", "--student", f"seed={seed}"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    path = REPO / out[2] / "metrics.json"  # an absolute folder stays as it is
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the make commands only")
    parser.add_argument("extra", nargs="*", help="Make variables passed to every step")
    args = parser.parse_args()
    dry, extra = args.dry_run, args.extra
    make(["teacher", "cache", "student"], extra, dry)
    make(["teacher", "LOSS=ce"], extra, dry)
    for seed in SEEDS[1:]:
        make(["student", f"STUDENT_SEED={seed}"], extra, dry)
        make(["teacher", f"TEACHER_SEED={seed}"], extra, dry)
        make(["teacher", "LOSS=ce", f"TEACHER_SEED={seed}"], extra, dry)
    make(["report"], extra, dry)  # the 3-seed table first, then the sweep
    for tau in TAUS:
        for power in POWERS:
            make(["student", f"TAU={tau}", f"POWER={power}"], extra, dry)
    runs = next((v.split("=", 1)[1] for v in extra if v.startswith("RUNS=")), "runs")
    scored = {(t, p): student_metrics(runs, t, p, 0) for t in TAUS for p in POWERS}
    scored = {k: m["top1"] for k, m in scored.items() if m}
    if scored:
        tau, power = max(scored, key=scored.get)
        print(f"best sweep point at seed 0: tau {tau}, p {power} (top-1 {scored[(tau, power)]:.2f})", flush=True)
        for seed in SEEDS[1:]:
            make(["student", f"TAU={tau}", f"POWER={power}", f"STUDENT_SEED={seed}"], extra, dry)
    make(["report"], extra, dry)
    make(["inspect", "AT=" + " ".join(f"{t},{p}" for t in TAUS for p in POWERS)], extra, dry)


if __name__ == "__main__":
    main()
