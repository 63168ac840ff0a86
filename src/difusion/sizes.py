"""What image sizes a model makes, and whether the memory a size takes is there.

A U-Net is convolutional, so it runs at any size its levels divide, but it draws well only
near the size it was trained at: a 32 px model asked for 64x64 draws four small scenes side
by side. So a model makes its own square size, and a latent model trained at 256 px or more
(Stable Diffusion) also any width and height from 256 to 1024 in steps of 64. Whatever the
rule allows must also fit in memory: `sampling_bytes` and `training_bytes` are lower bounds
of what the U-Net's activations take (the tensors kept for its skip connections, and for
training those kept for the backward pass), so a refusal is never of something that fits.
"""

from __future__ import annotations

import os

import torch

FLEXIBLE_SIDES = range(256, 1025, 64)  # Stable Diffusion-sized models: any WxH of these
COMMON_SIZES = ((512, 512), (768, 768), (512, 768), (768, 512), (256, 256), (1024, 1024))
GIB = 1 << 30


def sizes_made(native: int, flexible: bool) -> list[tuple[int, int]]:
    """(width, height) of the sizes a model names: its own first, then the common ones."""
    return list(dict.fromkeys([(native, native), *(COMMON_SIZES if flexible else ())]))


def size_rule(native: int, flexible: bool) -> str:
    """The sizes a model makes, as a refusal states them."""
    named = ", ".join(f"{w}x{h}" for w, h in sizes_made(native, flexible))
    if not flexible:
        return f"this model makes {named}"
    lo, hi, step = FLEXIBLE_SIDES[0], FLEXIBLE_SIDES[-1], FLEXIBLE_SIDES.step
    return f"this model makes {named}, or any WxH with both sides multiples of {step} from {lo} to {hi}"


def makes_size(width: int, height: int, native: int, flexible: bool) -> bool:
    if (width, height) in sizes_made(native, flexible):
        return True
    return flexible and width in FLEXIBLE_SIDES and height in FLEXIBLE_SIDES


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors on `device`: the GPU's free memory, or the host's available
    memory (MemAvailable; free pages where /proc/meminfo is absent)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(needed: int, device: torch.device, what: str) -> None:
    """A ValueError when `what` needs more than `device` has free."""
    free = available_memory(device)
    if needed > free:
        raise ValueError(
            f"{what} needs at least {needed / GIB:,.1f} GiB; {device.type} has "
            f"{free / GIB:,.1f} GiB free"
        )


def _level_pixels(channels: tuple[int, ...], height: int, width: int) -> int:
    """Channels x pixels summed over a U-Net's levels (each halves the sides)."""
    return sum(c * max(1, height >> i) * max(1, width >> i) for i, c in enumerate(channels))


def sampling_bytes(
    channels: tuple[int, ...], layers_per_block: int, batch: int, height: int, width: int
) -> int:
    """A lower bound of a U-Net's float32 activations for one step at height x width (model
    pixels): the skip tensors of every level (layers_per_block + 1 each) and four working
    tensors at the top level."""
    kept = (layers_per_block + 1) * _level_pixels(channels, height, width)
    return 4 * batch * (kept + 4 * channels[0] * height * width)


def training_bytes(channels: tuple[int, ...], layers_per_block: int, batch: int, size: int) -> int:
    """A lower bound of what a training step keeps for its backward pass: each ResBlock's
    normalised, activated and convolved tensors (three a block, down and up paths)."""
    blocks = 2 * layers_per_block + 1
    return 4 * batch * 3 * blocks * _level_pixels(channels, size, size)


def check_training_size(
    size: int,
    batch: int,
    channels: tuple[int, ...],
    layers_per_block: int,
    device: torch.device,
) -> None:
    """A ValueError for a U-Net training size its levels do not divide, or whose batch's
    activations cannot fit in `device`'s free memory (before any data is decoded at it)."""
    multiple = 2 ** (len(channels) - 1)
    if size < multiple or size % multiple:
        raise ValueError(
            f"--size {size}: a U-Net of {len(channels)} levels needs a multiple of {multiple}"
        )
    needed = training_bytes(channels, layers_per_block, batch, size)
    check_memory(needed, device, f"--size {size}: a batch of {batch}")
