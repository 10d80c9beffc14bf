"""The DALI executor: decode image files and apply given view parameters, on GPU or CPU.

One pipeline definition serves both devices; only the device strings differ (``mixed`` nvJPEG decoding
and ``gpu`` operators with a GPU, ``cpu`` everywhere without one). The files and the view parameters are
fed by the caller through ``fn.external_source``, never drawn by DALI, so a student replays exactly the
views the teacher saw. The operators follow ``pipeline.data.views.apply_view`` step by step:

    decode RGB -> slice the box (zero fill outside) -> resize to size x size (bilinear, antialias, in
    float, with the reference's handling of the box's edges) -> colour as one affine map per pixel
    -> clamp [0, 255] -> flip + normalize + HWC to CHW

Flip is applied last because it commutes with the per-pixel colour map and the clamp, and
``crop_mirror_normalize`` does flip, normalization and the layout change in one pass.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from PIL import Image

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from pipeline.data.sources.base import DataError
from pipeline.data.views import P

_LUMA = np.array([0.299, 0.587, 0.114])  # as pipeline.data.views._LUMA
_RESIZED = ("box", "rows", "cols")  # what is resized, each with its own region of interest
_INPUTS = ("raw", "start", "shape", "margin_start", "margin_shape", "rows", "cols", "colour", "flip",
           *(f"{k}_roi_{end}" for k in _RESIZED for end in ("start", "end")))


class ImageError(DataError):
    """An image file is missing, empty or cannot be decoded. The message names the file."""


# --- image headers --------------------------------------------------------------------------------------


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only.

    The size is of the stored pixels, without EXIF rotation, which matches what the executor decodes
    (``adjust_orientation=False``) and what PIL's ``Image.open(path).convert('RGB')`` gives.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such image file") from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ImageError(f"{path}: cannot read the image header ({e})") from e
    return height, width


def image_sizes(paths: Sequence[str]) -> np.ndarray:
    """Source sizes of many image files, int64 [N, 2] as (height, width) rows."""
    out = np.zeros((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        out[i] = image_size(path)
    return out


def check_image(path: str) -> None:
    """Fully decode one file with PIL and raise ImageError (naming it) if its data is damaged.

    The executor catches files that DALI cannot decode. Bit errors inside a JPEG's entropy-coded data
    that leave its structure intact are different: libjpeg-turbo (in DALI, as in most decoders) only warns
    and returns damaged pixels. PIL refuses such files, so a dataset check before caching can find them.
    """
    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such image file") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: damaged or unreadable image ({e})") from e


# --- the pipeline ---------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``auto`` -> ``gpu`` when torch sees CUDA, else ``cpu``; ``gpu``/``cpu`` pass through."""
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', not {device!r}")
    return device


@pipeline_def
def _view_pipeline(device: str, size: int, mean: Sequence[float], std: Sequence[float], decode_only: bool = False):
    """Decode fed bytes and apply fed view parameters; ``device`` ('gpu' or 'cpu') is the only switch.

    ``decode_only`` stops after decoding: the probe that tells which file of a failed batch is bad.
    """
    raw = fn.external_source(name="raw", dtype=types.UINT8, ndim=1)
    # adjust_orientation=False: the stored pixel grid, as PIL decodes it and as image_size measures it
    images = fn.decoders.image(raw, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB,
                               adjust_orientation=False)
    if decode_only:
        return images
    box = {k: fn.external_source(name=k, dtype=types.INT32, ndim=1) for k in ("start", "shape")}
    margin = {k: fn.external_source(name=k, dtype=types.INT32, ndim=1) for k in ("margin_start", "margin_shape")}
    roi = {k: {f"roi_{end}": fn.external_source(name=f"{k}_roi_{end}", dtype=types.FLOAT, ndim=1)
               for end in ("start", "end")} for k in _RESIZED}
    rows, cols = (_on(fn.external_source(name=k, dtype=types.FLOAT, ndim=3, layout="HWC"), device)
                  for k in ("rows", "cols"))
    colour = fn.external_source(name="colour", dtype=types.FLOAT, ndim=2)  # [3, 4] affine map
    flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)

    crops = _zero_pad_slice(images, box["start"], box["shape"], device)
    # The reference's antialiased bilinear filter drops the taps that fall outside the box and renormalizes
    # the rest; DALI's resize clamps them to the edge instead. Resizing the box inside a zero margin (via
    # the ROI) and dividing by the resized 0/1 mask of the box gives the reference's weights exactly. The
    # mask is a product of a row and a column profile, so it is resized as two thin images.
    padded = _zero_pad_slice(crops, margin["margin_start"], margin["margin_shape"], device)
    resize = dict(mode="stretch", interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT,
                  roi_relative=False, device=device)
    weight = (fn.resize(rows, resize_x=1, resize_y=size, **roi["rows"], **resize)
              * fn.resize(cols, resize_x=size, resize_y=1, **roi["cols"], **resize))
    resized = fn.resize(padded, resize_x=size, resize_y=size, **roi["box"], **resize) / weight
    coloured = dmath.clamp(fn.coord_transform(resized, MT=colour, device=device), 0.0, 255.0)
    return fn.crop_mirror_normalize(coloured, mirror=flip, mean=[m * 255.0 for m in mean],
                                    std=[s * 255.0 for s in std], output_layout="CHW", dtype=types.FLOAT,
                                    device=device)


def _on(node, device: str):
    """A fed (CPU) tensor moved to where the operators run; argument inputs stay on the CPU."""
    return node.gpu() if device == "gpu" else node


def _zero_pad_slice(images, start, shape, device: str):
    """Slice (x, y) ``start`` / (w, h) ``shape`` of HWC images, reading zeros outside them."""
    return fn.slice(images, start=start, shape=shape, axis_names="WH", out_of_bounds_policy="pad",
                    fill_values=0, device=device)


def colour_maps(params: np.ndarray) -> np.ndarray:
    """The per-pixel affine map [B, 3, 4] of brightness, contrast and saturation, as in views.colour.

    brightness x*b, contrast 128 + c*(x - 128), saturation Y + s*(x - Y) with Y the luma:
    x -> S (c b x + 128 (1 - c)), with S = s I + (1 - s) 1 luma^T. Composed in float64 and rounded once;
    with all factors 1 it is the exact identity, so an unjittered view is not changed at all.
    """
    b, c, s = (params[:, k].astype(np.float64)[:, None, None] for k in (5, 6, 7))
    sat = s * np.eye(3)[None] + (1.0 - s) * np.ones((3, 1)) @ _LUMA[None, :]
    linear = sat * (c * b)
    offset = sat @ np.full((3, 1), 128.0) * (1.0 - c)
    return np.concatenate([linear, offset], axis=2).astype(np.float32)


def resize_margins(boxes: np.ndarray, size: int) -> np.ndarray:
    """Zero margin (pixels) around each box that covers the resize filter's reach: int64 [B].

    Downscaling by s = box / size widens the triangle filter to a radius of s source pixels; 2 more
    pixels cover rounding at the edges and the radius-1 filter of upscaling.
    """
    return np.ceil(boxes[:, 2:4].max(axis=1) / size).astype(np.int64) + 2


def pipeline_inputs(encoded: Sequence[np.ndarray], params: np.ndarray, size: int) -> dict[str, list[np.ndarray]]:
    """The external-source batches for encoded files and their view parameters [B, P]."""
    params = np.asarray(params, dtype=np.float32)
    boxes = params[:, :4].astype(np.int64)  # truncation, as int() in views.apply_view
    margins = resize_margins(boxes, size)
    out: dict[str, list[np.ndarray]] = {k: [] for k in _INPUTS}
    out["raw"] = list(encoded)
    out["colour"] = list(colour_maps(params))
    for (x0, y0, w, h), m, p in zip(boxes, margins, params):
        out["start"].append(np.array([x0, y0], dtype=np.int32))
        out["shape"].append(np.array([w, h], dtype=np.int32))
        out["margin_start"].append(np.array([-m, -m], dtype=np.int32))
        out["margin_shape"].append(np.array([w + 2 * m, h + 2 * m], dtype=np.int32))
        # ROIs are (y, x), the tensor's axis order. The profiles' length-1 axes get the exact [0, 1]:
        # an ROI outside a length-1 axis crashes DALI 2.4's CPU resize.
        for k, start, end in (("box", (m, m), (m + h, m + w)), ("rows", (m, 0), (m + h, 1)),
                              ("cols", (0, m), (1, m + w))):
            out[f"{k}_roi_start"].append(np.array(start, dtype=np.float32))
            out[f"{k}_roi_end"].append(np.array(end, dtype=np.float32))
        out["rows"].append(_profile(h, m).reshape(-1, 1, 1))
        out["cols"].append(_profile(w, m).reshape(1, -1, 1))
        out["flip"].append(np.array(p[4] >= 0.5, dtype=np.int32))
    return out


def _profile(length: int, margin: int) -> np.ndarray:
    """1 over the box, 0 over the margins on both sides: float32 [length + 2 margin]."""
    out = np.zeros(length + 2 * margin, dtype=np.float32)
    out[margin:margin + length] = 1.0
    return out


# --- reading files --------------------------------------------------------------------------------------


def read_encoded(path: str) -> np.ndarray:
    """The bytes of one image file; a missing, unreadable or empty file is an ImageError naming it."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such image file") from e
    except OSError as e:
        raise ImageError(f"{path}: cannot read the image file ({e})") from e
    if data.size == 0:
        raise ImageError(f"{path}: the image file is empty")
    return data


# --- the executor ---------------------------------------------------------------------------------------


class DaliExecutor:
    """Decodes image files and applies given view parameters with DALI.

    Equivalent to ``views.normalize(views.apply_view(decode(file), params, size), mean, std)`` per file.
    The pipeline is built once and reused; after a decode error it is rebuilt, so the executor stays usable.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], batch_size: int,
                 device: str = "auto", num_threads: int = 2, device_id: int | None = None) -> None:
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.num_threads = int(num_threads)
        if self.device == "gpu":
            self.device_id = torch.cuda.current_device() if device_id is None else int(device_id)
        else:
            self.device_id = None  # a CPU-only pipeline must not touch CUDA
        self._pipe = self._build(self.batch_size)
        self._decoder = None  # a batch-1 decode-only pipeline, built when first needed

    @property
    def torch_device(self) -> torch.device:
        """Where ``run`` puts its output."""
        return torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")

    def _build(self, batch_size: int, decode_only: bool = False):
        # prefetch_queue_depth=1 lets run() take its inputs directly, and keeps a batch's outputs tied
        # to the inputs fed for it.
        pipe = _view_pipeline(self.device, self.size, self.mean, self.std, decode_only, batch_size=batch_size,
                              num_threads=self.num_threads, device_id=self.device_id,
                              prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def run(self, files: Sequence[str], params: np.ndarray) -> torch.Tensor:
        """Decode ``files`` (at most batch_size) and apply ``params`` float32 [B, 8].

        Returns float32 [B, 3, size, size], normalized, on ``torch_device``. A file that is missing,
        empty or undecodable raises ImageError naming it.
        """
        if self._pipe is None:
            raise RuntimeError("this DaliExecutor is closed")
        files = list(files)
        params = np.asarray(params, dtype=np.float32).reshape(-1, P)
        if len(files) != len(params):
            raise ValueError(f"{len(files)} files but {len(params)} view parameter rows")
        if not 0 < len(files) <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} files, got {len(files)}")
        if np.any(params[:, 2:4] < 1):
            raise ValueError("view boxes must be at least 1 x 1 pixels")
        encoded = [read_encoded(f) for f in files]
        try:
            (out,) = self._pipe.run(**pipeline_inputs(encoded, params, self.size))
        except Exception as e:
            # DALI declares a pipeline invalid after an operator error, so start afresh either way
            self._pipe = None
            self._pipe = self._build(self.batch_size)
            bad = self._find_bad_file(files, encoded) if isinstance(e, RuntimeError) else None
            if bad is None:
                raise
            raise bad from e
        return self._to_torch(out)

    def close(self) -> None:
        """Release the pipelines (and their GPU memory); the executor cannot run afterwards."""
        self._pipe = self._decoder = None

    def __enter__(self) -> "DaliExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _to_torch(self, out) -> torch.Tensor:
        """Copy the pipeline output into a fresh torch tensor (DALI reuses its buffers next run)."""
        dense = out.as_tensor()
        result = torch.empty(dense.shape(), dtype=torch.float32, device=self.torch_device)
        # run() returned host-synchronous outputs, so torch's stream may copy them right away
        stream = torch.cuda.current_stream(self.torch_device) if self.device == "gpu" else None
        feed_ndarray(dense, result, cuda_stream=stream)
        return result

    def _find_bad_file(self, files: list[str], encoded: list[np.ndarray]) -> ImageError | None:
        """Decode the batch's files one at a time to name the one DALI failed on.

        DALI's error names the operator but not reliably the sample, hence the probe. None when every
        file decodes alone: then the failure was not a file's fault.
        """
        for path, data in zip(files, encoded):
            _, reason = self._decode_one(data)
            if reason is not None:
                return _decode_error(path, reason)
        return None

    def decode(self, path: str) -> np.ndarray:
        """One file decoded exactly as ``run`` decodes it, before any view: uint8 HWC RGB, on the CPU."""
        out, reason = self._decode_one(read_encoded(path))
        if reason is not None:
            raise _decode_error(path, reason)
        return np.array(out.as_cpu()[0])

    def _decode_one(self, data: np.ndarray):
        """Decode one encoded file on the run's decode device: (outputs, None) or (None, DALI's reason)."""
        if self._decoder is None:
            self._decoder = self._build(1, decode_only=True)
        try:
            (out,) = self._decoder.run(raw=[data])
        except RuntimeError as e:
            self._decoder = None  # invalid after the error, like the main pipeline
            self._decoder = self._build(1, decode_only=True)
            return None, dali_reason(e)
        return out, None


def _decode_error(path: str, reason: str) -> ImageError:
    return ImageError(f"{path}: cannot decode the image: damaged, truncated or not an image format DALI "
                      f"reads (DALI: {reason})")


def dali_reason(error: Exception) -> str:
    """The part of a DALI error that says what went wrong, without the pipeline traceback around it."""
    text = str(error)
    if "encountered:" in text:
        text = text.rsplit("encountered:", 1)[1].split("Current pipeline object", 1)[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("C++ context")]
    # the probe decodes one file at a time, so the sample number it reports says nothing
    reason = re.sub(r"Failed to decode sample #\d+\s*:?\s*", "decoding failed ", " ".join(lines)).strip()
    return reason or "unknown DALI error"
