"""make tsne / make samples: which runs they pick, which images they show, and both targets end to end on run
folders written here (the stages only read each run's manifest, metrics.json and eval.npz)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.data.sources.base import longtail_counts
from pipeline.settings import student_settings, teacher_settings
from stages.analysis import default_classes, pick_models, pick_samples
from store.manifest import ArtifactError

from .conftest import needs_fmnist, run_cli

COUNTS = longtail_counts(10, 500, 100)  # fmnist-lt: 500 299 179 107 | 64 38 23 | 13 8 5


def fake_run(folder, stage, config, labels, logits, features=None):
    """A complete run folder as the teacher / student stages leave it; ``config`` holds the teacher's
    overrides under "teacher" and the student's under "student"."""
    folder.mkdir(parents=True)
    saved = {"stage": stage, "teacher": teacher_settings("fmnist-lt", config["teacher"]).identity()}
    if stage == "student":
        saved["student"] = student_settings("fmnist-lt", config["student"]).identity()
    metrics = {"top1": 50.0, "many": 50.0, "medium": 50.0, "few": 50.0}
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "config": saved, "metrics": metrics}))
    (folder / "metrics.json").write_text(json.dumps({**metrics, "class_counts": COUNTS.tolist()}))
    arrays = {"logits": logits.astype(np.float32), "labels": labels, "index": np.arange(len(labels))[::-1].copy()}
    arrays = {k: v[::-1].copy() if k != "index" else v for k, v in arrays.items()}  # saved out of order
    if features is not None:
        arrays["features"] = features[::-1].astype(np.float16)
    np.savez(folder / "eval.npz", **arrays)


def one_hot_logits(pred, classes=10):
    logits = np.zeros((len(pred), classes))
    logits[np.arange(len(pred)), pred] = 5.0
    return logits


def make_runs(root, labels, preds, features=None):
    cache = root / "cache-teacher-bsce-seed0"
    fake_run(root / "teacher-ce-seed0", "teacher", {"teacher": {"loss": "ce"}}, labels, one_hot_logits(preds["CE"]),
             features)
    fake_run(root / "teacher-ce-seed1", "teacher", {"teacher": {"loss": "ce", "seed": 1}}, labels,
             one_hot_logits(labels))
    fake_run(root / "teacher-bsce-seed0", "teacher", {"teacher": {}}, labels, one_hot_logits(preds["BSCE"]), features)
    fake_run(cache / "students" / "dive-seed0-tau9-p1-0a1b2c", "student",
             {"teacher": {}, "student": {"tau": 9.0, "power": 1.0}}, labels, one_hot_logits(labels))
    fake_run(cache / "students" / "dive-seed0", "student", {"teacher": {}, "student": {}}, labels,
             one_hot_logits(preds["DiVE"]), features)


def test_pick_models_takes_lowest_seed_and_the_recipe_student(tmp_path):
    labels = np.arange(20) % 10
    make_runs(tmp_path, labels, {m: labels for m in ("CE", "BSCE", "DiVE")})
    picked = pick_models(tmp_path)
    assert picked["CE"].name == "teacher-ce-seed0"
    assert picked["BSCE"].name == "teacher-bsce-seed0"
    assert picked["DiVE"].name == "dive-seed0"  # tau 3, p 0.5, alpha 0.5: the fmnist-lt recipe's settings
    other = tmp_path / "cache-teacher-bsce-seed0" / "students" / "dive-seed0-tau9-p1-0a1b2c"
    assert pick_models(tmp_path, {"DiVE": other})["DiVE"] == other


def test_pick_models_names_what_is_missing(tmp_path):
    labels = np.arange(20) % 10
    fake_run(tmp_path / "teacher-bsce-seed0", "teacher", {"teacher": {}}, labels, one_hot_logits(labels))
    with pytest.raises(ArtifactError, match="no complete CE, DiVE run.*make teacher LOSS=ce"):
        pick_models(tmp_path)


def test_default_classes_one_per_group():
    assert COUNTS.tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    # the member at position len // 2 by falling count: Many {0,1,2,3} -> 2, Medium {4,5,6} -> 5, Few {7,8,9} -> 8
    assert default_classes(COUNTS) == [2, 5, 8]


def test_pick_samples_by_hand():
    labels = np.array([0, 9, 9, 5, 0, 9, 5])
    preds = {"DiVE": np.array([0, 9, 9, 5, 1, 9, 5]),  # sample 4: DiVE wrong -> never shown
             "CE":   np.array([1, 9, 8, 4, 2, 8, 4]),
             "BSCE": np.array([0, 9, 8, 5, 2, 9, 4])}
    evals = {m: {"logits": one_hot_logits(p)} for m, p in preds.items()}
    # candidates: 0 (class 0, CE wrong), 2 (class 9, both wrong), 3 (class 5, CE wrong), 5 (class 9, CE wrong),
    # 6 (class 5, both wrong). Classes rarest first: 9 (5 images), 5, 0; both-wrong first within a class.
    picked, total = pick_samples(evals, labels, COUNTS, 10)
    assert picked.tolist() == [2, 6, 0, 5, 3] and total == 5
    picked, total = pick_samples(evals, labels, COUNTS, 2)
    assert picked.tolist() == [2, 6] and total == 5


@needs_fmnist
def test_samples_target_end_to_end(tmp_path):
    from pipeline.data.sources.fmnist import load_full

    labels = load_full()[1].labels
    rng = np.random.default_rng(0)
    wrong = (labels + 1) % 10
    chosen = rng.choice(len(labels), 30, replace=False)
    ce = labels.copy()
    ce[chosen] = wrong[chosen]
    make_runs(tmp_path, labels, {"CE": ce, "BSCE": labels, "DiVE": labels})
    run_cli("samples", "--runs", str(tmp_path), "--limit", "12")
    out = json.loads((tmp_path / "analysis" / "samples.json").read_text())
    assert out["count"] == 30 and len(out["rows"]) == 12
    assert {r["test_index"] for r in out["rows"]} <= set(chosen.tolist())
    assert (tmp_path / "analysis" / "samples.png").stat().st_size > 20_000
    assert out["models"]["DiVE"].endswith("dive-seed0")


@needs_fmnist
def test_tsne_target_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    centres = rng.normal(size=(10, 16)) * 4
    features = centres[labels] + rng.normal(size=(300, 16))
    make_runs(tmp_path, labels, {m: labels for m in ("CE", "BSCE", "DiVE")}, features)
    run_cli("tsne", "--runs", str(tmp_path))
    out = json.loads((tmp_path / "analysis" / "tsne.json").read_text())
    assert out["classes"] == [2, 5, 8]
    for method in ("CE", "BSCE", "DiVE"):
        assert out["scores"][method]["silhouette_features"] > 0.5  # well separated clusters stay separated
        assert out["scores"][method]["acc_8"] == 100.0
    assert (tmp_path / "analysis" / "tsne.png").stat().st_size > 20_000
    assert "| DiVE | dive-seed0 |" in (tmp_path / "analysis" / "tsne.md").read_text()


def test_report_and_shift_eval_list_every_run(tmp_path):
    """Five runs: two CE seeds (one row), a BSCE teacher, and students of two settings (a row each). A sixth
    folder holding an alpha-sweep student of the same tau, p and seed as another must not overwrite it."""
    labels = np.repeat(np.arange(10), 4)
    make_runs(tmp_path, labels, {m: labels for m in ("CE", "BSCE", "DiVE")})
    fake_run(tmp_path / "cache-teacher-bsce-seed0" / "students" / "dive-seed0-a0.8-123456", "student",
             {"teacher": {}, "student": {"alpha": 0.8}}, labels, one_hot_logits(labels))
    run_cli("shift-eval", "--runs", str(tmp_path))
    rows = json.loads((tmp_path / "shift_eval.json").read_text())
    assert len(rows) == 6 and all((tmp_path / key / "eval.npz").is_file() for key in rows)
    assert {r["model"] for r in rows.values()} >= {"DiVE tau 3 p 0.5 alpha 0.8, seed 0",
                                                   "DiVE tau 3 p 0.5 alpha 0.5, seed 0",
                                                   "DiVE tau 9 p 1 alpha 0.5, seed 0"}
    report = run_cli("report", "--runs", str(tmp_path)).stdout
    assert "6 runs in 5 rows" in report
    assert "| CE | resnet32, 200 ep; defaults | - | 0,1 |" in report
    assert "| DiVE | tau 3, p 0.5, alpha 0.8; resnet32, 200 ep; defaults | cache-teacher-bsce-seed0 | 0 |" in report
    assert "Machine: not recorded (6 runs)." in report  # these manifests predate the machine record
    manifest = tmp_path / "teacher-ce-seed0" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "machine": {"cpu": "Some CPU 9000"}}))
    report = run_cli("report", "--runs", str(tmp_path)).stdout
    assert "Machines: Some CPU 9000 (1 run), not recorded (5 runs)." in report
    assert "compare rows from one machine" in report
