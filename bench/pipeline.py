"""Pipeline end to end against diffusers on the same weights, the same work.

    OMP_NUM_THREADS=2 .venv/bin/python bench/pipeline.py          # batch 16, 20 steps, fp32, bf16
    OMP_NUM_THREADS=2 .venv/bin/python bench/pipeline.py --quick  # batch 2, 3 steps

The shipped model is text-conditioned through MiniLM, for which diffusers has no pipeline,
so the comparison is at the level diffusers can run on the same weights: our U-Net's weights
in diffusers' UNet2DConditionModel (`twins.diffusers_twin`), diffusers'
DPMSolverMultistepScheduler with our schedule (`twins.dpm_solver_scheduler`), the prompt
embeddings made once by our text encoder, and diffusers' standard guided loop
(set_timesteps; one U-Net call on the concatenated unconditional and conditional batch;
guidance; scheduler.step). Against it, `Pipeline.sample` (what `Pipeline.__call__` runs,
without the PIL conversion) with the same prompts, initial latents, steps, guidance and
"dpmpp_2m". Both report the same images: the table gives the largest difference.

The shipped model has a layout map, which diffusers' U-Nets lack: both sides run the shipped
weights without it (`twins.without_layout_map`), and the shipped model as it is, layout map
included, is timed beside them. bf16: the U-Net's weights in bfloat16 on both sides
(`Pipeline.to(dtype=...)`; diffusers' `unet.to(dtype)`), the sampler's arithmetic in float32.
Stable Diffusion 1.5 is not compared here: its weights are not on this machine (its U-Net step
is bench/sd_unet.py's).
"""

from __future__ import annotations

import torch
from harness import DTYPES, median_times, parser, report, unet_flops
from twins import diffusers_twin, dpm_solver_scheduler, without_layout_map

from difusion import Pipeline
from difusion.alignment import prompt_set
from difusion.denoiser import Cond


@torch.no_grad()
def diffusers_loop(
    unet: torch.nn.Module,
    scheduler,
    cond: Cond,
    uncond: Cond,
    latents: torch.Tensor,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """diffusers' text-to-image denoising loop (StableDiffusionPipeline's), on given
    embeddings; returns the final latents."""
    scheduler.set_timesteps(steps)
    dtype = unet.dtype
    context = torch.cat([uncond["context"], cond["context"]]).to(dtype)
    mask = cond["context_mask"]
    if mask is not None:
        mask = torch.cat([uncond["context_mask"], mask])
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t).to(dtype)
        out = unet(
            x_in, t, encoder_hidden_states=context, encoder_attention_mask=mask, return_dict=False
        )[0].float()
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + guidance * (out_cond - out_uncond)
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def pipelines(dtype: torch.dtype) -> tuple[Pipeline, Pipeline]:
    """The shipped model as it is, and without its layout map."""
    shipped = Pipeline.from_pretrained("default", dtype=dtype)
    return shipped, Pipeline(without_layout_map(shipped.model)).to(dtype=dtype)


def compare(
    precision: str, prompts: list[str], latents: torch.Tensor, reference: torch.Tensor, args
) -> tuple[dict, list[object]]:
    """Time ours, diffusers' and the shipped model's generation at one precision; compare
    ours and diffusers' images with each other and with `reference`, ours in float32."""
    shipped, ours = pipelines(DTYPES[precision])
    theirs = diffusers_twin(ours.model.unet).eval()
    scheduler = dpm_solver_scheduler(ours.model)
    guidance = shipped.default_guidance if args.guidance is None else args.guidance
    cond, uncond = ours.conditions(prompts)
    kw = dict(steps=args.steps, guidance=guidance, sampler="dpmpp_2m", latents=latents)

    def run_diffusers() -> torch.Tensor:
        return diffusers_loop(theirs, scheduler, cond, uncond, latents, args.steps, guidance)

    images = {"ours": ours.sample(prompts, **kw), "diffusers": run_diffusers()}
    diff = (images["ours"] - images["diffusers"]).abs()
    from_fp32 = {k: (v - reference).abs().mean().item() for k, v in images.items()}
    times = median_times(
        {
            "ours": lambda: ours.sample(prompts, **kw),
            "diffusers": run_diffusers,
            "shipped": lambda: shipped.sample(prompts, **kw),
        },
        args.warmup,
        args.reps,
    )
    context = cond["context"].shape[1]
    flops, flops_shipped = (
        args.steps * unet_flops(pipe.model.config.unet, 2 * len(prompts), 32, context)
        for pipe in (ours, shipped)
    )
    o, d, s = times["ours"], times["diffusers"], times["shipped"]
    record = {"kind": "pipeline", "precision": precision, "batch": len(prompts),
              "steps": args.steps, "guidance": guidance, "ours_s": o, "diffusers_s": d,
              "flops": flops, "max_abs_diff": diff.max().item(),
              "mean_abs_diff": diff.mean().item(), "ours_from_fp32": from_fp32["ours"],
              "diffusers_from_fp32": from_fp32["diffusers"], "shipped_s": s,
              "shipped_flops": flops_shipped}  # fmt: skip
    row = [precision, f"{o:.2f}", f"{d:.2f}", f"{d / o:.2f}", f"{len(prompts) / o:.1f}",
           f"{diff.max():.1e} / {diff.mean():.1e}",
           f"{from_fp32['ours']:.1e} / {from_fp32['diffusers']:.1e}", f"{s:.2f}"]  # fmt: skip
    return record, row


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=16, help="images (one prompt each)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, help="default: the model's own")
    p.add_argument("--precision", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup, args.reps = 2, 3, 1, 1

    prompts = prompt_set(args.batch // 2, args.batch - args.batch // 2, seed=0)
    latents = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, ours_fp32 = pipelines(torch.float32)
    reference = ours_fp32.sample(
        prompts, steps=args.steps, guidance=args.guidance, sampler="dpmpp_2m", latents=latents
    )
    records, rows = [], []
    for precision in args.precision:
        record, row = compare(precision, prompts, latents, reference, args)
        records.append(record)
        rows.append(row)
    title = (
        f"Pipeline vs diffusers' guided loop, the shipped model's weights without its layout "
        f"map: {args.batch} images, {args.steps} steps of DPM-Solver++(2M), guidance "
        f"{records[0]['guidance']:g}, 32x32, {torch.get_num_threads()} threads"
    )
    headers = [
        "precision",
        "Pipeline (s)",
        "diffusers (s)",
        "diffusers/ours",
        "ours images/s",
        "ours vs diffusers: max / mean abs diff",
        "ours / diffusers vs ours fp32: mean abs diff",
        "shipped, with layout map (s)",
    ]
    notes = [
        f"median of {args.reps} after {args.warmup} warm-up, the three interleaved; images in "
        "[-1, 1]; the images' distance from ours in float32 is the yardstick of bf16's own "
        "rounding for their distance from each other",
        "SD 1.5: not run (no SD 1.5 weights on this machine; its U-Net step: bench/sd_unet.py)",
    ]
    report(args, title, headers, rows, records, notes)


if __name__ == "__main__":
    main()
