"""Our U-Net against diffusers' with the same architecture and the same weights.

    OMP_NUM_THREADS=2 python bench/unet.py            # vs UNet2DModel
    OMP_NUM_THREADS=2 python bench/unet.py --cond     # vs UNet2DConditionModel, with a context

Checks that both give the same output, then times a no-grad forward pass and one training
step (forward + MSE + backward + AdamW step): median over repetitions after warm-up, the two
models interleaved so that load from elsewhere on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel

from difusion.nn.unet import UNet, UNetConfig


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cond", action="store_true", help="cross-attention to a text context")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    cfg = UNetConfig(
        sample_size=args.size,
        block_out_channels=(64, 128, 256),
        attention_levels=(False, True, True),  # attention at 16x16 and 8x8
        attention_head_dim=32,
        context_dim=128 if args.cond else None,
    )
    torch.manual_seed(args.seed)
    cls = UNet2DConditionModel if args.cond else UNet2DModel
    theirs = cls(**cfg.to_diffusers_kwargs())
    ours = UNet(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)

    B = args.batch
    x = torch.randn(B, cfg.in_channels, args.size, args.size)
    t = torch.randint(0, 1000, (B,)).float()
    target = torch.randn_like(x)
    ours_kw: dict[str, torch.Tensor] = {}
    theirs_kw: dict[str, torch.Tensor] = {}
    if args.cond:
        context = torch.randn(B, 16, cfg.context_dim)
        mask = torch.arange(16)[None] < torch.randint(4, 17, (B, 1))
        ours_kw = dict(context=context, context_mask=mask)
        theirs_kw = dict(encoder_hidden_states=context, encoder_attention_mask=mask)

    def run_ours() -> torch.Tensor:
        return ours(x, t, **ours_kw)

    def run_theirs() -> torch.Tensor:
        return theirs(x, t, **theirs_kw, return_dict=False)[0]

    with torch.no_grad():
        a, b = run_ours(), run_theirs()
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"{cls.__name__} vs UNet, batch {B}, {args.size}x{args.size}, "
          f"{sum(q.numel() for q in ours.parameters()) / 1e6:.2f}M parameters, "
          f"threads {torch.get_num_threads()}; max |diff| / max |out| = {err:.1e}")  # fmt: skip
    assert err < 1e-4, "outputs differ"

    def train_step(run: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> None:
        loss = F.mse_loss(run(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    results = {}
    for name, fns in {
        "forward (no_grad)": (run_ours, run_theirs),
        "train step": (
            lambda: train_step(run_ours, opt_ours),
            lambda: train_step(run_theirs, opt_theirs),
        ),
    }.items():
        grad = name == "train step"
        ours.train(grad)
        theirs.train(grad)
        times: tuple[list[float], list[float]] = ([], [])
        with torch.set_grad_enabled(grad):
            for i in range(args.warmup + args.reps):
                for fn, out in zip(fns, times, strict=True):
                    dt = timed(fn)
                    if i >= args.warmup:
                        out.append(dt)
        results[name] = tuple(statistics.median(ts) for ts in times)

    print(f"\n{'':20s} {'ours (s)':>10s} {'diffusers (s)':>14s} {'diffusers/ours':>15s}")
    for name, (o, d) in results.items():
        print(f"{name:20s} {o:10.4f} {d:14.4f} {d / o:15.2f}")


if __name__ == "__main__":
    main()
