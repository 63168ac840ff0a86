"""Images/s of the training loader (`BatchStream`) beside those of a training step.

    OMP_NUM_THREADS=2 python bench/loader.py           # under 2 minutes on 2 idle cores
    OMP_NUM_THREADS=2 python bench/loader.py --quick   # a smoke run, about 20 s

Writes photo-like JPEGs (smooth colour noise, 512x384) to a temporary folder, then, at each
size, times one epoch of `BatchStream` over them (decode, resize, crop, collate; nothing
memoised yet, as on a data set too large to keep decoded) with 0, 1 and 2 worker
processes, and the training step (forward + MSE + backward + AdamW) of the U-Net that
`difusion train` builds by default at that size (on CUDA when there is one): the loader
keeps up while its images/s is above the step's.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import parser, report
from PIL import Image

from difusion.data import FolderDataset
from difusion.data.loader import BatchStream
from difusion.nn.unet import UNet
from difusion.train import TrainConfig, model_config_for


def write_photos(folder: Path, n: int, seed: int = 0) -> None:
    """`n` 512x384 JPEGs of smooth colour noise with a little grain."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((512, 384), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, (384, 512, 3))
        a = np.clip(np.asarray(im, np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{k:05d}.jpg", quality=90)


def loader_rate(
    folder: Path, size: int, workers: int, batch: int, crop: str, flip: bool, pin: bool
) -> float:
    """Images/s of one epoch of a fresh stream (workers' start included)."""
    data = FolderDataset(folder, size=size, cache=False)
    t0 = time.perf_counter()
    stream = BatchStream(data, batch, workers=workers, crop=crop, flip=flip, pin_memory=pin)
    for _ in range(stream.batches_per_epoch):
        stream.next()
    elapsed = time.perf_counter() - t0
    stream.close()
    return stream.batches_per_epoch * batch / elapsed


def train_step_rate(folder: Path, size: int, batch: int, reps: int, device: str) -> float:
    """Images/s of a training step (channels-last, fused AdamW) of the default U-Net at `size`
    (median of `reps` after one warm-up step)."""
    data = FolderDataset(folder, size=size, cache=False)
    cl = torch.channels_last  # as `difusion train` runs it
    unet = UNet(model_config_for(TrainConfig(size=size), data).unet).to(device, memory_format=cl)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, data.channels, size, size, device=device).contiguous(memory_format=cl)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        loss = F.mse_loss(unet(x, t), torch.randn_like(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times[1:])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=None, help="JPEGs to write (default 512)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", choices=["center", "random"], default="center")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--train-batch", type=int, default=None, help="default 4 (--quick: 1)")
    p.add_argument("--reps", type=int, default=None, help="timed training steps (default 2)")
    args = p.parse_args()
    n = args.images or (64 if args.quick else 512)
    train_batch = args.train_batch or (1 if args.quick else 4)
    reps = args.reps or (1 if args.quick else 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        write_photos(folder, n)
        print(f"wrote {n} JPEGs (512x384) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for size in args.sizes:
            step = train_step_rate(folder, size, train_batch, reps, device)
            for workers in args.workers:
                pin = device == "cuda"
                rate = loader_rate(folder, size, workers, args.batch, args.crop, args.flip, pin)
                rows.append((size, workers, f"{rate:.0f}", f"{step:.2f}", f"{rate / step:.0f}"))
                records.append(
                    dict(
                        size=size, workers=workers, loader_images_per_s=rate, step_images_per_s=step
                    )
                )
                print(f"size {size}, workers {workers}: {rate:.0f} images/s", file=sys.stderr)
    report(
        args,
        f"Loader alone vs the training step: {n} JPEGs 512x384, loader batch {args.batch}, "
        f"crop {args.crop}{', flip' if args.flip else ''}; training step batch {train_batch} "
        f"on {device} ({torch.get_num_threads()} threads)",
        ["size", "workers", "loader images/s", "training step images/s", "loader / step"],
        rows,
        records,
    )


if __name__ == "__main__":
    main()
