"""Per-stage settings: the paper's defaults, strict typed overrides, keys that belong to one stage only, and
the one function that names run folders."""
import math

import pytest

from pipeline.data.views import KINDS
from pipeline.run_names import cache_dir, student_dir, teacher_dir
from pipeline.settings import (AUG_KINDS, DATASETS, STAGES, ConfigError, cache_settings, keys_of, resolve,
                               student_settings, teacher_settings)
from pipeline.train.loop import lr_at


def test_cifar_and_fmnist_defaults_follow_the_paper():
    for name in ("fmnist-lt", "cifar100-lt"):
        t, c, s = (DATASETS[name].of(stage) for stage in STAGES)
        for r in (t, s):
            assert (r.model, r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay) == \
                ("resnet32", 200, 128, 0.1, 0.9, 2e-4)
            assert (r.warmup_epochs, r.milestones, r.gamma, r.schedule) == (5, (120, 160), 0.01, "step")
        assert (t.aug, t.crop_size, t.pad, t.loss) == ("pad_crop", 32, 4, "bsce")
        assert (c.views, c.view_seed, c.codec) == (200, 1, "float16")
        assert (s.tau, s.power, s.alpha, s.mode) == (3.0, 0.5, 0.5, "cached")


def test_imagenet_and_inat_defaults_follow_the_paper():
    im = DATASETS["imagenet-lt"]
    assert (im.teacher.model, im.teacher.epochs, im.teacher.batch_size, im.teacher.lr, im.teacher.weight_decay,
            im.teacher.schedule) == ("resnext50_32x4d", 90, 512, 0.2, 5e-4, "cosine")
    assert (im.teacher.aug, im.teacher.crop_size, im.teacher.resize, im.teacher.jitter > 0) == \
        ("short_side_crop", 224, 256, True)
    assert (im.student.tau, im.student.power, im.student.alpha, im.cache.views) == (9.0, 1.0, 0.5, 10)
    nat = DATASETS["inat2018"]
    assert (nat.teacher.model, nat.teacher.epochs, nat.teacher.batch_size, nat.teacher.lr) == ("resnet50", 90, 256, 0.1)
    assert (nat.teacher.aug, nat.teacher.crop_size) == ("resized_crop", 224)
    assert (nat.student.tau, nat.student.power, nat.student.alpha, nat.cache.views) == (2.0, 0.5, 0.5, 8)
    assert teacher_settings("inat2018", ["epochs=200"]).epochs == 200


def test_view_kinds_agree_with_the_view_module():
    assert AUG_KINDS == KINDS  # settings import no torch, so they keep their own copy of the names


def test_overrides_are_typed_and_strict():
    t = teacher_settings("fmnist-lt", ["epochs=7", "lr=0.05", "milestones=3,5", "bf16=false", "loss=ce"])
    assert (t.epochs, t.lr, t.milestones, t.bf16, t.loss) == (7, 0.05, (3, 5), False, "ce")
    with pytest.raises(ConfigError, match="unknown teacher setting 'epoch'"):
        teacher_settings("fmnist-lt", ["epoch=7"])
    with pytest.raises(ConfigError, match="not a valid int"):
        teacher_settings("fmnist-lt", ["epochs=seven"])
    with pytest.raises(ConfigError, match="key=value"):
        teacher_settings("fmnist-lt", ["epochs"])
    with pytest.raises(ConfigError, match="loss must be one of bsce, ce"):
        teacher_settings("fmnist-lt", ["loss=focal"])
    with pytest.raises(ConfigError, match="known datasets: fmnist-lt"):
        teacher_settings("mnist")
    with pytest.raises(ConfigError, match="views must be at least 1"):
        cache_settings("fmnist-lt", ["views=0"])
    with pytest.raises(ConfigError, match="needs a RIDE model"):
        student_settings("fmnist-lt", ["experts=3"])


def test_a_key_of_another_stage_names_its_stage_and_variable():
    with pytest.raises(ConfigError, match=r"'tau' is not a teacher setting: it belongs to the student stage \(set "
                                          r"it with TAU="):
        teacher_settings("fmnist-lt", ["tau=6"])
    with pytest.raises(ConfigError, match="'loss' is not a student setting.*teacher stage.*LOSS="):
        student_settings("fmnist-lt", ["loss=ce"])
    with pytest.raises(ConfigError, match="'views' is not a student setting.*cache stage.*VIEWS="):
        student_settings("fmnist-lt", ["views=8"])
    with pytest.raises(ConfigError, match="'epochs' is not a cache setting.*teacher stage.*TEACHER_EPOCHS=.*"
                                          "student stage.*STUDENT_EPOCHS="):
        cache_settings("fmnist-lt", ["epochs=3"])
    with pytest.raises(ConfigError, match="'diversity' is not a student setting.*TEACHER_SET=\"diversity=...\""):
        student_settings("fmnist-lt", ["diversity=-0.1"])


def test_every_stage_owns_its_keys_and_shares_only_training_ones():
    teacher, cache, student = (set(keys_of(s)) for s in STAGES)
    runtime = {"workers", "prefetch", "bf16", "channels_last"}
    assert cache & teacher == cache & student == {"batch_size"} | runtime
    assert {"tau", "power", "alpha", "mode", "router_epochs", "router_threshold"} <= student - teacher
    assert {"loss", "diversity", "aug", "crop_size", "imbalance", "dataset"} <= teacher - student
    assert {"views", "view_seed", "codec", "expert_logits"} <= cache - teacher - student


def test_runtime_keys_are_recorded_but_not_identity():
    plain, other = cache_settings("fmnist-lt"), cache_settings("fmnist-lt", ["batch_size=1024", "workers=1"])
    assert plain.identity() == other.identity() and plain.runtime() != other.runtime()
    assert "batch_size" not in plain.identity() and other.runtime()["batch_size"] == 1024
    t = teacher_settings("fmnist-lt", ["bf16=false", "channels_last=false", "eval_every=5", "prefetch=0"])
    assert t.identity() == teacher_settings("fmnist-lt").identity()


def test_one_name_per_resolved_settings():
    runs = teacher_dir("runs", teacher_settings("fmnist-lt"))
    assert str(runs) == "runs/fmnist-lt/teacher-bsce-seed0"
    # spelled two ways, resolved the same: one folder
    a = teacher_dir("runs", teacher_settings("fmnist-lt", ["milestones=3,5", "epochs=10", "lr=0.050"]))
    b = teacher_dir("runs", teacher_settings("fmnist-lt", ["epochs=10", "milestones=3 5", "lr=5e-2"]))
    assert a == b and a.name.startswith("teacher-bsce-seed0-epochs10-lr0.05-milestones3,5-")
    assert len(a.name.rsplit("-", 1)[1]) == 6  # the hash of what differs
    assert teacher_dir("runs", teacher_settings("fmnist-lt", ["epochs=11"])) != a
    # settings equal to the defaults name the default folder; runtime keys never change a name
    assert teacher_dir("runs", teacher_settings("fmnist-lt", ["epochs=200", "workers=1"])) == runs
    assert str(teacher_dir("runs", teacher_settings("fmnist-lt", ["imbalance=10"]))).startswith(
        "runs/fmnist-lt-if10/teacher-bsce-seed0")
    c = cache_dir(runs, cache_settings("fmnist-lt", ["batch_size=1024"]), "fmnist-lt")
    assert str(c) == "runs/fmnist-lt/cache-teacher-bsce-seed0"
    s = student_dir(c, student_settings("fmnist-lt", ["tau=3", "power=0.5", "alpha=0.5"]), "fmnist-lt")
    assert str(s) == "runs/fmnist-lt/cache-teacher-bsce-seed0/students/dive-seed0"  # the defaults, spelled out
    online = student_dir(c, student_settings("fmnist-lt", ["mode=online", "seed=2", "tau=6"]), "fmnist-lt")
    assert online.name.startswith("dive-seed2-online-tau6-")


def test_long_differences_keep_a_bounded_readable_name_and_a_full_hash():
    many = ["epochs=10", "lr=0.05", "milestones=3,5,7", "weight_decay=0.001", "momentum=0.8", "gamma=0.5",
            "warmup_epochs=2"]
    a = teacher_dir("runs", teacher_settings("fmnist-lt", many))
    b = teacher_dir("runs", teacher_settings("fmnist-lt", [*many[:-1], "warmup_epochs=3"]))
    assert len(a.name) <= 80 and a != b


def test_step_schedule_with_warmup():
    r = teacher_settings("fmnist-lt")
    assert [lr_at(r, e) for e in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lr_at(r, 119) == pytest.approx(0.1)
    assert lr_at(r, 120) == pytest.approx(1e-3)
    assert lr_at(r, 160) == pytest.approx(1e-5)


def test_cosine_schedule_by_epoch():
    r = resolve("student", "inat2018", ["warmup_epochs=0"])  # the cosine alone (the warm-up: test_training)
    assert lr_at(r, 0) == pytest.approx(0.1)
    assert lr_at(r, 45) == pytest.approx(0.05)
    assert lr_at(r, 89) == pytest.approx(0.5 * 0.1 * (1 + math.cos(math.pi * 89 / 90)))


def test_a_run_saved_before_a_setting_existed_is_still_that_run(tmp_path):
    import json

    from stages.artifacts import prepare_run_dir

    identity = {"stage": "teacher", "teacher": teacher_settings("fmnist-lt", ["epochs=3"]).identity()}
    old = {**identity, "teacher": {k: v for k, v in identity["teacher"].items() if k != "warmup"}}
    (tmp_path / "config.json").write_text(json.dumps(old))  # as a run made before warmup= existed
    (tmp_path / "manifest.json").write_text("{}")
    assert prepare_run_dir(tmp_path, identity) is True  # the default warm-up is what it ran with
    other = {**identity, "teacher": {**identity["teacher"], "warmup": "step"}}
    with pytest.raises(Exception, match="other settings"):
        prepare_run_dir(tmp_path, other)
