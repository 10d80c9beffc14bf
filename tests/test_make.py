"""The Makefile's variables: each reaches its own stage only, and a dry run tells the truth about what would run.

Every variable the Makefile defines must appear in ``OWNER`` below, so a new variable cannot be added without
saying which stage it belongs to. ``make plan`` prints each stage's folder and resolved settings (what differs
from the defaults, and the runtime keys); a variable may change only its own stage's lines, plus the folders
below a changed teacher or cache, which are named after it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from .conftest import REPO

# variable -> (what it reaches, a value to try). Stages: teacher, cache, student. "runtime": recorded only.
# "elsewhere": a target other than the three stages (inspect, sweep, flatness) or where files live.
OWNER = {
    "DATASET": ("teacher", "cifar100-lt"), "IF": ("teacher", "10"), "CLASSES": ("teacher", "50"),
    "LOSS": ("teacher", "ce"),
    "TEACHER_SEED": ("teacher", "1"), "TEACHER_EPOCHS": ("teacher", "7"), "TEACHER_LR": ("teacher", "0.05"),
    "TEACHER_BATCH": ("teacher", "64"), "TEACHER_MODEL": ("teacher", "ride"),
    "TEACHER_EXPERTS": ("teacher", "3"), "TEACHER_SET": ("teacher", "gamma=0.1"),
    "VIEWS": ("cache", "8"), "CODEC": ("cache", "int8"), "CACHE_SET": ("cache", "view_seed=3"),
    "PLAN": ("elsewhere", "1"), "REPAIR": ("elsewhere", "1"), "CACHE_URL": ("elsewhere", "s3://bucket/dive"),
    "REPLAY": ("elsewhere", "64"),
    "TAU": ("student", "6"), "POWER": ("student", "1"), "ALPHA": ("student", "0.3"), "MODE": ("student", "online"),
    "STUDENT_SEED": ("student", "2"), "STUDENT_EPOCHS": ("student", "7"), "STUDENT_LR": ("student", "0.05"),
    "STUDENT_BATCH": ("student", "64"), "STUDENT_MODEL": ("student", "ride"), "STUDENT_EXPERTS": ("student", "3"),
    "STUDENT_SET": ("student", "gamma=0.1"),
    "WORKERS": ("runtime", "1"), "DEVICE": ("runtime", "cpu"), "NPROC": ("runtime", "2"),
    "NNODES": ("runtime", "2"), "RDZV": ("runtime", "127.0.0.1:29400"), "LOCAL_ADDR": ("runtime", "127.0.0.1"),
    "DATA_ROOT": ("elsewhere", "/srv/data"), "RUNS": ("elsewhere", "other"), "PYTHON": ("elsewhere", "python3"),
    "VENV": ("elsewhere", ".venv"), "AT": ("elsewhere", "2,1"), "FLATNESS": ("elsewhere", "0.5"),
    "HEAD_CLASS": ("elsewhere", "1"), "TAIL_CLASS": ("elsewhere", "9"), "TAUS": ("elsewhere", "1 3"),
    "POWERS": ("elsewhere", "1"), "SEEDS": ("elsewhere", "0 1"),
}
NEEDS = {"TEACHER_EXPERTS": {"TEACHER_MODEL": "ride"}, "STUDENT_EXPERTS": {"STUDENT_MODEL": "ride"}}
STAGES = ("teacher", "cache", "student")


def make(*args: str, runs, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "--no-print-directory", *args, f"RUNS={runs}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    if check and proc.returncode:
        raise AssertionError(f"make {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def plan(runs, **variables) -> dict[str, dict[str, str]]:
    """``make plan``'s folder, settings and runtime line for each stage."""
    out = make("-s", "plan", *(f"{k}={v}" for k, v in variables.items()), runs=runs).stdout.splitlines()
    stages = {}
    for i, line in enumerate(out):
        name = line.split()[0] if line and not line[0].isspace() else None
        if name in STAGES:
            stages[name] = {"folder": line.split()[-1], "settings": out[i + 1].strip(), "runtime": out[i + 2].strip()}
    assert set(stages) == set(STAGES), out
    return stages


def defined_variables() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([A-Z][A-Z_]*)\s*\?=", text, flags=re.M))


def test_every_make_variable_is_classified():
    assert defined_variables() == set(OWNER)


@pytest.mark.parametrize("variable", sorted(OWNER))
def test_a_variable_reaches_its_own_stage_only(variable, tmp_path):
    owner, value = OWNER[variable]
    if variable == "RUNS":  # every folder moves under the new root; no setting changes
        base, moved = plan(tmp_path), plan(tmp_path / "other")
        for stage in STAGES:
            assert moved[stage]["folder"] == base[stage]["folder"].replace(str(tmp_path), str(tmp_path / "other"), 1)
            assert (moved[stage]["settings"], moved[stage]["runtime"]) == (base[stage]["settings"],
                                                                           base[stage]["runtime"])
        return
    extra = NEEDS.get(variable, {})
    base, changed = plan(tmp_path, **extra), plan(tmp_path, **extra, **{variable: value})
    if owner in STAGES:
        # the owner's resolved settings change; no other stage's settings or runtime do
        assert changed[owner]["settings"] != base[owner]["settings"] or variable in ("DATASET", "IF")
        for stage in STAGES:
            if stage != owner:
                assert changed[stage]["settings"] == base[stage]["settings"], (variable, stage)
            assert changed[stage]["runtime"] == base[stage]["runtime"], (variable, stage)
        # upstream folders stay: a cache or student setting never names a new teacher (or cache)
        for stage in STAGES[:STAGES.index(owner)]:
            assert changed[stage]["folder"] == base[stage]["folder"], (variable, stage)
        assert changed[owner]["folder"] != base[owner]["folder"], variable
    else:
        for stage in STAGES:
            assert changed[stage]["folder"] == base[stage]["folder"], (variable, stage)
            assert changed[stage]["settings"] == base[stage]["settings"], (variable, stage)
            if owner == "elsewhere" or variable != "WORKERS":
                assert changed[stage]["runtime"] == base[stage]["runtime"], (variable, stage)
            else:
                assert "workers=1" in changed[stage]["runtime"]


def stage_commands(text: str) -> list[str]:
    return re.findall(r"stages\.cli (teacher|cache|student)\b", text)


def test_a_dry_run_after_teacher_and_cache_shows_only_the_students_run(tmp_path):
    base = plan(tmp_path)
    stamp = tmp_path / "venv" / ".installed"  # an installed venv, so that only the stages are in question
    stamp.parent.mkdir()
    stamp.touch()
    venv = f"VENV={stamp.parent}"
    manifests = [f"{base[stage]['folder']}/manifest.json" for stage in ("teacher", "cache")]
    for path in manifests:  # as a finished `make teacher cache` leaves them, for Make's eyes
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            json.dump({}, handle)
    assert make("-q", *manifests, venv, runs=tmp_path, check=False).returncode == 0  # up to date
    assert make("-q", *manifests, venv, "STUDENT_EPOCHS=3", runs=tmp_path, check=False).returncode == 0
    for variable in [v for v, (owner, _) in OWNER.items() if owner == "student"]:
        value = OWNER[variable][1]
        extra = [f"{k}={v}" for k, v in NEEDS.get(variable, {}).items()]
        out = make("-n", "teacher", "cache", "student", f"{variable}={value}", *extra, venv, runs=tmp_path).stdout
        assert stage_commands(out) == ["student"], (variable, out)
    out = make("-n", "teacher", "cache", "student", "VIEWS=8", venv, runs=tmp_path).stdout
    assert stage_commands(out) == ["cache", "student"]
    out = make("-n", "teacher", "cache", "student", "TEACHER_EPOCHS=7", venv, runs=tmp_path).stdout
    assert stage_commands(out) == ["teacher", "cache", "student"]
    out = make("-n", "teacher", "cache", "student", "NPROC=2", "WORKERS=1", venv, runs=tmp_path).stdout
    assert stage_commands(out) == ["student"] and "torchrun" in out
    assert "pip install" not in out and len(out.strip().splitlines()) == 3  # two "Nothing to be done", one run


@pytest.mark.parametrize("variable,use", [("EPOCHS", "TEACHER_EPOCHS= for the teacher or STUDENT_EPOCHS="),
                                          ("LR", "TEACHER_LR="), ("BATCH", "STUDENT_BATCH="),
                                          ("MODEL", "TEACHER_MODEL="), ("EXPERTS", "STUDENT_EXPERTS="),
                                          ("SET", "CACHE_SET="), ("SEED", "TEACHER_SEED="), ("NAME", "--out")])
def test_variables_that_reached_several_stages_are_refused(variable, use, tmp_path):
    proc = make("-n", "student", f"{variable}=2", runs=tmp_path, check=False)
    assert proc.returncode != 0 and use in proc.stderr and "stages.cli" not in proc.stdout


def test_a_misplaced_key_stops_make_before_anything_runs(tmp_path):
    proc = make("-n", "student", "STUDENT_SET=loss=ce", runs=tmp_path, check=False)
    assert proc.returncode != 0 and "'loss' is not a student setting" in proc.stderr and "LOSS=" in proc.stderr
