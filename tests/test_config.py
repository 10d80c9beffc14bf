import pytest

from pipeline.config import ConfigError, RECIPES, recipe_for
from pipeline.train import lr_at


def test_cifar_and_fmnist_recipes_follow_the_paper():
    for name in ("fmnist-lt", "cifar100-lt"):
        r = RECIPES[name]
        assert (r.model, r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay) == \
            ("resnet32", 200, 128, 0.1, 0.9, 2e-4)
        assert (r.warmup_epochs, r.milestones, r.gamma, r.schedule) == (5, (120, 160), 0.01, "step")
        assert (r.aug, r.crop_size, r.pad) == ("pad_crop", 32, 4)
        assert (r.tau, r.power, r.alpha) == (3.0, 0.5, 0.5)


def test_imagenet_and_inat_recipes_follow_the_paper():
    im = RECIPES["imagenet-lt"]
    assert (im.model, im.epochs, im.batch_size, im.lr, im.weight_decay, im.schedule) == \
        ("resnext50_32x4d", 90, 512, 0.2, 5e-4, "cosine")
    assert (im.aug, im.crop_size, im.resize, im.jitter > 0) == ("short_side_crop", 224, 256, True)
    assert (im.tau, im.power, im.alpha) == (9.0, 1.0, 0.5)
    nat = RECIPES["inat2018"]
    assert (nat.model, nat.epochs, nat.batch_size, nat.lr, nat.weight_decay, nat.schedule) == \
        ("resnet50", 90, 256, 0.1, 5e-4, "cosine")
    assert (nat.aug, nat.crop_size) == ("resized_crop", 224)
    assert (nat.tau, nat.power, nat.alpha) == (2.0, 0.5, 0.5)
    assert recipe_for("inat2018", ["epochs=200"]).epochs == 200


def test_overrides_are_typed_and_strict():
    r = recipe_for("fmnist-lt", ["epochs=7", "lr=0.05", "milestones=3,5", "bf16=false", "loss=ce"])
    assert (r.epochs, r.lr, r.milestones, r.bf16, r.loss) == (7, 0.05, (3, 5), False, "ce")
    with pytest.raises(ConfigError, match="unknown recipe key 'epoch'"):
        recipe_for("fmnist-lt", ["epoch=7"])
    with pytest.raises(ConfigError, match="not a valid int"):
        recipe_for("fmnist-lt", ["epochs=seven"])
    with pytest.raises(ConfigError, match="key=value"):
        recipe_for("fmnist-lt", ["epochs"])
    with pytest.raises(ConfigError, match="loss must be"):
        recipe_for("fmnist-lt", ["loss=focal"])
    with pytest.raises(ConfigError, match="known datasets: fmnist-lt"):
        recipe_for("mnist")


def test_step_schedule_with_warmup():
    r = RECIPES["fmnist-lt"]
    assert [lr_at(r, e) for e in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lr_at(r, 119) == pytest.approx(0.1)
    assert lr_at(r, 120) == pytest.approx(1e-3)
    assert lr_at(r, 160) == pytest.approx(1e-5)


def test_cosine_schedule_by_epoch():
    r = RECIPES["inat2018"]
    assert lr_at(r, 0) == pytest.approx(0.1)
    assert lr_at(r, 45) == pytest.approx(0.05)
    assert lr_at(r, 89) == pytest.approx(0.5 * 0.1 * (1 + __import__("math").cos(__import__("math").pi * 89 / 90)))
