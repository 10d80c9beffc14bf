"""The flatness stage (DiVE Appendix A): head and tail accuracy of a two-class Fashion-MNIST problem as the
virtual tail-to-head ratio R grows, one panel per (n_head, n_tail) pair.

Writes ``results.json`` (every run, saved after each so that a killed run resumes where it stopped),
``flatness.md`` (a table of mean +- std over runs) and ``flatness.png`` into the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.analysis.flatness import Schedule, run_point, virtual_ratio
from pipeline.data.sources.fmnist import CLASSES, load_full
from store.manifest import ArtifactError, write_json_atomic

SIZES = ((5000, 500), (5000, 50), (500, 50))
EPS = (0.0, 0.1, 0.2, 0.3, 0.4)


def key(n_head: int, n_tail: int, eps: float, run: int) -> str:
    return f"{n_head}/{n_tail}/eps{eps:g}/run{run}"


def summarize(results: dict, sizes, eps_list, runs: int) -> list[dict]:
    """Mean and sample std over runs for every (sizes, eps) point."""
    rows = []
    for n_head, n_tail in sizes:
        for eps in eps_list:
            got = [results[key(n_head, n_tail, eps, r)] for r in range(runs)]
            row = {"n_head": n_head, "n_tail": n_tail, "eps": eps, "R": virtual_ratio(n_head, n_tail, eps),
                   "runs": runs}
            for part in ("head", "tail", "mean"):
                values = np.array([g[part] for g in got])
                row[part] = float(values.mean())
                row[f"{part}_std"] = float(values.std(ddof=1)) if runs > 1 else 0.0
            rows.append(row)
    return rows


def table(rows: list[dict], head_name: str, tail_name: str) -> str:
    lines = [f"# Two-class flatness experiment: {head_name} (head) vs {tail_name} (tail)", "",
             "| n_head / n_tail | eps | R | head acc | tail acc | mean acc |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_head']} / {r['n_tail']} | {r['eps']:g} | {r['R']:.3f} | "
                     f"{r['head']:.2f} ± {r['head_std']:.2f} | {r['tail']:.2f} ± {r['tail_std']:.2f} | "
                     f"{r['mean']:.2f} ± {r['mean_std']:.2f} |")
    lines += ["", f"Mean ± sample std over {rows[0]['runs']} runs; accuracy (%) on the balanced test images of the "
              "two classes. R = (n_tail + eps n_head) / ((1 - eps) n_head)."]
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], sizes, head_name: str, tail_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), dpi=120, squeeze=False)
    for ax, (n_head, n_tail) in zip(axes[0], sizes):
        mine = [r for r in rows if r["n_head"] == n_head and r["n_tail"] == n_tail]
        x = [r["R"] for r in mine]
        for part, style, label in (("head", "b-o", f"head ({head_name})"), ("tail", "r-s", f"tail ({tail_name})")):
            ax.errorbar(x, [r[part] for r in mine], yerr=[r[f"{part}_std"] for r in mine], fmt=style, ms=4,
                        capsize=3, label=label)
        for r in mine:
            ax.annotate(f"eps {r['eps']:g}", (r["R"], r["tail"]), textcoords="offset points", xytext=(0, -12),
                        fontsize=6, ha="center")
        ax.set_xlabel("virtual tail/head ratio R")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"n_head {n_head}, n_tail {n_tail}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(out: Path, head: int = 0, tail: int = 8, sizes=SIZES, eps_list=EPS, runs: int = 5,
        schedule: Schedule = Schedule(), data_root: Path | None = None, log=print) -> list[dict]:
    """Run every (sizes, eps, run) point not already in ``out/results.json``, then write the table and figure."""
    if head == tail or not (0 <= head < 10 and 0 <= tail < 10):
        raise ArtifactError(f"--head {head} / --tail {tail}: choose two different Fashion-MNIST classes 0..9 "
                            f"({', '.join(f'{i} {n}' for i, n in enumerate(CLASSES))})")
    config = {"head": head, "tail": tail, "schedule": schedule.__dict__, "model": "PixelMLP 1024-128-2"}
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results = {}
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("config") != config:
            raise ArtifactError(f"{saved} holds runs of another setting ({old.get('config')}); "
                                f"choose another --out or delete it")
        results = old["results"]
    train, test = load_full(data_root)
    todo = [(nh, nt, e, r) for nh, nt in sizes for e in eps_list for r in range(runs)
            if key(nh, nt, e, r) not in results]
    head_name, tail_name = CLASSES[head], CLASSES[tail]
    log(f"flatness: {head_name} (head) vs {tail_name} (tail), sizes {list(sizes)}, eps {list(eps_list)}, "
        f"{runs} runs each; {len(todo)} of {len(sizes) * len(eps_list) * runs} runs to go, "
        f"{schedule.steps} SGD steps of {schedule.batch_size} each, {torch.get_num_threads()} threads")
    start = time.time()
    for i, (n_head, n_tail, eps, r) in enumerate(todo, 1):
        acc = run_point(train, test, head, tail, n_head, n_tail, eps, r, schedule)
        results[key(n_head, n_tail, eps, r)] = acc
        write_json_atomic(saved, {"config": config, "results": results})
        rate = (time.time() - start) / i
        log(f"  [{i}/{len(todo)}] {n_head}/{n_tail} eps {eps:g} run {r}: head {acc['head']:.2f} "
            f"tail {acc['tail']:.2f}  ({rate:.1f} s/run, ETA {rate * (len(todo) - i) / 60:.1f} min)")
    rows = summarize(results, sizes, eps_list, runs)
    text = table(rows, head_name, tail_name)
    (out / "flatness.md").write_text(text + "\n")
    write_json_atomic(out / "summary.json", {"config": config, "rows": rows})
    plot(out / "flatness.png", rows, sizes, head_name, tail_name)
    log(text)
    log(f"wrote {out / 'flatness.md'} and {out / 'flatness.png'}")
    return rows
