"""Stable Diffusion 1.5's U-Net: ours against diffusers' UNet2DConditionModel, same weights.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py         # one run of each, ~860M parameters
    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py --reps 3
    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py --precision bf16   # bf16 autocast
    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py --precision bf16-weights
    OMP_NUM_THREADS=2 .venv/bin/python bench/sd_unet.py --quick   # a smoke run: 16x16 latents

Each implementation runs in its own subprocess (so that its peak memory is its own): it
builds the full SD 1.5 U-Net architecture from the config below, fills it with the same
deterministic random weights (generated per parameter name, which both share), and times
denoising steps: one no-grad forward of batch 2 (classifier-free guidance's two branches),
4x64x64 latents (512x512 images), a 77x768 text context. Reported: median seconds per step
after one warm-up step, the resident memory once the weights are in (RSS) and the peak
(getrusage's maxrss), and the relative difference of the two outputs. `--precision bf16`
runs both under bf16 autocast (float32 weights, as a training step would);
`--precision bf16-weights` converts both models' weights to bf16 once (as our `--dtype bf16`
does; diffusers' U-Net keeps no module in float32, so its `.to` is what `torch_dtype` gives)
and feeds them bf16 latents and context, so that no step casts a weight.

Where the time goes: one more step of each runs under torch.profiler, and its kernels' own
time is summed by kind (attention, convolutions, linear layers, casts and copies, the rest),
each beside the rate its FLOPs (counted on the meta device) reach there, and that rate over
the machine's matmul rate at the same precision (bench/flops.py's measurement, redone here).
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
from harness import DTYPES, markdown_table, matmul_rate, parser, report, unet_flops
from torch.utils.flop_counter import FlopCounterMode

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


# what each kernel is, by the name the profiler gives it; the first match wins
KINDS = {
    "attention": (
        "scaled_dot_product",
        "flash_attention",
        "cpu_attention",
        "bf16_attention",
        "f32_attention",
        "bmm",
        "baddbmm",
        "softmax",
    ),
    "convolution": ("convolution",),
    "linear": ("addmm", "aten::mm", "aten::linear", "aten::matmul"),
    "casts and copies": ("copy_", "_to_copy", "contiguous", "clone"),
}
FLOP_KINDS = {"convolution": "convolution", "addmm": "linear", "mm": "linear", "bmm": "attention"}


def kind_of(op: str) -> str:
    return next((k for k, names in KINDS.items() if any(n in op for n in names)), "other")


def profiled_seconds(step) -> dict[str, float]:
    """Seconds of one call of `step` by kind of kernel (each kernel's own time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        kind = kind_of(event.key)
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    return seconds


def flops_by_kind(size: int) -> dict[str, int]:
    """Our U-Net's FLOPs a step by kind, counted on the meta device (where attention runs
    as two batched matmuls)."""
    from difusion.nn.unet import UNet

    with torch.device("meta"):
        model = UNet(UNetConfig.from_diffusers_config(SD15_UNET))
        x, ctx = torch.randn(2, 4, size, size), torch.randn(2, 77, 768)
        with FlopCounterMode(display=False) as counter:
            model(x, torch.zeros(2), context=ctx)
    flops: dict[str, int] = {}
    for op, n in counter.get_flop_counts()["Global"].items():
        kind = FLOP_KINDS.get(str(op).split(".")[-1], "other")
        flops[kind] = flops.get(kind, 0) + n
    return flops


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


def build(impl: str, config: dict = SD15_UNET) -> torch.nn.Module:
    """Our U-Net ("ours") or diffusers' UNet2DConditionModel ("diffusers") of a diffusers
    config, holding `fill`'s weights, for inference."""
    from difusion.nn.unet import UNet

    with torch.device("meta"):
        if impl == "ours":
            model = UNet(UNetConfig.from_diffusers_config(config))
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**config)
    fill(model)
    if impl == "ours":  # as the library loads it (sd/assemble.py, DiffusionModel.load)
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


def step_inputs(
    size: int, config: dict = SD15_UNET, batch: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """A denoising step's latents [batch, C, size, size] and text context [batch, 77, D]
    (batch 2: a guided image's two branches), the same in every run."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    return x, torch.randn(batch, 77, config["cross_attention_dim"], generator=g)


def child(impl: str, reps: int, out: Path, size: int, precision: str) -> None:
    torch.manual_seed(0)
    model = build(impl)
    x, ctx = step_inputs(size)
    if precision == "bf16-weights":
        model.to(torch.bfloat16)
        x, ctx = x.bfloat16(), ctx.bfloat16()
    loaded = rss_mib()
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
        by_kind = profiled_seconds(step)
    torch.save(y.contiguous(), out / f"{impl}.pt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for p in model.parameters())
    result = dict(params=params, times=times, loaded=loaded, peak=peak, by_kind=by_kind)
    (out / f"{impl}.json").write_text(json.dumps(result))


def kinds_table(res: dict, flops: dict[str, int], rate: float) -> str:
    rows = []
    for kind in [*KINDS, "other"]:
        row = [kind]
        for impl in ("ours", "diffusers"):
            secs = res[impl]["by_kind"].get(kind, 0.0)
            total = sum(res[impl]["by_kind"].values())
            row.append(f"{secs:.2f} s ({100 * secs / total:.0f}%)")
        n = flops.get(kind)
        ours = res["ours"]["by_kind"].get(kind, 0.0)
        row.append(f"{n / 1e9:.0f}" if n else "")
        row.append(f"{n / ours / 1e9:.0f} ({100 * n / ours / rate:.0f}%)" if n and ours else "")
        rows.append(row)
    headers = ["kernels", "ours", "diffusers", "GFLOP", "ours: GFLOP/s (% of matmul rate)"]
    return markdown_table(headers, rows)


def attention_shortfall(
    by_kind: dict[str, float], flops: dict[str, int], step_s: float, total: int, rate: float
) -> str:
    """What attention's kernels cost against the convolutions' rate in the same step."""
    attn, conv = by_kind.get("attention", 0.0), by_kind.get("convolution", 0.0)
    if not (attn and conv and flops.get("attention") and flops.get("convolution")):
        return "attention or convolutions were not profiled"
    at_conv_rate = flops["attention"] / (flops["convolution"] / conv)
    projected = step_s - attn + at_conv_rate
    return (
        f"Attention's kernels took {attn:.2f} s; at the convolutions' rate they would take "
        f"{at_conv_rate:.2f} s, and the step {projected:.2f} s ({100 * total / projected / rate:.0f}% "
        f"of the matmul rate, against {100 * total / step_s / rate:.0f}% measured)."
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--precision", choices=["fp32", "bf16", "bf16-weights"], default="fp32")
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
    weights = "bf16" if args.precision == "bf16-weights" else "fp32"
    precision = "bf16" if weights == "bf16" else args.precision
    shown = {"bf16": "bf16 autocast", "bf16-weights": "bf16 weights"}.get(args.precision, "fp32")
    record = {"kind": "sd15_unet_step", "precision": precision, "weights": weights, "batch": 2,
              "size": args.size, "ours_s": s["ours"], "diffusers_s": s["diffusers"],
              "flops": flops, "rel_err": err, "ours_peak_mib": o["peak"],
              "diffusers_peak_mib": d["peak"]}  # fmt: skip
    title = (
        f"SD 1.5 U-Net, ours vs diffusers, same weights: {o['params'] / 1e6:.0f}M parameters, "
        f"batch 2, 4x{args.size}x{args.size}, context 77x768, {shown}, "
        f"{torch.get_num_threads()} threads, "
        f"{args.reps} timed step(s)"
    )
    notes = [
        f"outputs: |ours - diffusers| / |diffusers| = {err:.1e}; {flops / 1e9:.0f} GFLOP a step",
        f"ours/diffusers: {1 / speed:.2f}x the time per step ({speed:.2f}x as fast), "
        f"{o['peak'] / d['peak']:.2f}x the peak memory",
    ]
    headers = ["", "s/step", "RSS loaded", "peak RSS"]
    rate = matmul_rate(DTYPES[precision]) * 1e9
    flops_kind = flops_by_kind(args.size)
    notes.append(
        f"Where the time goes, one profiled step (kernels' own time; matmul rate {rate / 1e9:.0f}"
        f" GFLOP/s at {precision}):\n\n" + kinds_table(res, flops_kind, rate)
    )
    notes.append(attention_shortfall(o["by_kind"], flops_kind, s["ours"], flops, rate))
    record["by_kind"] = {impl: r["by_kind"] for impl, r in res.items()}
    record["flops_by_kind"], record["matmul_rate"] = flops_kind, rate
    report(args, title, headers, rows, [record], notes)
    # bf16 rounds the activations of both, each in its own order
    assert err < (1e-3 if args.precision == "fp32" else 5e-2), "outputs differ"


if __name__ == "__main__":
    main()
