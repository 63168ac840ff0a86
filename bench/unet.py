"""Our U-Net against diffusers' with the same architecture and the same weights.

    OMP_NUM_THREADS=2 .venv/bin/python bench/unet.py          # vs UNet2DModel
    OMP_NUM_THREADS=2 .venv/bin/python bench/unet.py --cond   # vs UNet2DConditionModel + context
    OMP_NUM_THREADS=2 .venv/bin/python bench/unet.py --quick  # smoke run: batch 4, 1 rep

Checks that both give the same output, then times a no-grad forward pass and one training
step (forward + MSE + backward + AdamW step): median over repetitions after warm-up, the two
models interleaved so that load from elsewhere on the machine hits both alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import median_times, parser, report, unet_flops
from twins import diffusers_twin

from difusion.nn.unet import UNet, UNetConfig


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--cond", action="store_true", help="cross-attention to a text context")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.batch, args.warmup, args.reps = 4, 1, 1

    cfg = UNetConfig(
        sample_size=args.size,
        block_out_channels=(64, 128, 256),
        attention_levels=(False, True, True),  # attention at 16x16 and 8x8
        attention_head_dim=32,
        context_dim=128 if args.cond else None,
    )
    torch.manual_seed(args.seed)
    ours = UNet(cfg)
    theirs = diffusers_twin(ours)
    name = type(theirs).__name__

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
    print(f"{name} vs UNet, batch {B}, {args.size}x{args.size}, "
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
    for what, fns in {
        "forward (no_grad)": (run_ours, run_theirs),
        "train step": (
            lambda: train_step(run_ours, opt_ours),
            lambda: train_step(run_theirs, opt_theirs),
        ),
    }.items():
        grad = what == "train step"
        ours.train(grad)
        theirs.train(grad)
        with torch.set_grad_enabled(grad):
            times = median_times(
                dict(zip(("ours", "diffusers"), fns, strict=True)), args.warmup, args.reps
            )
        results[what] = times["ours"], times["diffusers"]

    context = 16 if args.cond else None
    records, rows = [], []
    for what, (o, d) in results.items():
        flops = unet_flops(cfg, B, args.size, context, train=what == "train step")
        kind = "unet_train_step" if what == "train step" else "unet_forward"
        records.append({"kind": kind, "model": name, "precision": "fp32", "batch": B,
                        "ours_s": o, "diffusers_s": d, "flops": flops, "rel_err": err})  # fmt: skip
        rows.append([what, f"{o:.4f}", f"{d:.4f}", f"{d / o:.2f}", f"{flops / 1e9:.1f}"])
    params = sum(q.numel() for q in ours.parameters()) / 1e6
    title = (
        f"Our U-Net vs diffusers' {name}, same weights: batch {B}, {args.size}x{args.size}, "
        f"{params:.2f}M parameters, fp32, {torch.get_num_threads()} threads"
    )
    headers = ["", "ours (s)", "diffusers (s)", "diffusers/ours", "GFLOP"]
    notes = [
        f"max |ours - diffusers| / max |diffusers| = {err:.1e}; median of {args.reps} after "
        f"{args.warmup} warm-up, interleaved"
    ]
    report(args, title, headers, rows, records, notes)


if __name__ == "__main__":
    main()
