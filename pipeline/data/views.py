"""Views: augmentation parameters as data.

A view's parameters are a pure function of (seed, sample index, view index). They are drawn here, once,
by a counter-based generator (SplitMix64 of the three integers and a draw number), so any process, rank or
later student run can recompute or replay them, and so they can be stored beside the teacher's logits.

Every view is described by the same ``P = 8`` numbers::

    x0, y0, w, h   crop box in source-image pixels (integers; may reach outside the image, which reads 0)
    flip           1.0 for a horizontal flip
    brightness, contrast, saturation   colour factors, 1.0 for none

and applied in one order: crop (zero fill) -> resize to ``size`` (only when the box is not already
``size`` x ``size``) -> flip -> brightness (x*b) -> contrast (128 + c*(x-128)) -> saturation (blend with
the luma Y = 0.299R + 0.587G + 0.114B) -> clamp to [0, 255]. ``apply_view`` is the plain torch reference of
that order; the DALI executor in ``pipeline.data.dali`` applies the same parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PARAM_NAMES = ("x0", "y0", "w", "h", "flip", "brightness", "contrast", "saturation")
P = len(PARAM_NAMES)
KINDS = ("pad_crop", "resized_crop", "short_side_crop", "identity")
_ATTEMPTS = 10  # random-resized-crop attempts before the centre-crop fallback, as torchvision
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewSpec:
    """How a recipe draws training views and makes its evaluation view.

    kind: ``pad_crop`` (CIFAR: random ``size`` crop of the image padded by ``pad``), ``resized_crop``
    (Inception-style random area ``scale`` and aspect ``ratio``, resized to ``size``), ``short_side_crop``
    (the shorter side resized to ``resize`` and a random ``size`` crop taken, expressed as a box in source
    pixels), or ``identity``.
    Evaluation: in-memory sets use the whole image; file sets resize the shorter side to ``resize`` and
    take the central ``size`` crop.
    """

    kind: str = "pad_crop"
    size: int = 32
    pad: int = 4
    resize: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown view kind {self.kind!r}; known: {', '.join(KINDS)}")


# --- counter-based random numbers -------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, index: np.ndarray, view: np.ndarray | int, draws: int) -> np.ndarray:
    """Uniform numbers in [0, 1), float64 [N, draws], a pure function of (seed, index, view, draw)."""
    index = np.asarray(index, dtype=np.uint64).reshape(-1)
    view = np.broadcast_to(np.asarray(view, dtype=np.uint64), index.shape)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(index.shape, seed, dtype=np.uint64))
        key = _splitmix64(key ^ index)
        key = _splitmix64(key ^ (view * np.uint64(0x2545F4914F6CDD1D)))
        words = _splitmix64(key[:, None] + np.arange(1, draws + 1, dtype=np.uint64)[None, :])
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _randint(u: np.ndarray, low: np.ndarray | int, high: np.ndarray | int) -> np.ndarray:
    """Integers in [low, high] (inclusive) from uniforms u."""
    low = np.asarray(low, dtype=np.int64)
    span = np.asarray(high, dtype=np.int64) - low + 1
    return low + np.minimum((u * span).astype(np.int64), span - 1)


# --- drawing parameters --------------------------------------------------------------------------------


def view_params(spec: ViewSpec, seed: int, index: np.ndarray, view: np.ndarray | int,
                heights: np.ndarray | int, widths: np.ndarray | int) -> np.ndarray:
    """Parameters of view ``view`` of samples ``index`` (source sizes ``heights`` x ``widths``), float32 [N, P]."""
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    n = len(index)
    hs = np.broadcast_to(np.asarray(heights, dtype=np.int64), (n,))
    ws = np.broadcast_to(np.asarray(widths, dtype=np.int64), (n,))
    # draw slots: 0, 1 crop position; 2 flip; 3, 4, 5 colour factors; 6.. resized-crop attempts
    u = uniforms(seed, index, view, 6 + 4 * _ATTEMPTS)
    out = np.zeros((n, P), dtype=np.float64)
    if spec.kind == "pad_crop":
        out[:, 0] = _randint(u[:, 0], -spec.pad, ws - spec.size + spec.pad)
        out[:, 1] = _randint(u[:, 1], -spec.pad, hs - spec.size + spec.pad)
        out[:, 2] = out[:, 3] = spec.size
    elif spec.kind == "short_side_crop":
        side = np.maximum(1, np.rint(spec.size * np.minimum(hs, ws) / spec.resize)).astype(np.int64)
        out[:, 0] = _randint(u[:, 0], 0, np.maximum(ws - side, 0))
        out[:, 1] = _randint(u[:, 1], 0, np.maximum(hs - side, 0))
        out[:, 2] = out[:, 3] = side
    elif spec.kind == "resized_crop":
        out[:, :4] = _resized_crop_boxes(spec, u[:, 6:], hs, ws)
    else:
        out[:, 2], out[:, 3] = ws, hs
    out[:, 4] = (u[:, 2] < 0.5) if spec.flip else 0.0
    j = spec.jitter  # brightness, contrast, saturation factors in [1 - j, 1 + j]
    out[:, 5:8] = 1.0 - j + 2.0 * j * u[:, 3:6] if j > 0 else 1.0
    return out.astype(np.float32)


def _resized_crop_boxes(spec: ViewSpec, u: np.ndarray, hs: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """Inception-style boxes: up to 10 attempts at a random area and aspect, else a centre crop."""
    n = len(hs)
    area = (hs * ws).astype(np.float64)
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    boxes = np.zeros((n, 4), dtype=np.float64)
    done = np.zeros(n, dtype=bool)
    for k in range(_ATTEMPTS):
        a = area * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * u[:, 4 * k])
        r = np.exp(log_lo + (log_hi - log_lo) * u[:, 4 * k + 1])
        w = np.rint(np.sqrt(a * r)).astype(np.int64)
        h = np.rint(np.sqrt(a / r)).astype(np.int64)
        ok = ~done & (w > 0) & (h > 0) & (w <= ws) & (h <= hs)
        x0 = _randint(u[:, 4 * k + 2], 0, np.maximum(ws - w, 0))
        y0 = _randint(u[:, 4 * k + 3], 0, np.maximum(hs - h, 0))
        boxes[ok] = np.stack([x0, y0, w, h], axis=1)[ok]
        done |= ok
    # fallback: the largest centred box whose aspect lies within ``ratio``
    aspect = ws / hs
    w = np.where(aspect < spec.ratio[0], ws, np.where(aspect > spec.ratio[1], np.rint(hs * spec.ratio[1]), ws))
    h = np.where(aspect < spec.ratio[0], np.rint(ws / spec.ratio[0]), hs)
    fallback = np.stack([(ws - w) // 2, (hs - h) // 2, w, h], axis=1)
    boxes[~done] = fallback[~done]
    return boxes


def eval_params(spec: ViewSpec, heights: np.ndarray | int, widths: np.ndarray | int, in_memory: bool) -> np.ndarray:
    """The evaluation view: the whole image in memory; for files, resize ``resize`` then centre crop ``size``."""
    hs = np.atleast_1d(np.asarray(heights, dtype=np.int64))
    ws = np.broadcast_to(np.asarray(widths, dtype=np.int64), hs.shape)
    out = np.zeros((len(hs), P), dtype=np.float32)
    out[:, 5:8] = 1.0
    if in_memory or spec.kind in ("pad_crop", "identity"):
        out[:, 2], out[:, 3] = ws, hs
        return out
    side = np.maximum(1, np.rint(spec.size * np.minimum(hs, ws) / spec.resize)).astype(np.int64)
    out[:, 0], out[:, 1] = (ws - side) // 2, (hs - side) // 2
    out[:, 2] = out[:, 3] = side
    return out


# --- the torch reference executor ------------------------------------------------------------------------


def crop_zero_fill(image: torch.Tensor, x0: int, y0: int, w: int, h: int) -> torch.Tensor:
    """Crop [h, w] at (y0, x0) from an HWC image; pixels outside the image read 0."""
    height, width = image.shape[0], image.shape[1]
    out = image.new_zeros((h, w, image.shape[2]))
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + w, width), min(y0 + h, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def apply_view(image: torch.Tensor, params: np.ndarray, size: int) -> torch.Tensor:
    """Apply one view to an HWC uint8 image; returns float32 CHW in [0, 255] (the reference executor)."""
    x0, y0, w, h = (int(v) for v in params[:4])
    crop = crop_zero_fill(image, x0, y0, w, h).permute(2, 0, 1).float()
    if (w, h) != (size, size):
        crop = F.interpolate(crop[None], size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    if params[4] >= 0.5:
        crop = crop.flip(-1)
    return colour(crop, float(params[5]), float(params[6]), float(params[7]))


def colour(x: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """Brightness, contrast about 128, and saturation about the luma, in that order, then clamp to [0, 255]."""
    if brightness == contrast == saturation == 1.0:
        return x
    x = x * brightness
    x = 128.0 + contrast * (x - 128.0)
    if x.shape[-3] == 3 and saturation != 1.0:
        luma = sum(c * x[..., i:i + 1, :, :] for i, c in enumerate(_LUMA))
        x = luma + saturation * (x - luma)
    return x.clamp(0.0, 255.0)


def apply_views_batch(images: torch.Tensor, params: np.ndarray, size: int) -> torch.Tensor:
    """The views of a batch of HWC uint8 images, float32 [B, C, size, size] in [0, 255], equal element for
    element to ``apply_view`` on each image. Crops of ``size`` x ``size`` (CIFAR's pad-crop) and their flips
    are one gather from the zero-padded batch, and colour is broadcast arithmetic in the reference's order,
    so no Python loop runs over the images; a batch with boxes to resize takes the reference per image."""
    boxes = np.asarray(params, dtype=np.float32)
    if len(boxes) == 0 or not np.all(boxes[:, 2:4] == size):
        return torch.stack([apply_view(img, p, size) for img, p in zip(images, params)])
    crops = gather_crops(images, boxes[:, 0].astype(np.int64), boxes[:, 1].astype(np.int64), size,
                         boxes[:, 4] >= 0.5)
    return colour_batch(crops, boxes[:, 5:8])


def gather_crops(images: torch.Tensor, x0: np.ndarray, y0: np.ndarray, size: int, flip: np.ndarray) -> torch.Tensor:
    """``size`` x ``size`` crops at (y0, x0) of HWC images, zero outside, flipped where ``flip``: float32 BCHW."""
    b, height, width, _ = images.shape
    left, top = max(0, -int(x0.min())), max(0, -int(y0.min()))
    right, bottom = max(0, int(x0.max()) + size - width), max(0, int(y0.max()) + size - height)
    padded = images.new_zeros((b, height + top + bottom, width + left + right, images.shape[3]))
    padded[:, top:top + height, left:left + width] = images
    on = images.device  # the gather runs where the images are: on the GPU for in-memory data there
    steps = torch.arange(size, device=on)
    rows = torch.from_numpy(y0 + top).to(on)[:, None] + steps
    cols = torch.from_numpy(x0 + left).to(on)[:, None] + steps
    cols = torch.where(torch.from_numpy(flip).to(on)[:, None], cols.flip(1), cols)
    crops = padded[torch.arange(b, device=on)[:, None, None], rows[:, :, None], cols[:, None, :]]
    # into a fresh tensor: the strides the reference's stack gives, even for one channel, so that memory-format
    # choices downstream (channels_last, conv algorithms) see the same input
    out = torch.empty((b, images.shape[3], size, size), dtype=torch.float32, device=on)
    out.copy_(crops.permute(0, 3, 1, 2))
    return out


def colour_batch(x: torch.Tensor, factors: np.ndarray) -> torch.Tensor:
    """``colour`` of each image with its (brightness, contrast, saturation), as broadcast arithmetic in the
    same order, so every element equals the one-image result: images whose factors are all 1 are left as
    they are, and saturation applies only where it is not 1 (and the images have three channels)."""
    f = torch.from_numpy(np.ascontiguousarray(factors, dtype=np.float32)).to(x.device).view(-1, 3, 1, 1, 1)
    brightness, contrast, saturation = f[:, 0], f[:, 1], f[:, 2]
    if bool(np.all(np.asarray(factors) == 1.0)):  # decided on the host: no wait for the device
        return x
    plain = (f == 1.0).all(1)
    y = 128.0 + contrast * (x * brightness - 128.0)
    if x.shape[1] == 3:
        luma = sum(c * y[:, i:i + 1, :, :] for i, c in enumerate(_LUMA))
        y = torch.where(saturation != 1.0, luma + saturation * (y - luma), y)
    return torch.where(plain, x, y.clamp(0.0, 255.0))


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """From [0, 255] to zero-mean unit-variance channels, with mean and std given on the [0, 1] scale."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1) * 255.0
    return (x - m) / s
