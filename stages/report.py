"""The report stage: one Markdown table (like the paper's Table 1) over every complete run of a dataset:
method, settings, top-1, Many, Medium, Few, with mean and std over seeds.

Runs are keyed by their full resolved settings (and, for a student, its cache), so two runs that differ in any
setting get rows of their own; only seeds of otherwise identical runs share a row. No run is left out.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data.sources.base import GROUPS

from .artifacts import RunRecord, collect_runs

COLUMNS = ("top1", *GROUPS)
ORDER = {"CE": 0, "BSCE (teacher)": 1, "DiVE": 2, "RIDE, BSCE (teacher)": 3}


def rows_of(record: RunRecord) -> list[dict]:
    """A run's table rows: one, plus a routed row for a RIDE student with a router."""
    m = record.metrics
    base = {"method": record.method, "record": record, "key": record.group_key()}
    rows = [{**base, **{k: m[k] for k in COLUMNS}, "experts": m.get("experts", 1),
             "gflops": m.get("gflops", float("nan"))}]
    if "router" in m:
        routed = m["router"]
        rows.append({**base, "method": f"{record.method} + router", "key": base["key"] + "+router",
                     **{k: routed[k] for k in COLUMNS}, "experts": routed["experts"], "gflops": routed["gflops"]})
    return rows


def group(rows: list[dict]) -> list[list[dict]]:
    """Rows of one key are one group, one row per seed; a second run of a seed already in its group (the same
    settings in another folder) opens a group of its own rather than being dropped or averaged in."""
    groups: dict[str, list[list[dict]]] = {}
    for row in rows:
        bucket = groups.setdefault(row["key"], [[]])
        target = next((g for g in bucket if all(r["record"].seed != row["record"].seed for r in g)), None)
        if target is None:
            target = []
            bucket.append(target)
        target.append(row)
    return [g for bucket in groups.values() for g in bucket if g]


def summarize(records: list[RunRecord]) -> list[dict]:
    """One entry per group: mean and sample std (ddof 1) of each column over its seeds."""
    out = []
    for members in group([row for record in records for row in rows_of(record)]):
        first = members[0]
        entry = {"method": first["method"], "record": first["record"],
                 "seeds": sorted(m["record"].seed for m in members),
                 "paths": [str(m["record"].path) for m in members]}
        for col in (*COLUMNS, "experts", "gflops"):
            values = np.array([m[col] for m in members], dtype=float)
            mean = float(values.mean()) if np.isfinite(values).any() else float("nan")
            entry[col] = (mean, float(values.std(ddof=1)) if len(values) > 1 else float("nan"))
        out.append(entry)
    return sorted(out, key=lambda e: (ORDER.get(e["method"], 4), -np.nan_to_num(e["top1"][0], nan=-1.0),
                                      e["paths"][0]))


def _cell(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "–"  # an empty group (no class of it in this split)
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def describe(record: RunRecord) -> str:
    """The settings a row shows: the method's key settings, then everything else that differs from the
    dataset's defaults ("defaults" where nothing does)."""
    s = record.settings
    model = f"{s.model} x{s.experts}" if s.experts else s.model
    shown = {"model", "experts", "epochs"}
    core = f"{model}, {s.epochs} ep"
    if record.stage == "student":
        core = f"tau {s.tau:g}, p {s.power:g}, alpha {s.alpha:g}" + (", online" if s.mode == "online" else "") \
            + f"; {core}"
        shown |= {"tau", "power", "alpha"}
    rest = {k: v for k, v in record.changed().items() if k not in shown}
    return core + "; " + (", ".join(f"{k} {_value(v)}" for k, v in rest.items()) if rest else "defaults")


def markdown(entries: list[dict], title: str) -> str:
    """The report as a Markdown table."""
    lines = [f"# {title}", "",
             "| method | settings | from | seeds | top-1 | Many | Medium | Few | experts | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        cells = " | ".join(_cell(*e[c]) for c in COLUMNS)
        seeds = ",".join(str(s) for s in e["seeds"])
        experts, gflops = e["experts"][0], e["gflops"][0]
        cost = f"{experts:.3g} | " + ("-" if np.isnan(gflops) else f"{gflops:.3f}")
        record = e["record"]
        origin = record.upstream or "-"
        lines.append(f"| {e['method']} | {describe(record)} | {origin} | {seeds} | {cells} | {cost} |")
    lines += ["", "Mean ± sample std over seeds (where there are several); accuracies in percent on the test split; "
              "– for a group with no class.",
              "settings: the method's key settings, then what differs from the dataset's defaults. from: a student's "
              "cache folder (which names its teacher).",
              "experts: experts consulted per test image (1 for a single model); GFLOPs: per image, 2 x the "
              "multiply-accumulates of the convolutions and linear layers run (- where the run predates the count)."]
    return "\n".join(lines) + "\n"


def machines_line(records: list[RunRecord]) -> str:
    """Which CPUs the runs came from. Where there are several, the table mixes numerics: the same seed trains
    to other numbers on another CPU, so a difference between rows may be the machine's."""
    counts = Counter(r.cpu or "not recorded" for r in records)
    listed = ", ".join(f"{cpu} ({n} run{'s' if n > 1 else ''})" for cpu, n in sorted(counts.items()))
    if len(counts) == 1:
        return f"Machine: {listed}."
    return (f"Machines: {listed}. The same seed trains to other numbers on another CPU (bf16 and oneDNN kernels "
            "differ by instruction set), so compare rows from one machine.")


def run(runs: Path, out: Path | None = None, log=print) -> Path:
    """Write ``runs/report.md`` (or ``out``) and print it."""
    records = collect_runs(runs)
    if not records:
        raise FileNotFoundError(f"no complete teacher or student runs under {runs}; run `make teacher` first")
    entries = summarize(records)
    out = out or runs / "report.md"
    text = markdown(entries, f"Results: {runs.name}") + "\n" + machines_line(records) + "\n"
    out.write_text(text)
    log(text)
    log(f"report written to {out} ({len(records)} runs in {len(entries)} rows)")
    return out
