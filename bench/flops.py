"""The machine's measured matmul rate, and the FLOPs of a denoising step.

    OMP_NUM_THREADS=2 .venv/bin/python bench/flops.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/flops.py --quick     # 1024^3 matmuls, 2 reps

The rate: GFLOP/s of the fastest of a few n x n x n matmuls (2 n^3 FLOPs each) in float32
and bfloat16, with torch's current thread count. The FLOPs: one guided denoising step of one
image (the U-Net at batch 2, conditional and unconditional) of the shipped text model (32x32,
MiniLM's 32-token context) and of Stable Diffusion 1.5's U-Net (4x64x64 latents, 77x768
context), counted by torch.utils.flop_counter on the meta device: matmuls, convolutions and
attention (2 FLOPs a multiply-add), not the elementwise work. The ideal time of a step is its
FLOPs at 70% of the measured rate (`harness.unet_flops` counts FLOPs for every script).
"""

from __future__ import annotations

import json

import torch
from harness import DTYPES, matmul_rate, parser, report, unet_flops
from sd_unet import SD15_UNET

from difusion.checkpoints import read_metadata
from difusion.model import ModelConfig, default_model_path
from difusion.nn.unet import UNet, UNetConfig

ATTAINABLE = 0.7  # the fraction of the measured matmul rate an ideal step would reach
SHIPPED_CONTEXT = 32  # MiniLM's window (text.MiniLMEncoder's max_length)
SD15_CONTEXT = 77


def shipped_unet_config() -> UNetConfig:
    """The shipped text model's U-Net, read from its file's metadata (no weights loaded)."""
    config = json.loads(read_metadata(default_model_path())["config"])
    return ModelConfig.from_dict(config).unet


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=2048, help="matmul size")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        args.n, args.reps = 1024, 2

    rates = {name: matmul_rate(dtype, args.n, args.reps) for name, dtype in DTYPES.items()}
    records: list[dict] = [
        {"kind": "matmul_rate", "precision": name, "gflops_per_s": r, "n": args.n}
        for name, r in rates.items()
    ]
    rows: list[list[object]] = [
        [f"matmul {args.n}^3 {name}", f"{r:.0f} GFLOP/s", "", "", ""] for name, r in rates.items()
    ]
    shipped = shipped_unet_config()
    size = shipped.sample_size
    models = {  # one image, guided: the U-Net at batch 2
        f"shipped U-Net, {size}x{size}, 1 image guided": (shipped, size, SHIPPED_CONTEXT),
        "SD 1.5 U-Net, 4x64x64, 1 image guided": (
            UNetConfig.from_diffusers_config(SD15_UNET), 64, SD15_CONTEXT,
        ),
    }  # fmt: skip
    for name, (cfg, size, context) in models.items():
        flops = unet_flops(cfg, 2, size, context)
        ideal = {k: flops / (ATTAINABLE * r * 1e9) for k, r in rates.items()}
        with torch.device("meta"):
            params = sum(q.numel() for q in UNet(cfg).parameters())
        records.append({"kind": "step_flops", "model": name, "flops": flops, "params": params,
                        **{f"ideal_s_{k}": v for k, v in ideal.items()}})  # fmt: skip
        rows.append(
            [name, "", f"{flops / 1e9:.1f}", f"{ideal['fp32']:.3g}", f"{ideal['bf16']:.3g}"]
        )
    title = (
        f"Matmul rate and FLOPs per step ({torch.get_num_threads()} threads; ideal = "
        f"{ATTAINABLE:.0%} of the measured rate)"
    )
    headers = ["what", "measured rate", "GFLOP/step", "ideal s/step fp32", "ideal s/step bf16"]
    notes = ["FLOPs: matmuls, convolutions and attention, counted on the meta device."]
    report(args, title, headers, rows, records, notes)


if __name__ == "__main__":
    main()
