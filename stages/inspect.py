"""The inspect stage: the virtual example distribution a cache gives at any (tau, p), without the teacher.

Writes ``inspect.json`` and ``inspect.png`` (real and virtual counts per class, sorted by frequency, log
scale) into the output folder, and prints a compact table.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.analysis.virtual import count_error_bounds, flatness, smallest_tau, virtual_counts
from store import codecs
from store.manifest import write_json_atomic
from store.reader import LogitStore

from .artifacts import store_of


def progress_bar(done: int, total: int) -> None:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10 percent in a log."""
    percent = 100 * done // total
    if done < total and percent == 100 * (done - 1) // total:
        return  # nothing new to show
    tty = sys.stderr.isatty()
    if not tty and done < total and percent % 10:
        return
    filled = 30 * done // total
    line = f"  reading the store [{'#' * filled}{'.' * (30 - filled)}] {percent:3d}%"
    sys.stderr.write(f"\r{line}" + ("\n" if done == total else "") if tty else line + "\n")
    sys.stderr.flush()


def table(rows: dict[str, dict]) -> str:
    """Flatness figures, one row per distribution."""
    head = f"{'distribution':<22}{'min/max':>9}{'R few/many':>12}{'entropy':>9}{'Many':>9}{'Medium':>9}{'Few':>9}"
    lines = [head, "-" * len(head)]
    for name, f in rows.items():
        lines.append(f"{name:<22}{_num(f['min_over_max'], 9, 4)}{_num(f['tail_to_head'], 12, 4)}"
                     f"{_num(f['entropy'], 9, 4)}{_num(f['mean_many'], 9, 1)}{_num(f['mean_medium'], 9, 1)}"
                     f"{_num(f['mean_few'], 9, 1)}")
    return "\n".join(lines)


def _num(value: float, width: int, digits: int) -> str:
    """A figure, or – where a group has no class (R needs both Few and Many)."""
    return f"{'–':>{width}}" if np.isnan(value) else f"{value:>{width}.{digits}f}"


def plot(path: Path, real: np.ndarray, virtual: dict[str, np.ndarray], title: str) -> None:
    """Real and virtual counts per class, classes sorted by real frequency, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-real, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(np.arange(len(real)), real[order], "k-o", ms=3, label="real counts n_c")
    for name, counts in virtual.items():
        ax.plot(np.arange(len(real)), counts[order], "-o", ms=3, label=f"virtual, {name}")
    ax.set_yscale("log")
    ax.set_xlabel("class rank (by training frequency)")
    ax.set_ylabel("examples per class")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def codec_name(store: LogitStore) -> str:
    return codecs.name(store.codec, store.k)


def error_line(store: LogitStore, name: str, counts: np.ndarray, bound: np.ndarray) -> str:
    """What the codec's rounding or truncation can do to the virtual counts at one setting."""
    worst = int(np.argmax(bound / np.maximum(counts, 1e-12)))
    within = "within" if store.codec != "sampled" else "within (2 standard errors of its draws, ~95%)"
    return (f"codec {codec_name(store)} at {name}: each virtual count is {within} {bound.max():.3g} examples of "
            f"the exact logits' (at most {100 * bound[worst] / max(counts[worst], 1e-12):.3g}% of a class's "
            f"count, class {worst})")


def run(cache_dir: Path, out: Path, settings: list[tuple[float, float]], flatness_target: float | None = None,
        log=print) -> dict:
    """Virtual counts of the cache at each (tau, p) in ``settings``; JSON, PNG and a table."""
    store = LogitStore.open(store_of(cache_dir))
    real = store.class_counts.astype(np.float64)
    log(f"inspect: {store.path} ({store.n:,} images x {store.v} views, {store.c} classes)")
    counts = virtual_counts(store, settings, progress_bar)
    names = [f"tau {t:g}, p {p:g}" for t, p in settings]
    figures = {"real n_c": flatness(real, real)}
    figures.update({name: flatness(c, real) for name, c in zip(names, counts)})
    bounds = count_error_bounds(store, settings, progress_bar)
    result = {"cache": str(cache_dir), "codec": codec_name(store), "real_counts": real.tolist(),
              "settings": [{"tau": t, "power": p, "virtual_counts": c.tolist(), "flatness": figures[n],
                            "count_error_bound": b.tolist()}
                           for (t, p), c, n, b in zip(settings, counts, names, bounds)],
              "real_flatness": figures["real n_c"]}
    if flatness_target is not None:
        result["smallest_tau"] = {}
        for power in sorted({p for _, p in settings}):
            tau = smallest_tau(store, power, flatness_target, progress=progress_bar)
            result["smallest_tau"][str(power)] = tau
            log(f"smallest tau with virtual min/max >= {flatness_target:g} at p {power:g}: "
                + (f"{tau:.3g}" if tau is not None else "none up to tau 64"))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "inspect.json", result)
    plot(out / "inspect.png", real, dict(zip(names, counts)), f"virtual example distribution: {cache_dir.name}")
    log(table(figures))
    for name, c, b in zip(names, counts, bounds):
        log(error_line(store, name, c, b))
    log(f"wrote {out / 'inspect.json'} and {out / 'inspect.png'}")
    return result
