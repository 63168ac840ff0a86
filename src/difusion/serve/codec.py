"""Images in and out of the API: PNG / base64 / data URLs, and checked uploads (PNG, JPEG
or WebP, in any of their modes, made RGB or RGBA). Each function here is meant to run in a
thread of the codec pool, never on the event loop."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import APIError

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # what Image.open may try: no TIFF, EPS, PCX, ...


def encode(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=FORMATS[fmt])
    return buf.getvalue()


def encode_all(images: list[Image.Image], fmt: str = "png") -> list[bytes]:
    return [encode(image, fmt) for image in images]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64,{b64(data)}"


def from_base64(text: str, field: str) -> bytes:
    """Raw base64 or a data URL (what AUTOMATIC1111's clients send) -> bytes."""
    if not isinstance(text, str) or not text:
        raise APIError(422, "expected a base64-encoded image", field)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise APIError(413, f"larger than {MAX_UPLOAD_BYTES // 2**20} MiB", field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "not valid base64", field) from None


def open_image(data: bytes, field: str) -> Image.Image:
    """Bytes of a PNG, JPEG or WebP file -> an RGB image (RGBA where it has transparency),
    EXIF rotation applied; 413 / 422 naming the field for an oversized, huge, unreadable or
    other kind of file."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise APIError(413, f"larger than {MAX_UPLOAD_BYTES // 2**20} MiB", field)
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        w, h = image.size
        if w * h > MAX_UPLOAD_PIXELS:
            raise APIError(413, f"{w}x{h} is more than {MAX_UPLOAD_PIXELS:,} pixels", field)
        image.load()
        return rgb(ImageOps.exif_transpose(image))
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(413, f"more than {MAX_UPLOAD_PIXELS:,} pixels", field) from None
    except UnidentifiedImageError:
        raise APIError(422, "not a PNG, JPEG or WebP image", field) from None
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, IndexError):
        raise APIError(422, "not a readable image file", field) from None


def rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB, or RGBA where the image has transparency; 16- and 32-bit grey scaled
    to 8 bits (a plain convert would clip it to white)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255, 0, 255).astype(np.uint8), "L")
    transparent = "A" in image.getbands() or "transparency" in image.info
    return image.convert("RGBA" if transparent else "RGB")


def centre_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The largest centred part of `image` with the aspect ratio of width x height (the
    pipeline then scales it), so that nothing is squashed."""
    w, h = image.size
    if w * height == h * width:
        return image
    cw, ch = (w, max(1, round(w * height / width))) if w * height < h * width else (
        max(1, round(h * width / height)), h
    )  # fmt: skip
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def open_base64_image(text: str, field: str) -> Image.Image:
    """A base64 image or data URL, checked as `open_image` checks a file."""
    return open_image(from_base64(text, field), field)


def transparent_area(image: Image.Image) -> Image.Image | None:
    """An image's fully transparent pixels as a white-on-black mask (OpenAI's edit mask), or
    None when it has no transparent pixel."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    return mask if mask.getbbox() else None


def edit_images(
    image: bytes, mask: bytes | None, image_field: str = "image", mask_field: str = "mask"
) -> tuple[Image.Image, Image.Image | None]:
    """An edit's uploads -> the image and its mask (white = redraw), OpenAI's way: a mask's
    transparent pixels are redrawn (without transparency: its white ones); without a mask,
    the image's own transparent pixels, if any."""
    picture = open_image(image, image_field)
    if mask is None:
        return picture, transparent_area(picture)
    drawn = open_image(mask, mask_field)
    return picture, transparent_area(drawn) or drawn.convert("L")


def base64_images(
    image: str | None,
    mask: str | None,
    image_field: str = "image",
    mask_field: str = "mask",
    invert_mask: bool = False,
) -> tuple[Image.Image | None, Image.Image | None]:
    """An image and a mask (white = redraw; black with `invert_mask`) as base64 or data
    URLs, AUTOMATIC1111's and the stream's way."""
    picture = open_base64_image(image, image_field) if image else None
    drawn = open_base64_image(mask, mask_field).convert("L") if mask else None
    if drawn is not None and invert_mask:
        drawn = drawn.point(lambda v: 255 - v)
    return picture, drawn
