"""Rendering Chinese characters in Debian's CJK typefaces: the pixels of glyph-lt.

A sample is a pure function of its seed: the seed picks a style among those whose font has the character,
then a size, an offset, a rotation and a shear, a stroke weight, stray strokes across it, a blur, ink and
paper levels and pixel noise. It is drawn at twice the resolution and reduced to 32 x 32 grey, bright ink on
dark paper like Fashion-MNIST.

Machines can differ in what the fonts rasterize to: FreeType (through Pillow) and the font files' versions
decide the pixels, so the rendered set records both and carries its own fingerprint (see glyph.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from store.manifest import sha256_file

from .base import DataError

SIDE = 32  # output pixels
SCALE = 2  # drawn at SCALE x SIDE, then reduced: antialiased strokes
LEVEL1 = 3755  # GB2312 level 1: rows 0xB0..0xD7, 94 characters a row, the last row 89


@dataclass(frozen=True)
class Style:
    """One typeface: a font file (and face in a collection) from a Debian package."""

    name: str
    package: str
    path: str
    face: int = 0  # index in a .ttc collection


_NOTO = "/usr/share/fonts/opentype/noto"
# Noto's collections hold regional faces (JP, KR, SC, TC, HK) that look alike for most characters: one style
# each is the SC face (index 2), as for the Arphic collections' CN face (index 0).
STYLES = (
    Style("noto-sans", "fonts-noto-cjk", f"{_NOTO}/NotoSansCJK-Regular.ttc", 2),
    Style("noto-sans-bold", "fonts-noto-cjk", f"{_NOTO}/NotoSansCJK-Bold.ttc", 2),
    Style("noto-serif", "fonts-noto-cjk", f"{_NOTO}/NotoSerifCJK-Regular.ttc", 2),
    Style("noto-serif-bold", "fonts-noto-cjk", f"{_NOTO}/NotoSerifCJK-Bold.ttc", 2),
    Style("ukai", "fonts-arphic-ukai", "/usr/share/fonts/truetype/arphic/ukai.ttc", 0),
    Style("uming", "fonts-arphic-uming", "/usr/share/fonts/truetype/arphic/uming.ttc", 0),
    Style("ipa-gothic", "fonts-ipafont-gothic", "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf"),
    Style("ipa-mincho", "fonts-ipafont-mincho", "/usr/share/fonts/opentype/ipafont-mincho/ipam.ttf"),
    Style("wqy-microhei", "fonts-wqy-microhei", "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    Style("wqy-zenhei", "fonts-wqy-zenhei", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
)
PACKAGES = tuple(sorted({s.package for s in STYLES}))


def gb2312_level1(count: int) -> str:
    """The first ``count`` characters of GB2312 level 1, in code order (啊 阿 埃 挨 ...)."""
    if not 1 <= count <= LEVEL1:
        raise DataError(f"glyph-lt: classes={count} is out of range; GB2312 level 1 has 1 to {LEVEL1} characters")
    chars = []
    for row in range(0xB0, 0xD8):
        for col in range(0xA1, 0xFF):
            if len(chars) == count or (row == 0xD7 and col > 0xF9):
                break
            chars.append(bytes([row, col]).decode("gb2312"))
    return "".join(chars)


def check_fonts(styles=STYLES) -> None:
    """Every style's font file is present, or a DataError names the file and the Debian package to install."""
    missing = [s for s in styles if not Path(s.path).is_file()]
    if missing:
        packages = " ".join(sorted({s.package for s in missing}))
        files = ", ".join(s.path for s in missing)
        raise DataError(f"glyph-lt: font files missing: {files}. Install them with `apt-get install {packages}` "
                        f"(make installs the fonts with the data), or set DATA_ROOT= to a folder that already "
                        f"holds the rendered set")


def font_digests(styles=STYLES) -> dict[str, str]:
    """sha256 of each style's font file: the rendered pixels depend on them."""
    return {s.name: sha256_file(s.path) for s in styles}


@lru_cache(maxsize=None)
def _font(style: Style, pixels: int):
    from PIL import ImageFont

    return ImageFont.truetype(style.path, pixels, index=style.face)


def _mask(style: Style, char: str) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("L", (64, 64))
    ImageDraw.Draw(image).text((32, 32), char, fill=255, font=_font(style, 48), anchor="mm")
    return image.tobytes()


def coverage(chars: str, styles=STYLES) -> np.ndarray:
    """bool [len(chars), len(styles)]: whether each style's font has each character. A missing glyph draws
    the font's .notdef (a box, or nothing), the same as a code point no font has."""
    out = np.zeros((len(chars), len(styles)), dtype=bool)
    for j, style in enumerate(styles):
        notdef = _mask(style, "\U0010fffd")
        for i, char in enumerate(chars):
            mask = _mask(style, char)
            out[i, j] = mask != notdef and any(mask)
    return out


def render(char: str, covering: np.ndarray, seed: tuple[int, ...], styles=STYLES) -> np.ndarray:
    """One 32 x 32 uint8 image of ``char`` from ``seed``: style (among ``covering``, the bool row of
    ``coverage``), size, offset, rotation, shear, stroke, clutter strokes, blur, levels and noise, all drawn
    from it. The ranges are wide on purpose: with narrow ones (format 1: em 22..30 px, +-8 degrees, blur up
    to 0.8, noise up to 8) a ResNet-32 teacher read even one-image classes at 98%, leaving DiVE no room."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    choices = np.flatnonzero(covering)
    style = styles[int(choices[rng.integers(len(choices))])]
    canvas = SIDE * SCALE
    pixels = int(rng.integers(18, 31)) * SCALE  # the em size: 18..30 of 32 pixels (small ones lose strokes)
    dx, dy = (float(v) * SCALE for v in rng.uniform(-2.5, 2.5, 2))
    angle = float(rng.uniform(-12.0, 12.0))
    shear = float(rng.uniform(-0.2, 0.2))
    stroke = int(rng.integers(0, 3))  # 0 to 1 pixel in the output
    clutter = int(rng.integers(0, 3))  # stray strokes that cross the glyph
    blur = float(rng.uniform(0.0, 1.1))
    paper = float(rng.uniform(0, 50))
    ink = float(rng.uniform(paper + 110, 255))
    noise = float(rng.uniform(0.0, 16.0))
    image = Image.new("L", (canvas, canvas))
    draw = ImageDraw.Draw(image)
    draw.text((canvas / 2 + dx, canvas / 2 + dy), char, fill=255, font=_font(style, pixels), anchor="mm",
              stroke_width=stroke, stroke_fill=255)
    for _ in range(clutter):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, canvas, 4))
        draw.line((x0, y0, x1, y1), fill=int(rng.integers(120, 256)), width=int(rng.integers(1, 3)))
    image = image.transform(image.size, Image.AFFINE, (1.0, shear, -shear * canvas / 2, 0.0, 1.0, 0.0),
                            resample=Image.BICUBIC, fillcolor=0)
    image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=0)
    image = image.resize((SIDE, SIDE), Image.BOX)
    if blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    coverage_map = np.asarray(image, dtype=np.float32) / 255.0
    out = paper + (ink - paper) * coverage_map + rng.normal(0.0, noise, coverage_map.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def versions() -> dict[str, str]:
    """What decides the pixels besides the seeds: Pillow's and FreeType's versions."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "freetype": str(features.version("freetype2"))}
