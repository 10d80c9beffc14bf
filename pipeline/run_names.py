"""One run identity: a stage's resolved settings name its run folder.

A folder's name is readable (the stage, its seed, then what differs from the dataset's defaults) and ends in a
short hash of those differences, so equal resolved settings give one folder however they were spelled, and
different ones never share a folder. Make (through ``python3 -m stages.paths``) and the CLI both call these
functions; standard library only, like ``pipeline.settings``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .settings import CacheSettings, StudentSettings, TeacherSettings, defaults_for

_SHORT = {"power": "p", "alpha": "a", "batch_size": "batch", "model": "", "weight_decay": "wd",
          "warmup_epochs": "warmup"}
_NAME_BUDGET = 48  # characters of readable differences in a folder name; the hash covers all of them


def differences(settings, defaults, skip: tuple[str, ...] = ()) -> dict:
    """Identity keys whose value differs from ``defaults`` (minus ``skip``), in field order."""
    mine, base = settings.identity(), defaults.identity()
    return {k: v for k, v in mine.items() if k not in skip and v != base.get(k)}


def _token(key: str, value) -> str:
    if isinstance(value, list):
        value = ",".join(str(v) for v in value) or "none"
    elif isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, float):
        value = f"{value:g}"
    return f"{_SHORT.get(key, key)}{value}".replace("/", "_")


def settings_hash(diffs: dict) -> str:
    """Six hex digits of sha256 over the differences from the defaults (canonical JSON)."""
    return hashlib.sha256(json.dumps(diffs, sort_keys=True).encode()).hexdigest()[:6]


def run_name(base: str, diffs: dict) -> str:
    """``base``, then the differences as readable tokens (while they fit) and their hash; ``base`` alone
    for the defaults. Equal resolved settings give equal names, however they were spelled."""
    if not diffs:
        return base
    tokens, used = [], 0
    for key, value in diffs.items():
        token = _token(key, value)
        if used + len(token) > _NAME_BUDGET:
            break
        tokens.append(token)
        used += len(token) + 1
    return "-".join([base, *tokens, settings_hash(diffs)])


def dataset_tag(teacher: TeacherSettings) -> str:
    """A dataset's folder under runs/: its name, and the imbalance factor where it is not the default."""
    default = defaults_for(teacher.dataset).teacher.imbalance
    return teacher.dataset + ("" if teacher.imbalance == default else f"-if{teacher.imbalance:g}")


def teacher_name(teacher: TeacherSettings) -> str:
    base = defaults_for(teacher.dataset).teacher
    return run_name(f"teacher-{teacher.loss}-seed{teacher.seed}",
                    differences(teacher, base, skip=("loss", "seed", "dataset", "imbalance")))


def cache_name(teacher_folder: str, cache: CacheSettings, dataset: str) -> str:
    return run_name(f"cache-{teacher_folder}", differences(cache, defaults_for(dataset).cache))


def student_name(student: StudentSettings, dataset: str) -> str:
    base = f"dive-seed{student.seed}" + ("-online" if student.mode == "online" else "")
    return run_name(base, differences(student, defaults_for(dataset).student, skip=("seed", "mode")))


def teacher_dir(runs: Path, teacher: TeacherSettings) -> Path:
    """A teacher's run folder: ``runs/<dataset tag>/<teacher name>``."""
    return Path(runs) / dataset_tag(teacher) / teacher_name(teacher)


def cache_dir(teacher_folder: Path, cache: CacheSettings, dataset: str) -> Path:
    """A cache's folder, beside its teacher's."""
    teacher_folder = Path(teacher_folder)
    return teacher_folder.parent / cache_name(teacher_folder.name, cache, dataset)


def student_dir(cache_folder: Path, student: StudentSettings, dataset: str) -> Path:
    """A student's run folder, under its cache: ``<cache>/students/<student name>``."""
    return Path(cache_folder) / "students" / student_name(student, dataset)
