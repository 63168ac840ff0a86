"""One image decoder for every data set that reads encoded images (files or bytes).

Any Pillow mode becomes RGB (or L with `channels=1`): CMYK and palette images are
converted, 16-bit and 32-bit integer images scaled to 8 bits, transparent images
composited over `background`; EXIF orientation is applied. Images over `max_pixels`
are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

MAX_PIXELS = 1 << 26  # 67 megapixels, e.g. 8192 x 8192

ImageSource = str | Path | bytes | IO[bytes]


def open_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Pillow's lazy image (header read, pixels not yet decoded); ValueError when too large."""
    im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if im.width * im.height > max_pixels:
        im.close()
        raise ValueError(f"{im.width}x{im.height} pixels is over the limit of {max_pixels}")
    return im


def verify_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> bool:
    """Pillow's cheap structural check (no full decode): False when the data is not an image."""
    try:
        with open_image(source, max_pixels) as im:
            im.verify()
        return True
    except Exception:
        return False


def decode_image(
    source: ImageSource,
    size: int | tuple[int, int],
    channels: int = 3,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = MAX_PIXELS,
    crop: bool = True,
) -> torch.Tensor:
    """Decode, orient, flatten alpha, resize the shorter side and centre-crop -> uint8 [C, S, S].

    `size` (height, width): fitted to that shape instead of a square. `crop=False`: only
    resized, to the smallest size that covers `size` (the caller crops) -> [C, H >= h, W >= w].
    """
    h, w = (size, size) if isinstance(size, int) else size
    with open_image(source, max_pixels) as im:
        stored = (h, w) if quarter_turned(im) else (w, h)  # the target as the pixels lie
        im.draft("RGB" if channels == 3 else "L", stored)  # JPEG: decode at reduced scale
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            a = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            im = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            im = im.convert("RGBA")
            base = Image.new("RGBA", im.size, (*background, 255))
            im = Image.alpha_composite(base, im)
        im = im.convert("RGB" if channels == 3 else "L")
        if crop:
            im = ImageOps.fit(im, (w, h), method=Image.Resampling.BICUBIC)
        else:
            im = im.resize(cover_size(im.size, (w, h)), Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.array(a, dtype=np.uint8, order="C"))  # a writable copy


def cover_size(image: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) of `image` (width, height) scaled to just cover `target`."""
    scale = max(target[0] / image[0], target[1] / image[1])
    return max(target[0], round(image[0] * scale)), max(target[1], round(image[1] * scale))


def quarter_turned(im: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns it by a quarter (width and height swap),
    from the header (`getexif` would decode a whole PNG for an eXIf chunk after the pixels)."""
    if not im.info.get("exif"):
        return False
    exif = Image.Exif()
    try:
        exif.load(im.info["exif"])
    except Exception:  # malformed: the decoder's own reading of it decides
        return False
    return exif.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def image_size(source: ImageSource, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as `decode_image` sees the image (EXIF rotation applied), from the
    header alone."""
    with open_image(source, max_pixels) as im:
        w, h = im.size
        return (h, w) if quarter_turned(im) else (w, h)


def first_decodable(
    i: int, n: int, pixels: Callable[[int], torch.Tensor], failed: set[int],
    describe: Callable[[int], str],
) -> tuple[int, torch.Tensor]:  # fmt: skip
    """Image i's pixels, or, if it fails to decode (a file that passed `verify_image`), the
    next one's that does (remembered in `failed`, and warned about once): (its index, its
    pixels)."""
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(i)
    for k in range(n):
        j = (i + k) % n
        if j in failed:
            continue
        try:
            return j, pixels(j)
        except Exception as e:
            failed.add(j)
            logging.getLogger(__name__).warning(
                "%s: cannot decode (%s), skipping it", describe(j), e
            )
    raise RuntimeError(f"no decodable image left ({describe(i)} and all after it failed)")
