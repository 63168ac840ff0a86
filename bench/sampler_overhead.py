"""What each sampler costs beside the U-Net: time per step with a network that does nothing.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sampler_overhead.py            # batch 16, 20 steps
    OMP_NUM_THREADS=2 .venv/bin/python bench/sampler_overhead.py --quick    # fewer reps

For every sampler of `difusion.samplers.SAMPLERS`, at the shipped model's size (3x32x32),
its sigmas, batch 16, fp32: the sampler alone with a denoiser that returns x * 0.9, and
`DiffusionModel.sample` with the shipped model's text conditions and guidance but a network
that returns x * 0.9 (so the sigmas, the initial noise, the denoiser's scaling, guidance's
doubled batch and the x0 clamp are in it; the U-Net is not). Against them, one evaluation of
the shipped model's guided denoiser (its U-Net at batch 32, conditional and unconditional).
Overhead % = the `sample` path's time per step over the U-Net's evaluations in a step.
"""

from __future__ import annotations

import torch
from harness import median_times, parser, report
from torch import nn

from difusion import Pipeline
from difusion.alignment import prompt_set
from difusion.model import DiffusionModel
from difusion.samplers import SAMPLERS, get_sampler, initial_noise


class NullNet(nn.Module):
    """Stands in for the U-Net: any condition, output x * 0.9."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # the model's device and dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return x * 0.9


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=20, help="timed runs of each sampler")
    p.add_argument("--unet-reps", type=int, default=5, help="timed U-Net evaluations")
    args = p.parse_args()
    if args.quick:
        args.reps, args.unet_reps = 3, 1

    pipe = Pipeline.from_pretrained("default")
    model = pipe.model
    null = DiffusionModel(model.config, NullNet(), model.text_encoder).eval()
    prompts = prompt_set(args.batch // 2, args.batch - args.batch // 2, seed=0)
    cond, uncond = pipe.conditions(prompts)
    guidance = pipe.default_guidance
    sigmas = model.schedule.sample_sigmas(args.steps, model.config.spacing)
    shape = (args.batch, model.config.channels, model.config.image_size, model.config.image_size)
    x = initial_noise(shape, float(sigmas[0]), torch.Generator().manual_seed(0))

    evals = 0

    def do_nothing(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal evals
        evals += 1
        return x * 0.9

    fns, evals_per_step = {}, {}
    for name in SAMPLERS:
        sample = get_sampler(name)
        evals = 0
        sample(do_nothing, x, sigmas, generator=torch.Generator().manual_seed(0))
        evals_per_step[name] = evals / args.steps
        fns[f"{name} alone"] = lambda sample=sample: sample(
            do_nothing, x, sigmas, generator=torch.Generator().manual_seed(0)
        )
        fns[f"{name} path"] = lambda name=name: null.sample(
            args.batch, sampler=name, steps=args.steps, cond=cond, uncond=uncond,
            guidance=guidance, seed=0,
        )  # fmt: skip
    times = median_times(fns, warmup=1, reps=args.reps)
    denoise = model.guided_denoiser(cond, uncond, guidance)
    with torch.no_grad():
        unet = median_times({"unet": lambda: denoise(x, sigmas[1])}, 1, args.unet_reps)["unet"]

    records, rows = [], []
    for name in SAMPLERS:
        alone, path = (times[f"{name} {k}"] / args.steps for k in ("alone", "path"))
        pct = 100 * path / (evals_per_step[name] * unet)
        records.append({"kind": "sampler_overhead", "sampler": name, "batch": args.batch,
                        "steps": args.steps, "evals_per_step": evals_per_step[name],
                        "sampler_s_per_step": alone, "path_s_per_step": path,
                        "unet_eval_s": unet, "overhead_pct": pct})  # fmt: skip
        rows.append([name, f"{evals_per_step[name]:.2f}", f"{alone * 1e3:.2f}",
                     f"{path * 1e3:.2f}", f"{pct:.2f}%"])  # fmt: skip
    title = (
        f"Sampler overhead per step: batch {args.batch}, 3x32x32, {args.steps} steps, guidance "
        f"{guidance:g}, fp32, {torch.get_num_threads()} threads; one guided U-Net evaluation: "
        f"{unet * 1e3:.0f} ms"
    )
    headers = [
        "sampler",
        "U-Net evaluations/step",
        "sampler alone (ms/step)",
        "sample() without the U-Net (ms/step)",
        "overhead, % of the U-Net's time",
    ]
    notes = [f"median of {args.reps} runs (U-Net: of {args.unet_reps}) after one warm-up"]
    report(args, title, headers, rows, records, notes)


if __name__ == "__main__":
    main()
