"""Tensors <-> pictures: grids, labelled strips and trajectory animations."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, C, H, W] in [-1, 1] -> PIL images (L for one channel, RGB for three)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], "L") for a in arr]
    return [Image.fromarray(a, "RGB") for a in arr]


def grid(
    images: list[Image.Image], cols: int | None = None, scale: int = 1, pad: int = 2
) -> Image.Image:
    """Tile images on a dark background, optionally upscaled (nearest) for small pictures."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].width * scale, images[0].height * scale
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (24, 24, 24))
    for i, im in enumerate(images):
        im = im.convert("RGB").resize((w, h), Image.NEAREST)
        canvas.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return canvas


def trajectory_frame(
    info: dict,
    scale: int = 1,
    cols: int | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Image.Image:
    """A sampler step as a picture: the noisy x in the model's own unit-variance view (for a
    latent model, that noisy latent through `decode`, its VAE's decoder)."""
    x = info["x"] / (1 + info["sigma"] ** 2) ** 0.5
    if decode is not None:
        with torch.no_grad():
            x = decode(x).clamp(-1, 1)
    return grid(to_pil(x), cols=cols, scale=scale)


def auto_scale(size: int, target: int = 96) -> int:
    return max(1, target // size)


def labelled_strip(images: list[Image.Image], labels: list[str], pad: int = 4) -> Image.Image:
    """Images side by side, each with a caption line below."""
    font = ImageFont.load_default()
    w, h = images[0].size
    line = 14
    lines = max(label.count("\n") + 1 for label in labels)
    canvas = Image.new("RGB", (len(images) * (w + pad) + pad, h + 2 * pad + lines * line), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        x = pad + i * (w + pad)
        canvas.paste(im.convert("RGB"), (x, pad))
        draw.multiline_text((x, h + pad + 2), label, fill="black", font=font, spacing=2)
    return canvas


def save_gif(
    frames: list[Image.Image], path: str | Path, ms_per_frame: int = 80, hold: int = 1000
) -> None:
    """An animation that pauses on its last frame."""
    durations = [ms_per_frame] * (len(frames) - 1) + [hold]
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False
    )


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """An image file -> [1, 3, size, size] in [-1, 1]: any mode, resized and centre-cropped."""
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    im = im.convert("RGB")
    scale = size / min(im.size)
    im = im.resize(
        (max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC
    )
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return t.permute(2, 0, 1)[None].float() / 127.5 - 1
