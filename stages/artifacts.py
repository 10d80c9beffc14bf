"""What the stages share: run folders, saved settings, the teacher's weights, a trained run's outputs, and the
list of complete runs that report, shift-eval and the analyses read. Stage modules import this, never each
other.

A run folder's ``config.json`` holds the run's identity: its stage's settings without the runtime keys, its
upstream stages' settings and the fingerprints of its inputs. ``manifest.json`` (written last) adds the
runtime settings, the world size and the outputs.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.data.loaders import ViewLoader
from pipeline.data.sources import Source
from pipeline.models import build_model
from pipeline.models.flops import gflops_per_image
from pipeline.run_names import differences
from pipeline.settings import STAGES, TeacherSettings, Training, defaults_for, from_dict, jsonable
from pipeline.train.errors import TrainingDiverged
from pipeline.train.loop import evaluate, load_checkpoint, save_checkpoint
from pipeline.train.metrics import accuracy_report, format_table
from store.manifest import MANIFEST, ArtifactError, read_manifest, sha256_file, write_json_atomic, write_manifest

CONFIG = "config.json"
STORE = "logits.zarr"
EXPERT_STORE = "expert_logits.zarr"  # a RIDE teacher's per-expert logits, class axis = expert-major E x C


def store_folder(cache_dir: Path, store_url: str | None = None):
    """Where a cache's stores live: the cache folder itself, or with ``store_url`` (``CACHE_URL=``, an object
    store such as ``s3://bucket/prefix``) the prefix ``<url>/<dataset>/<cache folder name>`` of it, while the
    cache folder keeps its small files (config.json, manifest.json)."""
    from store.location import location

    if not store_url:
        return cache_dir
    return location(f"{store_url.rstrip('/')}/{cache_dir.parent.name}/{cache_dir.name}")


def store_of(cache_dir: Path):
    """The logit store of a cache: the URL its manifest records for a store in object storage, else the
    folder's own ``logits.zarr`` (never a recorded local path: a copied cache folder reads its own copy)."""
    from store.location import is_url, location

    manifest = cache_dir / "manifest.json"
    if manifest.is_file():
        where = json.loads(manifest.read_text()).get("store")
        if where and is_url(where):
            return location(where)
    return cache_dir / STORE


def prepare_run_dir(out: Path, identity: dict) -> bool:
    """Create ``out`` for a run of ``identity``; True if it already holds that run, complete.

    A folder holding a run of another identity is refused rather than overwritten: nothing written is lost.
    Runtime settings are not compared, so a run resumes under another device count or decode threads.
    """
    out.mkdir(parents=True, exist_ok=True)
    saved, wanted = out / CONFIG, json.loads(json.dumps(identity))
    if saved.is_file():
        old, new = with_new_keys(json.loads(saved.read_text())), with_new_keys(wanted)
        if old != new:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                             if old.get(k) != new.get(k))
            raise ArtifactError(f"{out} holds a run with other settings ({diff}). Choose another run folder "
                                f"(--out) or delete {out} to start over.")
    else:
        write_json_atomic(saved, wanted)
    return (out / MANIFEST).is_file()


def with_new_keys(identity: dict) -> dict:
    """An identity with every stage section completed by its fields' defaults: a run saved before a setting
    existed ran as that setting's default does (a new setting's default keeps the old behaviour), so it is
    still the same run."""
    out = dict(identity)
    for stage, kind in STAGES.items():
        if isinstance(out.get(stage), dict):
            defaults = {f.name: f.default for f in fields(kind)
                        if f.default is not MISSING and f.name not in kind.runtime_keys}
            out[stage] = {**jsonable(defaults), **out[stage]}
    return out


def runtime_record(settings, dist, **used) -> dict:
    """The runtime side of a run, for its manifest: the settings' runtime keys, the world size and device, and
    what was chosen at run time (``used``, e.g. the measured micro batch)."""
    return {**settings.runtime(), "world": dist.world, "device": str(dist.device), **used}


FLOAT16_MAX = float(np.finfo(np.float16).max)  # the cache's default codec holds |z| <= 65504


def check_logits(result: dict, explain: Callable[[str], str]) -> None:
    """Stop a run whose test logits (``evaluate``'s float32 summary) are not finite or beyond float16 (a
    diverged teacher), before any of its results are written; ``explain`` turns the finding into the message."""
    if not bool(result["finite"]):
        raise TrainingDiverged(explain("some of its test logits are not finite"))
    worst = float(result["max_abs"])
    if worst > FLOAT16_MAX:
        raise TrainingDiverged(explain(f"its test logits reach |z| = {worst:.3g}, beyond the {FLOAT16_MAX:g} that "
                                       f"the cache's float16 codec holds"))


def settings_of(config: dict, stage: str):
    """A stage's settings from a saved config: its own section, or (runs made before per-stage settings)
    the flat recipe that held every key."""
    section = config.get(stage)
    return from_dict(stage, section if isinstance(section, dict) else config)


def teacher_of(teacher_dir: Path) -> TeacherSettings:
    """The settings a complete teacher was trained with."""
    return settings_of(read_manifest(teacher_dir, "teacher")["config"], "teacher")


def load_teacher(teacher_dir: Path, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The teacher's final weights (loaded weights-only), in eval mode."""
    state = load_checkpoint(teacher_dir / "model.pt")
    model = build_model(state["model_name"], state["num_classes"], state["in_channels"],
                        state.get("config", {}).get("experts", 0))
    model.load_state_dict(state["model"])
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


SAVED = ("logits", "labels", "index", "features")  # what eval.npz keeps of ``evaluate``'s output


def in_sample_order(result, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Per-sample arrays (``evaluate``'s output, or a saved ``eval.npz``) sorted into test-sample order: all of
    them, or ``keys``."""
    order = np.argsort(result["index"], kind="stable")
    names = keys or [k for k in (result.files if hasattr(result, "files") else result)
                     if np.ndim(result[k]) and len(result[k]) == len(order)]
    return {k: np.asarray(result[k])[order] for k in names}


def report_from_eval(result: dict[str, np.ndarray], class_counts: np.ndarray) -> dict:
    """Accuracy report from ``evaluate``'s per-sample output: its float32 predictions where it has them (the
    float16 logits could tie), else the argmax of its logits."""
    scores = "preds" if "preds" in result else "logits"
    ordered = in_sample_order(result, (scores, "labels"))
    return accuracy_report(ordered[scores], ordered["labels"], class_counts)


def finish(settings: Training, source: Source, model, tests: ViewLoader, out: Path, history: list, config: dict,
           device: torch.device, log, stage: str, name: str, inputs: dict | None = None,
           extra: dict | None = None, explain: Callable[[str], str] | None = None) -> dict:
    """Evaluate the final weights, write the outputs and, last, the manifest (teacher and student alike).
    With ``explain``, test logits that are not finite or beyond float16 stop the run before anything is written.

    ``eval.npz`` keeps the per-sample test logits in float16 (half the bytes: 398 MB rather than 795 MB at
    iNaturalist's 24,426 x 8,142); the accuracies here come from the float32 logits."""
    result = evaluate(model, tests.batches(), device, settings.bf16, settings.channels_last)
    if explain is not None:
        check_logits(result, explain)
    report = report_from_eval(result, source.class_counts)
    np.savez(out / "eval.npz", **{k: result[k] for k in SAVED if k in result})
    save_checkpoint(out / "model.pt", {"model": model.state_dict(), "model_name": settings.model,
                                       "num_classes": source.num_classes, "in_channels": source.in_channels,
                                       "config": settings.to_dict()})
    crop = tests.spec.size
    flops = gflops_per_image(model, (source.in_channels, crop, crop))
    metrics = {**report, "class_counts": source.class_counts.tolist(), "history": history, "gflops": flops,
               "experts": settings.experts or 1, **(extra or {})}
    write_json_atomic(out / "metrics.json", metrics)
    log(format_table({name: report}))
    summary = {**{k: report[k] for k in ("top1", "many", "medium", "few")}, "gflops": flops["total"],
               "experts": settings.experts or 1}
    if extra and "router" in extra:  # a routed RIDE student: its routed figures go in the manifest too
        summary["router"] = extra["router"]
    write_manifest(out, stage, config,
                   inputs={"train_samples": source.fingerprint(), "test_samples": source.test.fingerprint(),
                           **(inputs or {})},
                   outputs={"model.pt": sha256_file(out / "model.pt"), "eval.npz": sha256_file(out / "eval.npz")},
                   extra={"metrics": summary})
    return summary


# --- the complete runs of a dataset -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """A complete teacher or student under ``runs/``, described by its full resolved settings."""

    stage: str  # teacher | student
    path: Path
    method: str  # CE, BSCE (teacher), DiVE, RIDE, BSCE (teacher), RIDE-DiVE
    teacher: TeacherSettings  # the run's own (a teacher) or its cache's teacher (a student)
    settings: Training  # the run's own settings
    upstream: str  # a student's cache folder name; "" for a teacher
    metrics: dict
    cpu: str = ""  # the CPU it ran on ("" for a run that predates the record)

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def dataset(self) -> str:
        return self.teacher.dataset

    def changed(self) -> dict:
        """What differs from the dataset's defaults for this stage (seed, loss and mode are said elsewhere)."""
        return differences(self.settings, defaults_for(self.dataset).of(self.stage), skip=("seed", "loss", "mode"))

    def group_key(self) -> str:
        """Everything that identifies the run except its seed: runs with equal keys are seeds of one row. A
        student's teacher settings include the teacher's seed, so students of two teachers never share a row."""
        identity = {k: v for k, v in self.settings.identity().items() if k != "seed"}
        upstream = self.teacher.identity() if self.stage == "student" else None  # a teacher's is ``identity``
        return json.dumps([self.method, identity, self.upstream, upstream], sort_keys=True)


def collect_runs(runs: Path) -> list[RunRecord]:
    """Every complete teacher and student under ``runs`` (from their manifests; incomplete runs are skipped)."""
    records = []
    for manifest in sorted(runs.rglob(MANIFEST)):
        data = json.loads(manifest.read_text())
        stage = data.get("stage")
        if stage not in ("teacher", "student") or "metrics" not in data:
            continue
        config = data["config"]
        settings = settings_of(config, stage)
        teacher = settings_of(config, "teacher")
        ride = settings.is_ride
        if stage == "teacher":
            method = {"bsce": "BSCE (teacher)", "ce": "CE"}[settings.loss]
            method, upstream = (f"RIDE, {method}" if ride else method), ""
        else:
            method = "RIDE-DiVE" if ride else "DiVE"
            cache = config.get("cache_dir") or config.get("cache")  # runs before per-stage settings: "cache"
            upstream = Path(cache).name if isinstance(cache, str) else manifest.parent.parent.parent.name
        records.append(RunRecord(stage, manifest.parent, method, teacher, settings, upstream, data["metrics"],
                                 data.get("machine", {}).get("cpu", "")))
    return records
