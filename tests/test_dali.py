"""The DALI executor replays views like the torch reference, and names the files it cannot decode.

Measured on the CPU build (DALI 2.4.0, Pillow's libjpeg-turbo), which the tolerances below are set from:
- DALI's CPU decoder and PIL give identical uint8 pixels for every JPEG tried (libjxl-testdata's flower
  in 420/422/440/444/progressive/grey/RGB/non-interleaved encodings, opencv-doc samples), and for
  greyscale, CMYK and PNG-named-.jpg files: max difference 0.
- Crop (with zero fill outside the image) and flip, box == size: max |DALI - reference| 1.4e-5 in [0, 255]
  units, i.e. float rounding in the normalization.
- Resize (antialiased bilinear, down and up): max 4e-4 in [0, 255] units for 64 x 64 outputs, 5e-3 for
  224 x 224 ones cut from 3.4-megapixel images (float accumulation order over wide filters); colour
  jitter 0.4 on top: max 3e-4 at 64. Without the zero-margin reweighting in pipeline.data.dali, DALI's
  edge-clamping filter made the outer ring of output pixels differ by up to 9.
The replay tests feed the reference the executor's own decoded pixels, so they test the executor and not
the decoders; the decoders are compared on their own.
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import views
from pipeline.data.dali import (DaliExecutor, ImageError, _view_pipeline, check_image, colour_maps, image_size,
                           image_sizes, resolve_device)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
UNIT = 255.0 * min(STD)  # one [0, 255] level in normalized units is at least 1 / UNIT
EXACT = 1e-6  # normalized units: float rounding only
RESIZE_TOL = 2e-3 / UNIT  # [0, 255] units measured 4e-4, allowed 2e-3
BATCH = 8

FLOWER = sorted(glob.glob("/usr/share/libjxl-testdata/jxl/flower/*.jpg"))
OPENCV = [f for f in sorted(glob.glob("/usr/share/doc/opencv-doc/examples/data/*.jpg"))
          if Path(f).name in ("baboon.jpg", "HappyFish.jpg", "fruits.jpg", "lena.jpg", "LinuxLogo.jpg")]


def _synthetic_jpegs(folder: Path) -> list[str]:
    """Smooth random JPEGs in several encodings, for machines without the Debian test images."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((160, 120), Image.BICUBIC)
    paths = []
    for name, kwargs in {"420": dict(subsampling=2), "444": dict(subsampling=0),
                         "progressive": dict(progressive=True)}.items():
        path = folder / f"synthetic_{name}.jpg"
        image.save(path, "JPEG", quality=90, **kwargs)
        paths.append(str(path))
    path = folder / "synthetic_gray.jpg"
    image.convert("L").save(path, "JPEG", quality=90)
    return paths + [str(path)]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[str]:
    """Real JPEGs of many encodings where the Debian packages are installed, synthetic ones otherwise."""
    real = FLOWER + OPENCV
    return real if real else _synthetic_jpegs(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="module")
def baseline(jpegs) -> str:
    """A plain baseline 4:2:0 JPEG."""
    preferred = [f for f in jpegs if f.endswith(("im_q85_420.jpg", "baboon.jpg", "synthetic_420.jpg"))]
    return (preferred or jpegs)[0]


@pytest.fixture(scope="module")
def small_jpegs(jpegs) -> list[str]:
    """The test JPEGs of at most 1 megapixel (the flower encodings are 3.4 MP), for the slower tests."""
    sizes = image_sizes(jpegs)
    small = [f for f, (h, w) in zip(jpegs, sizes) if h * w <= 1_000_000]
    return small or jpegs[:4]


@pytest.fixture(scope="module")
def executors():
    """One executor per output size, built once: pipelines are costly to build."""
    made = {}

    def get(size: int) -> DaliExecutor:
        if size not in made:
            made[size] = DaliExecutor(size, MEAN, STD, batch_size=BATCH, device="cpu")
        return made[size]

    yield get
    for ex in made.values():
        ex.close()


def _pil_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _reference(ex: DaliExecutor, files: list[str], params: np.ndarray) -> torch.Tensor:
    """views.normalize(views.apply_view(...)) on the pixels the executor itself decodes."""
    out = []
    for path, p in zip(files, params):
        image = torch.from_numpy(ex.decode(path))
        out.append(views.normalize(views.apply_view(image, p, ex.size), ex.mean, ex.std))
    return torch.stack(out)


def _run_batches(ex: DaliExecutor, files: list[str], params: np.ndarray) -> torch.Tensor:
    return torch.cat([ex.run(files[i:i + ex.batch_size], params[i:i + ex.batch_size])
                      for i in range(0, len(files), ex.batch_size)])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


# --- decoding ---------------------------------------------------------------------------------------------


def test_dali_cpu_decoder_equals_pil_on_a_baseline_jpeg(executors, baseline):
    decoded = executors(32).decode(baseline)
    assert decoded.dtype == np.uint8 and decoded.shape[2] == 3
    np.testing.assert_array_equal(decoded, _pil_rgb(baseline))


def test_dali_cpu_decoder_equals_pil_on_every_encoding(executors, jpegs):
    # Measured 0 on all of them; a libjpeg-turbo of another version may round a level differently
    worst = max(int(np.abs(executors(32).decode(f).astype(int) - _pil_rgb(f)).max()) for f in jpegs)
    assert worst <= 1


def test_image_size_is_the_decoded_size(executors, jpegs):
    sizes = image_sizes(jpegs)
    assert sizes.dtype == np.int64 and sizes.shape == (len(jpegs), 2)
    for path, (h, w) in zip(jpegs[:6], sizes):
        assert image_size(path) == (h, w) == executors(32).decode(path).shape[:2]


def test_exif_rotation_is_not_applied(executors, tmp_path):
    # Stored pixels, as PIL's convert('RGB') and torchvision's ImageFolder read them
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, "JPEG", exif=exif.tobytes())
    assert image_size(str(path)) == (20, 40) == executors(32).decode(str(path)).shape[:2]


# --- replay equality --------------------------------------------------------------------------------------


def test_crop_and_flip_replay_exactly(executors, small_jpegs):
    spec = views.ViewSpec(kind="pad_crop", size=48, pad=24)  # boxes reach 24 px outside: zero fill
    sizes = image_sizes(small_jpegs)
    params = np.concatenate([views.view_params(spec, 3, np.arange(len(small_jpegs)), v, sizes[:, 0],
                                               sizes[:, 1]) for v in range(2)])
    params[0, :2] = (-100, -100)  # entirely outside: all zero
    params[1, :2] = (sizes[1, 1] - 10, -30)  # past the top-right corner
    params[2, 4] = 1.0
    files = small_jpegs * 2
    ex = executors(48)
    # the box is already 48 x 48, so this also checks that DALI's resize at scale 1 is the identity
    assert _max_diff(_run_batches(ex, files, params), _reference(ex, files, params)) <= EXACT


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_resized_crop_replays_within_float_rounding(executors, small_jpegs, jitter):
    spec = views.ViewSpec(kind="resized_crop", size=64, jitter=jitter)
    sizes = image_sizes(small_jpegs)
    params = views.view_params(spec, 11, np.arange(len(small_jpegs)), 0, sizes[:, 0], sizes[:, 1])
    ex = executors(64)
    assert _max_diff(_run_batches(ex, small_jpegs, params), _reference(ex, small_jpegs, params)) <= RESIZE_TOL


def test_resize_up_down_and_outside_the_image(executors, baseline):
    h, w = image_size(baseline)
    rows = [
        (5, 7, 20, 30, 0, 1.0, 1.0, 1.0),  # upscale both axes
        (0, 0, 200, 31, 1, 1.0, 1.0, 1.0),  # down in x, up in y, flipped
        (0, 0, w, h, 0, 1.0, 1.0, 1.0),  # the whole image, a large downscale
        (-40, -20, 120, 90, 0, 1.0, 1.0, 1.0),  # zero fill, then resize
        (w - 50, h - 30, 100, 100, 1, 1.3, 0.7, 1.4),  # zero fill, resize, flip and colour
        (10, 10, 1, 1, 0, 0.6, 1.4, 0.6),  # a single pixel blown up
    ]
    params = np.array(rows, dtype=np.float32)
    ex = executors(64)
    files = [baseline] * len(rows)
    assert _max_diff(ex.run(files, params), _reference(ex, files, params)) <= RESIZE_TOL


def test_colour_map_of_unit_factors_is_the_identity():
    params = np.array([[0, 0, 4, 4, 0, 1.0, 1.0, 1.0]], dtype=np.float32)
    expected = np.concatenate([np.eye(3), np.zeros((3, 1))], axis=1)[None]
    np.testing.assert_array_equal(colour_maps(params), expected.astype(np.float32))


def test_extreme_jitter_clamps_like_the_reference(executors, baseline):
    params = np.array([[30, 40, 64, 64, 0, 1.8, 1.9, 0.0], [30, 40, 64, 64, 1, 0.2, 0.1, 2.0]], np.float32)
    ex = executors(64)
    files = [baseline] * 2
    assert _max_diff(ex.run(files, params), _reference(ex, files, params)) <= 1e-4 / UNIT


# --- batches ----------------------------------------------------------------------------------------------


def test_partial_last_batch(executors, small_jpegs):
    files = (small_jpegs * BATCH)[:BATCH + 3]
    sizes = image_sizes(files)
    params = views.view_params(views.ViewSpec(kind="resized_crop", size=32), 5, np.arange(len(files)), 0,
                               sizes[:, 0], sizes[:, 1])
    ex = executors(32)
    full, last = ex.run(files[:BATCH], params[:BATCH]), ex.run(files[BATCH:], params[BATCH:])
    assert full.shape == (BATCH, 3, 32, 32) and last.shape == (3, 3, 32, 32)
    assert full.device.type == last.device.type == "cpu"
    assert torch.equal(ex.run(files[:1], params[:1])[0], full[0])  # a sample does not depend on its batch
    assert torch.equal(ex.run(files[BATCH:], params[BATCH:]), last)  # and replays bit for bit


def test_batch_arguments_are_checked(executors, baseline):
    ex = executors(32)
    one = np.array([[0, 0, 32, 32, 0, 1, 1, 1]], np.float32)
    with pytest.raises(ValueError, match="1..8"):
        ex.run([baseline] * (BATCH + 1), np.repeat(one, BATCH + 1, axis=0))
    with pytest.raises(ValueError, match="parameter rows"):
        ex.run([baseline] * 2, one)
    with pytest.raises(ValueError, match="1 x 1"):
        ex.run([baseline], np.array([[0, 0, 0, 32, 0, 1, 1, 1]], np.float32))


# --- bad input --------------------------------------------------------------------------------------------


def _write_bad_files(folder: Path, good: str) -> dict[str, Path]:
    data = Path(good).read_bytes()
    rng = np.random.default_rng(1)
    files = {
        "truncated": data[: len(data) // 2],
        "random": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        out[name] = folder / f"{name}.jpg"
        out[name].write_bytes(content)
    out["missing"] = folder / "missing.jpg"
    return out


def _decodable_files(folder: Path, good: str) -> dict[str, Path]:
    """A PNG named .jpg, a greyscale and a CMYK JPEG, all made from the same real image."""
    with Image.open(good) as im:
        image = im.convert("RGB").crop((0, 0, 160, 120))
    out = {name: folder / f"{name}.jpg" for name in ("png", "grey", "cmyk")}
    image.save(out["png"], "PNG")
    image.convert("L").save(out["grey"], "JPEG", quality=90)
    image.convert("CMYK").save(out["cmyk"], "JPEG", quality=90)
    return out


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "missing"])
def test_undecodable_file_raises_image_error_naming_it(executors, baseline, tmp_path, kind):
    bad = str(_write_bad_files(tmp_path, baseline)[kind])
    ex = executors(32)
    one = np.array([[0, 0, 32, 32, 0, 1, 1, 1]], np.float32)
    with pytest.raises(ImageError) as err:
        ex.run([bad], one)
    assert bad in str(err.value)
    assert ex.run([baseline], one).shape == (1, 3, 32, 32)  # still usable afterwards


def test_a_bad_file_in_the_middle_of_a_batch_is_the_one_named(executors, small_jpegs, baseline, tmp_path):
    bad = str(_write_bad_files(tmp_path, baseline)["truncated"])
    files = [small_jpegs[0], small_jpegs[1 % len(small_jpegs)], bad, baseline, small_jpegs[0]]
    params = np.tile(np.array([[0, 0, 32, 32, 0, 1, 1, 1]], np.float32), (len(files), 1))
    ex = executors(32)
    with pytest.raises(ImageError) as err:
        ex.run(files, params)
    message = str(err.value)
    assert bad in message and not any(f in message for f in set(files) - {bad})
    good = [f for f in files if f != bad]
    assert ex.run(good, params[: len(good)]).shape == (len(good), 3, 32, 32)


@pytest.mark.parametrize("kind, tolerance", [("png", 0), ("grey", 0), ("cmyk", 2)])
def test_png_grey_and_cmyk_files_decode_to_rgb(executors, baseline, tmp_path, kind, tolerance):
    # Measured 0 for all three; CMYK conversion is allowed 2 levels since libraries may treat it differently
    path = str(_decodable_files(tmp_path, baseline)[kind])
    ex = executors(32)
    decoded = ex.decode(path)
    assert decoded.shape == (120, 160, 3)
    assert np.abs(decoded.astype(int) - _pil_rgb(path)).max() <= tolerance
    params = np.array([[20, 10, 32, 32, 0, 1, 1, 1]], np.float32)
    expected = views.normalize(views.apply_view(torch.from_numpy(_pil_rgb(path).copy()), params[0], 32), MEAN, STD)
    assert _max_diff(ex.run([path], params)[0], expected) <= tolerance / UNIT + EXACT


def test_check_image_finds_damage_that_decoders_pass(baseline, tmp_path):
    data = bytearray(Path(baseline).read_bytes())
    for k in range(len(data) // 3, 2 * len(data) // 3, 97):
        data[k] ^= 0x5A  # bit errors in the entropy-coded data: libjpeg-turbo only warns
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(bytes(data))
    check_image(baseline)
    with pytest.raises(ImageError, match="damaged.jpg"):
        check_image(str(damaged))
    with pytest.raises(ImageError, match="missing.jpg"):
        image_size(str(tmp_path / "missing.jpg"))


# --- devices ----------------------------------------------------------------------------------------------


def test_device_resolution():
    assert resolve_device("auto") == ("gpu" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_gpu_graph_places_every_operator_validly():
    # Defining the graph checks each operator's input devices; building would need CUDA
    _view_pipeline("gpu", 32, MEAN, STD, batch_size=2, num_threads=1, device_id=0, prefetch_queue_depth=1)


def test_a_closed_executor_refuses_to_run(baseline):
    with DaliExecutor(32, MEAN, STD, batch_size=2, device="cpu") as ex:
        assert ex.torch_device == torch.device("cpu")
    with pytest.raises(RuntimeError, match="closed"):
        ex.run([baseline], np.array([[0, 0, 32, 32, 0, 1, 1, 1]], np.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_executor_replays_like_the_reference(small_jpegs):
    # nvJPEG rounds differently from libjpeg-turbo, so the reference gets the GPU decoder's own pixels
    sizes = image_sizes(small_jpegs)
    params = views.view_params(views.ViewSpec(kind="resized_crop", size=64, jitter=0.4), 2,
                               np.arange(len(small_jpegs)), 0, sizes[:, 0], sizes[:, 1])
    with DaliExecutor(64, MEAN, STD, batch_size=BATCH, device="gpu") as ex:
        out = _run_batches(ex, small_jpegs, params)
        assert out.device.type == "cuda"
        assert _max_diff(out.cpu(), _reference(ex, small_jpegs, params)) <= 10 * RESIZE_TOL
