"""What the stages share: run-folder bookkeeping and checks on an existing run's config."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from pipeline.config import Recipe, recipe_from_dict
from pipeline.metrics import accuracy_report
from store.manifest import ArtifactError, MANIFEST, write_json_atomic

CONFIG = "config.json"


def prepare_run_dir(out: Path, config: dict) -> bool:
    """Create ``out`` for a run of ``config``; True if it already holds that run, complete.

    A folder holding a run of another config is refused rather than overwritten: nothing written is lost.
    """
    out.mkdir(parents=True, exist_ok=True)
    saved = out / CONFIG
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old != json.loads(json.dumps(config)):
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config))
                             if old.get(k) != json.loads(json.dumps(config)).get(k))
            raise ArtifactError(f"{out} holds a run with another config ({diff}). Choose another run folder "
                                f"(NAME= / --out) or delete {out} to start over.")
    else:
        write_json_atomic(saved, config)
    manifest = out / MANIFEST
    if manifest.is_file():
        manifest.touch()  # complete and current for this config: tell Make it is up to date
        return True
    return False


def in_sample_order(result) -> dict[str, np.ndarray]:
    """Per-sample arrays (``evaluate``'s output, or a saved ``eval.npz``) sorted into test-sample order."""
    order = np.argsort(result["index"], kind="stable")
    return {k: np.asarray(result[k])[order] for k in (result.files if hasattr(result, "files") else result)}


def report_from_eval(result: dict[str, np.ndarray], class_counts: np.ndarray) -> dict:
    """Accuracy report from ``evaluate``'s per-sample output."""
    ordered = in_sample_order(result)
    return accuracy_report(ordered["logits"], ordered["labels"], class_counts)


def recipe_config(recipe: Recipe, **extra) -> dict:
    """The resolved config saved beside a stage's outputs."""
    return {**recipe.to_dict(), **extra}


def derived_recipe(config: dict, overrides: dict, allowed: tuple[str, ...], stage: str) -> Recipe:
    """An upstream stage's saved recipe with this stage's ``overrides``, which may only touch ``allowed``."""
    bad = set(overrides) - set(allowed)
    if bad:
        raise ArtifactError(f"the {stage} stage can only change {', '.join(allowed)}; got {sorted(bad)}")
    known = {f.name for f in fields(Recipe)}
    return recipe_from_dict({k: v for k, v in {**config, **overrides}.items() if k in known})
