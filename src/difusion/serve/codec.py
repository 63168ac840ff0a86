"""Images in and out of the API: PNG / base64 / data URLs, and checked uploads."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import APIError

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode(image: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=FORMATS[fmt])
    return buf.getvalue()


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
    """Bytes of an image file -> a PIL image, EXIF rotation applied; 413 / 422 naming the
    field for an oversized, huge or unreadable file."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise APIError(413, f"larger than {MAX_UPLOAD_BYTES // 2**20} MiB", field)
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > MAX_UPLOAD_PIXELS:
            raise APIError(413, f"{w}x{h} is more than {MAX_UPLOAD_PIXELS:,} pixels", field)
        image.load()
        return ImageOps.exif_transpose(image)
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(413, f"more than {MAX_UPLOAD_PIXELS:,} pixels", field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise APIError(422, "not a readable image file", field) from None


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
