"""The shift-eval stage: every trained model of a dataset on Forward / Uniform / Backward test sets (DiVE
Table 2 shape), without and with post-compensation, from the per-sample test logits each run saved."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.shift import shift_accuracies
from store.manifest import write_json_atomic

from .common import in_sample_order


def model_rows(runs: Path) -> list[tuple[str, Path, bool]]:
    """(name, run folder, trained with plain CE) for every complete teacher and student under ``runs``."""
    rows = []
    for manifest in sorted(runs.rglob("manifest.json")):
        data = json.loads(manifest.read_text())
        if data.get("stage") not in ("teacher", "student") or not (manifest.parent / "eval.npz").is_file():
            continue
        config = data["config"]
        ride = "RIDE " if config["model"].startswith("ride_") else ""
        if data["stage"] == "teacher":
            name = f"{ride}{'CE' if config['loss'] == 'ce' else 'BSCE'} seed {config['seed']}"
        else:
            name = f"{ride}DiVE tau {config['tau']:g} p {config['power']:g} seed {config['seed']}"
        if config.get("mode") == "online":
            name += " online"
        rows.append((name, manifest.parent, data["stage"] == "teacher" and config["loss"] == "ce"))
    return rows


def run(runs: Path, log=print) -> Path:
    """Write ``runs/shift_eval.md`` and ``.json``: top-1 per test distribution for every model."""
    rows = model_rows(runs)
    if not rows:
        raise FileNotFoundError(f"no complete teacher or student runs under {runs}; run `make teacher` first")
    results, columns = {}, None
    for name, folder, plain_ce in rows:
        evals = in_sample_order(np.load(folder / "eval.npz"))
        counts = np.array(json.loads((folder / "metrics.json").read_text())["class_counts"])
        results[name] = shift_accuracies(evals["logits"], evals["labels"], counts, plain_ce)
        columns = list(results[name]["w/o PC"])
    lines = [f"# Test-time label shift: {runs.name}", "",
             "| model | PC | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, res in results.items():
        for pc in ("w/o PC", "w/ PC"):
            lines.append(f"| {name} | {pc} | " + " | ".join(f"{res[pc][c]:.2f}" for c in columns) + " |")
    lines += ["", "Top-1 (%). Forward-k: class r (by training frequency) keeps floor(n (1/k)^(r/(C-1))) test images;",
              "Backward-k uses the exponent (C-1-r)/(C-1). PC adds log p_target (and, for CE, subtracts log p_train)."]
    out = runs / "shift_eval.md"
    out.write_text("\n".join(lines) + "\n")
    write_json_atomic(runs / "shift_eval.json", results)
    log("\n".join(lines))
    log(f"wrote {out}")
    return out
