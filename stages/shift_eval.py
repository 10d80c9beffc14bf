"""The shift-eval stage: every trained model of a dataset on Forward / Uniform / Backward test sets (DiVE
Table 2 shape), without and with post-compensation, from the per-sample test logits each run saved.

Every complete run gets its own rows, named by its folder under ``runs/`` (unique) and described by what
differs from the defaults, so no two runs overwrite each other.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.analysis.shift import shift_accuracies
from store.manifest import write_json_atomic

from .artifacts import RunRecord, collect_runs, in_sample_order


def label(record: RunRecord) -> str:
    """A short description of a run: method, key settings and seed (its folder names it uniquely)."""
    s = record.settings
    text = record.method.replace(" (teacher)", "")
    if record.stage == "student":
        text += f" tau {s.tau:g} p {s.power:g} alpha {s.alpha:g}" + (" online" if s.mode == "online" else "")
    changed = {k: v for k, v in record.changed().items() if k not in ("tau", "power", "alpha")}
    if changed:
        text += " (" + ", ".join(f"{k} {v}" for k, v in changed.items()) + ")"
    return f"{text}, seed {record.seed}"


def run(runs: Path, log=print) -> Path:
    """Write ``runs/shift_eval.md`` and ``.json``: top-1 per test distribution for every model."""
    records = [r for r in collect_runs(runs) if (r.path / "eval.npz").is_file()]
    if not records:
        raise FileNotFoundError(f"no complete teacher or student runs under {runs}; run `make teacher` first")
    results, columns = {}, None
    for record in records:
        evals = in_sample_order(np.load(record.path / "eval.npz"))
        counts = np.array(json.loads((record.path / "metrics.json").read_text())["class_counts"])
        plain_ce = record.stage == "teacher" and record.settings.loss == "ce"
        key = str(record.path.relative_to(runs))
        results[key] = {"model": label(record), **shift_accuracies(evals["logits"], evals["labels"], counts, plain_ce)}
        columns = list(results[key]["w/o PC"])
    lines = [f"# Test-time label shift: {runs.name}", "",
             "| model | run | PC | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for key, res in results.items():
        for pc in ("w/o PC", "w/ PC"):
            lines.append(f"| {res['model']} | {key} | {pc} | " + " | ".join(f"{res[pc][c]:.2f}" for c in columns)
                         + " |")
    lines += ["", "Top-1 (%). Forward-k: class r (by training frequency) keeps floor(n (1/k)^(r/(C-1))) test images;",
              "Backward-k uses the exponent (C-1-r)/(C-1). PC adds log p_target (and, for CE, subtracts log p_train).",
              "run: the run's folder under " + str(runs) + "; the model column says what differs from the defaults."]
    out = runs / "shift_eval.md"
    out.write_text("\n".join(lines) + "\n")
    write_json_atomic(runs / "shift_eval.json", results)
    log("\n".join(lines))
    log(f"wrote {out} ({len(results)} runs)")
    return out
