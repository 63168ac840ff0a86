"""Stable Diffusion 1.5's U-Net: ours against diffusers' UNet2DConditionModel, same weights.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py         # one run of each, ~860M parameters
    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py --reps 3
    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py --precision bf16   # bf16 autocast
    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py --quick   # a smoke run: 16x16 latents

Each implementation runs in its own subprocess (so that its peak memory is its own): it
builds the full SD 1.5 U-Net architecture from the config below, fills it with the same
deterministic random weights (generated per parameter name, which both share), and times
denoising steps: one no-grad forward of batch 2 (classifier-free guidance's two branches),
4x64x64 latents (512x512 images), a 77x768 text context. Reported: median seconds per step
after one warm-up step, the resident memory once the weights are in (RSS) and the peak
(getrusage's maxrss), and the relative difference of the two outputs. `--precision bf16`
runs both under bf16 autocast (float32 weights, as a training step would).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from harness import parser, report, unet_flops

from difusion.nn.unet import UNetConfig

# huggingface.co/runwayml/stable-diffusion-v1-5, unet/config.json
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fill(model: torch.nn.Module) -> None:
    """Deterministic weights from each parameter's name (the same in both implementations):
    N(0, 1/fan_in) for matrices and kernels, 1 +- 0.02 for norm scales, +-0.02 for biases."""
    state = {}
    for name, p in model.state_dict().items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = torch.randn(p.shape, generator=g)
        if p.dim() > 1:
            t *= p[0].numel() ** -0.5
        elif name.endswith("weight"):
            t = 1 + 0.02 * t
        else:
            t *= 0.02
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)


def child(impl: str, reps: int, out: Path, size: int, precision: str) -> None:
    from difusion.nn.unet import UNet

    torch.manual_seed(0)
    with torch.device("meta"):
        if impl == "ours":
            model = UNet(UNetConfig.from_diffusers_config(SD15_UNET))
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**SD15_UNET)
    fill(model)
    if impl == "ours":  # as the library loads it (sd.py, DiffusionModel.load)
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    loaded = rss_mib()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([981.0, 981.0])

    def step() -> torch.Tensor:
        if impl == "ours":
            return model(x, t, context=ctx)
        return model(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    times = []
    bf16 = precision == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = step().float()  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    torch.save(y.contiguous(), out / f"{impl}.pt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in model.parameters())
    result = dict(params=params, times=times, loaded=loaded, peak=peak)
    (out / f"{impl}.json").write_text(json.dumps(result))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--size", type=int, default=64, help="latent size (64: 512x512 images)")
    p.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.reps, args.size = 1, 16
    if args.impl:
        child(args.impl, args.reps, args.out, args.size, args.precision)
        return

    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for impl in ("ours", "diffusers"):
            cmd = [sys.executable, __file__, "--impl", impl, "--reps", str(args.reps)]
            cmd += ["--size", str(args.size), "--precision", args.precision]
            subprocess.run([*cmd, "--out", tmp], check=True, env=os.environ.copy())
            res[impl] = json.loads((Path(tmp) / f"{impl}.json").read_text())
        a = torch.load(Path(tmp) / "ours.pt", weights_only=True)
        b = torch.load(Path(tmp) / "diffusers.pt", weights_only=True)
    err = float((a - b).norm() / b.norm())
    s = {impl: statistics.median(r["times"]) for impl, r in res.items()}
    o, d = res["ours"], res["diffusers"]
    speed = s["diffusers"] / s["ours"]
    rows = [
        [impl, f"{s[impl]:.2f}", f"{r['loaded']:.0f} MiB", f"{r['peak']:.0f} MiB"]
        for impl, r in res.items()
    ]
    flops = unet_flops(UNetConfig.from_diffusers_config(SD15_UNET), 2, args.size, 77)
    record = {"kind": "sd15_unet_step", "precision": args.precision, "batch": 2,
              "size": args.size, "ours_s": s["ours"], "diffusers_s": s["diffusers"],
              "flops": flops, "rel_err": err, "ours_peak_mib": o["peak"],
              "diffusers_peak_mib": d["peak"]}  # fmt: skip
    title = (
        f"SD 1.5 U-Net, ours vs diffusers, same weights: {o['params'] / 1e6:.0f}M parameters, "
        f"batch 2, 4x{args.size}x{args.size}, context 77x768, {args.precision}"
        f"{' autocast' if args.precision == 'bf16' else ''}, {torch.get_num_threads()} threads, "
        f"{args.reps} timed step(s)"
    )
    notes = [
        f"outputs: |ours - diffusers| / |diffusers| = {err:.1e}; {flops / 1e9:.0f} GFLOP a step",
        f"ours/diffusers: {1 / speed:.2f}x the time per step ({speed:.2f}x as fast), "
        f"{o['peak'] / d['peak']:.2f}x the peak memory",
    ]
    headers = ["", "s/step", "RSS loaded", "peak RSS"]
    report(args, title, headers, rows, [record], notes)
    # bf16 rounds the activations of both, each in its own order
    assert err < (1e-3 if args.precision == "fp32" else 5e-2), "outputs differ"


if __name__ == "__main__":
    main()
