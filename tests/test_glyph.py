"""glyph-lt: GB2312 characters rendered in Debian's CJK fonts, long-tailed, rendered once into a fingerprinted
file; and a small run of it through teacher, cache and student."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.sources import DataError, class_groups, load_source, longtail_counts
from pipeline.data.sources import glyph, glyph_render as render

from .conftest import run_cli

pytestmark = pytest.mark.skipif(not all(Path(s.path).is_file() for s in render.STYLES),
                                reason="CJK fonts missing: make test installs them (" + " ".join(render.PACKAGES) + ")")


def test_the_classes_are_gb2312_level_1_in_code_order():
    assert render.gb2312_level1(5) == "啊阿埃挨哎"
    chars = render.gb2312_level1(render.LEVEL1)
    assert len(chars) == len(set(chars)) == 3755 and chars[-1] == "座"
    with pytest.raises(DataError, match="1 to 3755"):
        render.gb2312_level1(3756)


def test_rendering_is_a_pure_function_of_the_seed():
    chars = render.gb2312_level1(3)
    covering = render.coverage(chars)
    assert covering.all(axis=1).any() and covering.shape == (3, len(render.STYLES))
    a = render.render(chars[1], covering[1], (1, 0, 1, 7))
    assert a.shape == (32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, render.render(chars[1], covering[1], (1, 0, 1, 7)))
    assert not np.array_equal(a, render.render(chars[1], covering[1], (1, 0, 1, 8)))
    assert not np.array_equal(a, render.render(chars[1], covering[1], (1, 1, 1, 7)))  # a test seed
    assert a.max() > 150 and np.median(a) < 60  # bright strokes on dark paper


def test_every_style_is_used_only_where_its_font_has_the_character():
    chars = "们这是的"  # simplified forms that Japanese fonts may lack
    covering = render.coverage(chars)
    assert covering.any(axis=1).all()
    names = [s.name for s in render.STYLES]
    assert covering[:, names.index("noto-sans")].all() and covering[:, names.index("wqy-zenhei")].all()


def test_counts_follow_the_long_tail_over_a_shuffled_class_order_and_fill_every_group():
    counts = glyph.train_counts(300, 100)
    assert sorted(counts.tolist()) == sorted(longtail_counts(300, glyph.N_MAX, 100).tolist())
    assert counts.sum() == 9562 and counts.max() == 150 and counts.min() == 1
    assert not np.array_equal(counts, np.sort(counts)[::-1])  # not head-first in character order
    groups = class_groups(counts)
    assert all(groups[g].sum() > 0 for g in ("many", "medium", "few"))
    assert {g: int(groups[g].sum()) for g in groups} == {"many": 26, "medium": 105, "few": 169}


def test_a_rendered_set_is_balanced_at_test_time_reproducible_and_fingerprinted(tmp_path):
    source = load_source("glyph-lt", tmp_path, imbalance=10, classes=20)
    assert source.num_classes == 20 and source.class_names[:3] == ("啊", "阿", "埃")
    assert np.array_equal(source.class_counts, glyph.train_counts(20, 10))
    assert np.array_equal(np.bincount(source.test.labels), np.full(20, glyph.TEST_PER_CLASS))
    path = tmp_path / glyph.file_name(20, 10)
    meta = json.loads(str(np.load(path)["meta"]))
    assert meta["freetype"] and meta["pillow"] and len(meta["fonts"]) == len(render.STYLES)
    again = tmp_path / "again"
    assert np.array_equal(load_source("glyph-lt", again, 10, 20).train.images, source.train.images)
    assert glyph.sha256_file(again / path.name) == glyph.sha256_file(path)  # same machine, same bytes
    assert source.fingerprint() != load_source("glyph-lt", tmp_path, 10, 21).fingerprint()


def test_a_changed_rendered_file_is_refused(tmp_path):
    load_source("glyph-lt", tmp_path, 10, 10)
    path = tmp_path / glyph.file_name(10, 10)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its fingerprint") as error:
        load_source("glyph-lt", tmp_path, 10, 10)
    assert str(path) in str(error.value) and "Delete it" in str(error.value)


def test_a_missing_font_names_its_debian_package(tmp_path):
    missing = render.Style("phantom", "fonts-phantom-cjk", str(tmp_path / "phantom.ttc"))
    with pytest.raises(DataError, match=r"apt-get install fonts-phantom-cjk") as error:
        render.check_fonts((*render.STYLES, missing))
    assert str(tmp_path / "phantom.ttc") in str(error.value)


def test_out_of_range_settings_name_the_valid_range(tmp_path):
    with pytest.raises(DataError, match="classes=5000 is out of range: 2 to 3755"):
        load_source("glyph-lt", tmp_path, 100, 5000)
    with pytest.raises(DataError, match="imbalance=500 is out of range: 1 to 150"):
        load_source("glyph-lt", tmp_path, 500, 50)
    with pytest.raises(DataError, match="fmnist-lt has a fixed class count"):
        load_source("fmnist-lt", None, 100, 50)


def test_a_small_run_through_teacher_cache_and_student(tmp_path):
    data, teacher, cache, student = (tmp_path / k for k in ("data", "teacher", "cache", "student"))
    short = ["--set", "epochs=3", "--set", "warmup_epochs=1", "--set", "milestones=2"]
    common = ["--data-root", str(data)]
    run_cli("teacher", "--dataset", "glyph-lt", "--set", "classes=50", *short, *common, "--out", str(teacher))
    run_cli("cache", "--teacher", str(teacher), "--set", "views=3", *common, "--out", str(cache))
    run_cli("student", "--cache", str(cache), *short, *common, "--out", str(student))
    metrics = json.loads((student / "metrics.json").read_text())
    assert 0 < metrics["top1"] <= 100 and json.loads((teacher / "config.json").read_text())["teacher"]["classes"] == 50
    assert (data / glyph.file_name(50, 100)).is_file()  # rendered once, read by every stage


def test_figures_show_look_alike_characters_in_a_cjk_font(tmp_path):
    from matplotlib import rcParams

    from stages.analysis import showcase, use_font_for

    source = load_source("glyph-lt", tmp_path, 100, 50)
    picked = showcase(source, 50)
    assert "".join(source.class_names[c] for c in picked) == glyph.SHOWCASE  # 巴 and characters built on it
    groups = class_groups(source.class_counts)
    assert all(any(groups[g][c] for c in picked) for g in ("many", "medium", "few"))
    assert showcase(source, 49) == []  # runs of another class count: no proposal
    use_font_for(["巴", "吧"])
    assert rcParams["font.sans-serif"][0] == "WenQuanYi Zen Hei"
