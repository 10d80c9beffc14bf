"""The report stage: one Markdown table (like the paper's Table 1) over every complete run of a dataset:
method, settings, top-1, Many, Medium, Few, with mean and std over seeds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.sources.base import GROUPS

COLUMNS = ("top1", *GROUPS)
# The settings that name a row; a row's seeds are averaged. Everything else is the recipe's default.
TEACHER_KEYS = ("model", "epochs", "experts")
STUDENT_KEYS = ("model", "epochs", "tau", "power", "alpha", "mode", "experts")


def collect(runs: Path) -> list[dict]:
    """Every complete teacher and student under ``runs`` (manifests only; incomplete runs are skipped)."""
    rows = []
    for manifest in sorted(runs.rglob("manifest.json")):
        data = json.loads(manifest.read_text())
        if data.get("stage") not in ("teacher", "student") or "metrics" not in data:
            continue
        config = data["config"]
        ride = config["model"].startswith("ride_")
        if data["stage"] == "teacher":
            method = {"bsce": "BSCE (teacher)", "ce": "CE"}.get(config["loss"], config["loss"])
            if ride:
                method = f"RIDE, {method}"
            settings = {k: config.get(k, 0) for k in TEACHER_KEYS}
        else:
            method = "RIDE-DiVE" if ride else "DiVE"
            settings = {k: config.get(k, 0) for k in STUDENT_KEYS}
            settings["teacher"] = Path(config["cache"]).name.removeprefix("cache-")
        metrics = data["metrics"]
        base = {"settings": settings, "seed": config["seed"], "path": str(manifest.parent)}
        rows.append({"method": method, **base, **{k: metrics[k] for k in COLUMNS},
                     "experts": metrics.get("experts", 1), "gflops": metrics.get("gflops", float("nan"))})
        if "router" in metrics:  # a routed RIDE student: a row of its own
            routed = metrics["router"]
            rows.append({"method": f"{method} + router", **base, **{k: routed[k] for k in COLUMNS},
                         "experts": routed["experts"], "gflops": routed["gflops"]})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Group runs that differ only in seed; mean and sample std (ddof 1) of each column."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        members = groups.setdefault(row["method"] + json.dumps(row["settings"], sort_keys=True), [])
        if all(m["seed"] != row["seed"] for m in members):  # one run per seed: a copied twin counts once
            members.append(row)
    out = []
    for members in groups.values():
        entry = {"method": members[0]["method"], "settings": members[0]["settings"],
                 "seeds": sorted(m["seed"] for m in members)}
        for col in (*COLUMNS, "experts", "gflops"):
            values = np.array([m[col] for m in members], dtype=float)
            entry[col] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan"))
        out.append(entry)
    order = {"CE": 0, "BSCE (teacher)": 1, "DiVE": 2, "RIDE, BSCE (teacher)": 3}
    return sorted(out, key=lambda e: (order.get(e["method"], 4), -e["top1"][0]))


def _cell(mean: float, std: float) -> str:
    return f"{mean:.2f}" if np.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _settings(method: str, settings: dict) -> str:
    model = settings["model"]
    if settings.get("experts"):
        model = f"{model} x{settings['experts']}"
    if "DiVE" in method:
        text = f"tau {settings['tau']:g}, p {settings['power']:g}, alpha {settings['alpha']:g}"
        if settings.get("mode") == "online":
            text += ", online"
        return text + f"; {model}, {settings['epochs']} ep; from {settings['teacher']}"
    return f"{model}, {settings['epochs']} ep"


def markdown(entries: list[dict], title: str) -> str:
    """The report as a Markdown table."""
    lines = [f"# {title}", "", "| method | settings | seeds | top-1 | Many | Medium | Few | experts | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        cells = " | ".join(_cell(*e[c]) for c in COLUMNS)
        seeds = ",".join(str(s) for s in e["seeds"])
        experts, gflops = e["experts"][0], e["gflops"][0]
        cost = f"{experts:.3g} | " + ("-" if np.isnan(gflops) else f"{gflops:.3f}")
        lines.append(f"| {e['method']} | {_settings(e['method'], e['settings'])} | {seeds} | {cells} | {cost} |")
    lines += ["", "Mean ± sample std over seeds (where there are several); accuracies in percent on the test split.",
              "experts: experts consulted per test image (1 for a single model); GFLOPs: per image, 2 x the "
              "multiply-accumulates of the convolutions and linear layers run (- where the run predates the count)."]
    return "\n".join(lines) + "\n"


def run(runs: Path, out: Path | None = None, log=print) -> Path:
    """Write ``runs/report.md`` (or ``out``) and print it."""
    entries = summarize(collect(runs))
    if not entries:
        raise FileNotFoundError(f"no complete teacher or student runs under {runs}; run `make teacher` first")
    out = out or runs / "report.md"
    text = markdown(entries, f"Results: {runs.name}")
    out.write_text(text)
    log(text)
    log(f"report written to {out}")
    return out
