"""The speed row of the GAN table, on one budget of a `difusion compare --budgets` sweep:
images/s of the GAN (one pass), its diffusion teacher (DPM-Solver++ 20 steps) and the
distilled student (1, 2 and 4 `lcm` steps), on one batch, in one run.

    .venv/bin/python bench/sweep_speed.py compare/fashion/sweep --budget 20
"""

from __future__ import annotations

from pathlib import Path

import torch
from harness import parser, report

from difusion.compare.evaluation import images_per_second
from difusion.model import DiffusionModel
from difusion.nn.gan import GAN


def main() -> None:
    p = parser(__doc__)
    p.add_argument("sweep", type=Path, help="a sweep folder: <out>/<data>/sweep")
    p.add_argument("--budget", type=float, required=True, help="the budget's student (minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    runs = args.sweep / f"seed{args.seed}"
    device = torch.device("cpu")
    b, r = args.batch, 1 if args.quick else args.repeats
    gan = GAN.load(runs / "gan" / "model.safetensors", device).eval()
    teacher = DiffusionModel.load(runs / "diffusion" / "model.safetensors").eval()
    student = DiffusionModel.load(runs / f"student-{args.budget:g}min" / "model.safetensors").eval()
    z = gan.noise(b, 0)
    with torch.inference_mode():
        timings = {"GAN (one pass)": images_per_second(lambda: gan.sample(b, z=z), b, r, device)}
        timings["diffusion, DPM-Solver++ 20 steps"] = images_per_second(
            lambda: teacher.sample(b, sampler="dpmpp_2m", steps=20, seed=0), b, r, device
        )
        for steps in (1, 2, 4):
            timings[f"student, {steps} lcm step{'s' if steps > 1 else ''}"] = images_per_second(
                lambda steps=steps: student.sample(b, sampler="lcm", steps=steps, seed=0),
                b, r, device,
            )  # fmt: skip
    rows = [(name, f"{t['mean']:,.1f}", f"{t['std']:,.1f}") for name, t in timings.items()]
    records = [{"model": name, **t} for name, t in timings.items()]
    report(
        args,
        f"Images/s on a batch of {b} ({r} timed runs after one warm-up, "
        f"{torch.get_num_threads()} threads): {args.sweep}, seed {args.seed}, "
        f"the {args.budget:g}-minute student",
        ["model", "images/s", "std"],
        rows,
        records,
    )


if __name__ == "__main__":
    main()
