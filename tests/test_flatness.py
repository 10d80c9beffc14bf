"""The two-class flatness experiment (Appendix A): the R formula, the smoothed labels, and the target end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis.flatness import smoothed_targets, virtual_ratio

from .conftest import needs_fmnist, run_cli


@pytest.mark.parametrize("n_head, n_tail, eps, expected", [
    (5000, 500, 0.0, 0.1),           # no smoothing: the real ratio 500/5000
    (5000, 500, 0.1, 1000 / 4500),   # (500 + 500) / (5000 - 500)
    (5000, 50, 0.4, 2050 / 3000),    # (50 + 2000) / (5000 - 2000)
    (500, 50, 0.3, 200 / 350),       # (50 + 150) / (500 - 150)
])
def test_virtual_ratio_by_hand(n_head, n_tail, eps, expected):
    assert virtual_ratio(n_head, n_tail, eps) == pytest.approx(expected, rel=1e-12)


def test_virtual_ratio_refuses_eps_outside_unit_interval():
    with pytest.raises(ValueError, match="eps"):
        virtual_ratio(10, 1, 1.0)


def test_smoothed_targets_and_their_mass_give_r():
    is_head = np.array([True] * 6 + [False] * 2)
    targets = smoothed_targets(is_head, 0.25)
    np.testing.assert_allclose(targets[:6], [[0.75, 0.25]] * 6)
    np.testing.assert_allclose(targets[6:], [[0.0, 1.0]] * 2)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0)
    # the virtual distribution is the column sums of the labels: tail over head is R
    head_mass, tail_mass = targets.sum(axis=0)
    assert tail_mass / head_mass == pytest.approx(virtual_ratio(6, 2, 0.25))


@needs_fmnist
def test_flatness_target_writes_table_and_figure_and_resumes(tmp_path):
    out = tmp_path / "flat"
    args = ["flatness", "--out", str(out), "--sizes", "200/20", "--eps", "0", "--eps", "0.4",
            "--runs", "2", "--steps", "30"]
    first = run_cli(*args)
    assert "4 of 4 runs to go" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert [r["eps"] for r in rows] == [0.0, 0.4]
    assert rows[1]["R"] == pytest.approx((20 + 80) / 120)
    saved = json.loads((out / "results.json").read_text())["results"]
    for r in rows:  # each row is the mean of its saved runs, each run a count of the 1000 test images a class has
        runs = [saved[f"200/20/eps{r['eps']:g}/run{k}"] for k in range(2)]
        for part in ("head", "tail"):
            assert r[part] == pytest.approx(np.mean([x[part] for x in runs]), abs=1e-9)
            assert all(abs(x[part] * 10 - round(x[part] * 10)) < 1e-6 for x in runs)
    assert (out / "flatness.png").stat().st_size > 10_000
    assert "| 200 / 20 | 0.4 | 0.833 |" in (out / "flatness.md").read_text()
    second = run_cli(*args)  # everything is saved: nothing to rerun, same table
    assert "0 of 4 runs to go" in second.stdout
    assert json.loads((out / "summary.json").read_text())["rows"] == rows


def test_flatness_refuses_one_class_twice(tmp_path):
    proc = run_cli("flatness", "--out", str(tmp_path), "--head", "3", "--tail", "3", check=False)
    assert proc.returncode == 2 and "two different Fashion-MNIST classes" in proc.stderr
