import numpy as np
import pytest
import torch

from pipeline.data.views import (P, ViewSpec, apply_view, colour, crop_zero_fill, eval_params, uniforms,
                            view_params)


def test_uniforms_are_a_pure_function_of_seed_index_view():
    a = uniforms(7, np.arange(100), 3, 5)
    assert np.array_equal(a, uniforms(7, np.arange(100), 3, 5))
    # the same sample asked alone, or among others, gets the same numbers
    assert np.array_equal(a[[42]], uniforms(7, np.array([42]), 3, 5))
    assert not np.array_equal(a, uniforms(8, np.arange(100), 3, 5))
    assert not np.array_equal(a, uniforms(7, np.arange(100), 4, 5))
    assert a.min() >= 0 and a.max() < 1
    assert abs(a.mean() - 0.5) < 0.05


def test_pad_crop_params_cover_every_offset_and_flip():
    spec = ViewSpec("pad_crop", size=32, pad=4)
    p = view_params(spec, 0, np.arange(5000), 0, 32, 32)
    assert p.shape == (5000, P) and p.dtype == np.float32
    assert set(np.unique(p[:, 0])) == set(range(-4, 5)) and set(np.unique(p[:, 1])) == set(range(-4, 5))
    assert np.all(p[:, 2:4] == 32)
    assert 0.45 < p[:, 4].mean() < 0.55
    assert np.all(p[:, 5:] == 1.0)


def test_resized_crop_boxes_stay_inside_and_respect_scale():
    spec = ViewSpec("resized_crop", size=224, jitter=0.4)
    h, w = np.full(4000, 375), np.full(4000, 500)
    p = view_params(spec, 1, np.arange(4000), 2, h, w)
    x0, y0, bw, bh = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    assert np.all(x0 >= 0) and np.all(y0 >= 0) and np.all(x0 + bw <= 500) and np.all(y0 + bh <= 375)
    area = bw * bh / (375 * 500)
    assert area.min() > 0.07 and area.max() <= 1.0
    assert np.all((p[:, 5:] >= 0.6) & (p[:, 5:] <= 1.4))


def test_eval_view_is_centre_crop_for_files_and_identity_in_memory():
    spec = ViewSpec("short_side_crop", size=224, resize=256)
    p = eval_params(spec, 256, 512, in_memory=False)[0]
    assert list(p[:4]) == [144, 16, 224, 224]
    q = eval_params(ViewSpec("pad_crop", 32), 32, 32, in_memory=True)[0]
    assert list(q[:5]) == [0, 0, 32, 32, 0]


def test_crop_reads_zero_outside_and_flip_is_exact():
    image = torch.arange(6 * 6, dtype=torch.uint8).reshape(6, 6, 1)
    crop = crop_zero_fill(image, -2, 1, 4, 4)[..., 0]
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[:, 2:] = image.numpy()[1:5, 0:2, 0]
    assert np.array_equal(crop.numpy(), expected)
    params = np.array([-2, 1, 4, 4, 1, 1, 1, 1], dtype=np.float32)
    out = apply_view(image, params, 4)
    assert torch.equal(out[0], torch.from_numpy(expected[:, ::-1].copy()).float())


def test_colour_factors_follow_their_definition():
    x = torch.tensor([[[200.0]], [[100.0]], [[50.0]]])  # one RGB pixel, CHW
    b, c, s = 1.2, 0.8, 0.5
    y = x * b
    y = 128 + c * (y - 128)
    luma = 0.299 * y[0] + 0.587 * y[1] + 0.114 * y[2]
    y = (luma + s * (y - luma)).clamp(0, 255)
    assert torch.allclose(colour(x, b, c, s), y)
    assert torch.equal(colour(x, 1.0, 1.0, 1.0), x)


def test_unknown_view_kind_is_refused():
    with pytest.raises(ValueError, match="unknown view kind"):
        ViewSpec("mixup")


@pytest.mark.parametrize("kind,jitter,channels", [("pad_crop", 0.0, 1), ("pad_crop", 0.0, 3), ("pad_crop", 0.4, 3),
                                                  ("pad_crop", 0.4, 1), ("resized_crop", 0.4, 3),
                                                  ("short_side_crop", 0.4, 3), ("identity", 0.0, 3)])
def test_batched_replay_equals_the_one_image_reference(kind, jitter, channels):
    """The batch executor (gathers and broadcast colour for size x size boxes, the reference per image
    otherwise) against ``apply_view`` image by image: every element equal, and the same memory layout."""
    from pipeline.data.views import apply_views_batch

    rng = np.random.default_rng(1)
    side = 32 if kind in ("pad_crop", "identity") else 48
    images = torch.from_numpy(rng.integers(0, 256, (40, side, side, channels), dtype=np.uint8))
    spec = ViewSpec(kind=kind, size=32, pad=4, jitter=jitter)
    params = view_params(spec, 5, np.arange(40), 3, np.full(40, side), np.full(40, side))
    if kind == "pad_crop":  # the cases the gather must get right: both flips, boxes reaching outside
        assert 0 < (params[:, 4] >= 0.5).mean() < 1 and (params[:, :2] < 0).any() and (params[:, :2] > 0).any()
    expected = torch.stack([apply_view(img, p, 32) for img, p in zip(images, params)])
    got = apply_views_batch(images, params, 32)
    assert torch.equal(got, expected) and got.stride() == expected.stride()
