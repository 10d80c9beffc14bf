"""How many recorded views a cache needs (``make views-study DATASET=...``): students from caches of V views
against the online reference (the teacher run live on a fresh view every epoch), from one teacher.

Every training is a ``make`` target, so the study resumes where it stopped. In order:

1. the BSCE teacher (seed 0); caches with V in {1, 2, 4, 8, 16, 32, epochs} and a student (seed 0) from each;
   the online student (seed 0), which replays the plan of the V = epochs cache with the teacher run live;
2. seeds 1 and 2 at V = 8, V = epochs and online;
3. the table and the plot: top-1 and Few against V with online as a line, and the student's accuracy on its
   own training images (the evaluation view, no augmentation) against V, which shows whether few views
   overfit. Written to ``RUNS/<dataset>/views-study/`` (views.md, views.png, views.json).

    python scripts/views_study.py [--dataset glyph-lt] [--dry-run] [--report-only] [MAKE_VARIABLE=value ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.settings import defaults_for  # noqa: E402  (standard library only)
from study_table import mean_std  # noqa: E402  (scripts/, on the path of a script run from it)

CURVE = (1, 2, 4, 8, 16, 32)  # plus V = epochs
SEEDS = (0, 1, 2)


def views_for(dataset: str) -> list[int]:
    epochs = defaults_for(dataset).student.epochs
    return sorted({*(v for v in CURVE if v < epochs), epochs})


def make(args: list[str], dataset: str, extra: list[str], dry: bool) -> None:
    cmd = ["make", "--no-print-directory", *args, f"DATASET={dataset}", *extra]
    print("+", " ".join(cmd), flush=True)
    if not dry:
        subprocess.run(cmd, cwd=REPO, check=True)


def student_folder(runs: str, dataset: str, views: int, seed: int, mode: str = "cached") -> Path:
    out = subprocess.run([sys.executable, "-m", "stages.paths", "--runs", runs, "--dataset", dataset, "--cache",
                          f"views={views}", "--student", f"seed={seed}", "--student", f"mode={mode}"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return REPO / out[2]


def train_accuracy(folder: Path) -> float:
    """Top-1 of the student in ``folder`` on its own training images, through the evaluation view."""
    import torch

    from pipeline.data.loaders import ViewLoader, make_executor
    from pipeline.data.sources import load_source
    from pipeline.train.loop import evaluate
    from stages.artifacts import load_teacher
    from stages.student import cache_teacher

    cache = Path(json.loads((folder / "manifest.json").read_text())["config"]["cache_dir"])
    teacher = cache_teacher(cache if cache.is_absolute() else REPO / cache)
    source = load_source(teacher.dataset, None, teacher.imbalance, teacher.classes)
    spec, device = teacher.view_spec(), torch.device("cpu")
    executor = make_executor(source.train, spec, source.mean, source.std, 500, 2, device)
    batches = ViewLoader(source.train, spec, executor, 500, seed=0, train=False).batches(0)
    model = load_teacher(folder, device, channels_last=True)  # a student's model.pt has the teacher's format
    result = evaluate(model, batches, device, bf16=True, channels_last=True, keep_features=False)
    return float(100 * (result["preds"] == result["labels"]).mean())


def collect(runs: str, dataset: str) -> dict:
    """Every finished run of the study: {label: {"views": V or None, "seeds": {seed: metrics}}}."""
    rows = {}
    for label, views, mode in [*((f"V={v}", v, "cached") for v in views_for(dataset)), ("online", None, "online")]:
        seeds = {}
        for seed in SEEDS:
            folder = student_folder(runs, dataset, views or views_for(dataset)[-1], seed, mode)
            metrics = folder / "metrics.json"
            if metrics.is_file():
                m = json.loads(metrics.read_text())
                seeds[seed] = {"top1": m["top1"], "few": m["few"], "train_top1": train_accuracy(folder)}
        rows[label] = {"views": views, "seeds": seeds}
    return rows


def table(rows: dict, dataset: str) -> str:
    lines = [f"# How many views: {dataset}", "",
             "Students (seed 0 for the curve; mean ± std where 3 seeds ran) from caches of V recorded views, and "
             "the online reference (the teacher run on a fresh view every epoch).", "",
             "| views | seeds | top-1 | Few | train top-1 |", "|---|---|---|---|---|"]
    for label, row in rows.items():
        s = row["seeds"]
        lines.append(f"| {label} | {len(s)} | {mean_std([m['top1'] for m in s.values()])} | "
                     f"{mean_std([m['few'] for m in s.values()])} | {mean_std([m['train_top1'] for m in s.values()])} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cached = [(r["views"], r["seeds"][0]) for r in rows.values() if r["views"] and 0 in r["seeds"]]
    online = rows["online"]["seeds"].get(0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for key, name, colour in (("top1", "top-1", "C0"), ("few", "Few", "C1")):
        axes[0].plot([v for v, _ in cached], [m[key] for _, m in cached], "-o", color=colour, label=f"cached, {name}")
        if online:
            axes[0].axhline(online[key], color=colour, ls="--", label=f"online, {name}")
    axes[1].plot([v for v, _ in cached], [m["train_top1"] for _, m in cached], "-o", color="C2", label="cached")
    if online:
        axes[1].axhline(online["train_top1"], color="C2", ls="--", label="online")
    for ax, title in zip(axes, ("test accuracy (%)", "accuracy on the training images (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("recorded views V")
        ax.set_title(f"{dataset}: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(runs: str, dataset: str) -> None:
    rows = collect(runs, dataset)
    out = REPO / runs / dataset / "views-study"
    out.mkdir(parents=True, exist_ok=True)
    (out / "views.json").write_text(json.dumps(rows, indent=1))
    (out / "views.md").write_text(table(rows, dataset))
    plot(rows, out / "views.png", dataset)
    print(table(rows, dataset))
    print(f"wrote {out / 'views.md'}, views.png and views.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="glyph-lt")
    parser.add_argument("--dry-run", action="store_true", help="print the make commands only")
    parser.add_argument("--report-only", action="store_true", help="only write the table and plot of what ran")
    parser.add_argument("extra", nargs="*", help="Make variables passed to every step")
    args = parser.parse_args()
    dataset, extra, dry = args.dataset, args.extra, args.dry_run
    runs = next((v.split("=", 1)[1] for v in extra if v.startswith("RUNS=")), "runs")
    if not args.report_only:
        make(["teacher"], dataset, extra, dry)
        for views in views_for(dataset):
            make(["cache", "student", f"VIEWS={views}"], dataset, extra, dry)
        make(["student", "MODE=online"], dataset, extra, dry)
        for seed in SEEDS[1:]:
            for views in (8, views_for(dataset)[-1]):
                make(["student", f"VIEWS={views}", f"STUDENT_SEED={seed}"], dataset, extra, dry)
            make(["student", "MODE=online", f"STUDENT_SEED={seed}"], dataset, extra, dry)
    if not dry:
        report(runs, dataset)


if __name__ == "__main__":
    main()
