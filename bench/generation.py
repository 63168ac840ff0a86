"""Generation without waste: the shipped model's images per second, before and after.

    OMP_NUM_THREADS=2 .venv/bin/python bench/generation.py           # batch 16, 20 steps
    OMP_NUM_THREADS=2 .venv/bin/python bench/generation.py --quick   # batch 2, 3 steps

`Pipeline.sample` (what `Pipeline.__call__` runs, without the PIL conversion) with
DPM-Solver++(2M) and the model's guidance (both branches in one batched call), three ways:

- before: the old path, rebuilt here by switching the new code off: every U-Net call
  recomputes the prompt's cross-attention keys and values and the layout maps
  (`Denoiser.prepare` made a no-op), under `torch.no_grad` instead of `inference_mode`;
- K/V once: as shipped, fp32: the prompt-only work done once per generation;
- bf16: the same, with the U-Net's weights in bfloat16 (`dtype=torch.bfloat16`); the noise,
  the sampler and the schedule stay float32. Fast only on CPUs with native bf16 (AVX-512 bf16
  or AMX); elsewhere bf16 matmuls are emulated and slower than fp32.

Median seconds per generation over interleaved repetitions, so that load from elsewhere on
the machine hits every row alike; the table also gives each row's largest and mean
difference from the fp32 images, in [-1, 1] pixel units.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from harness import median_times, parser, report

from difusion import Pipeline
from difusion.denoiser import Denoiser
from difusion.model import DiffusionModel

PROMPT = "a red circle to the left of a blue square"


@contextlib.contextmanager
def old_path() -> Iterator[None]:
    """The path before prepared contexts: nothing prepared, sampling under no_grad."""
    prepare, sample = Denoiser.prepare, DiffusionModel.sample
    Denoiser.prepare = lambda self, cond: cond  # type: ignore[method-assign]
    DiffusionModel.sample = torch.no_grad()(sample.__wrapped__)  # type: ignore[method-assign]
    try:
        yield
    finally:
        Denoiser.prepare, DiffusionModel.sample = prepare, sample  # type: ignore[method-assign]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.batch, args.steps, args.reps = 2, 3, 1

    fp32 = Pipeline.from_pretrained("default")
    bf16 = Pipeline.from_pretrained("default", dtype=torch.bfloat16)
    kw = dict(n=args.batch, steps=args.steps, sampler="dpmpp_2m", seed=0)

    def before() -> torch.Tensor:
        with old_path():
            return fp32.sample(PROMPT, **kw)

    runs = {
        "fp32, before (K/V every step)": before,
        "fp32, K/V once": lambda: fp32.sample(PROMPT, **kw),
        "bf16 weights, K/V once": lambda: bf16.sample(PROMPT, **kw),
    }
    reference = runs["fp32, K/V once"]()
    diffs = {name: (fn() - reference).abs() for name, fn in runs.items()}  # also warms up
    seconds = median_times(runs, warmup=0, reps=args.reps)
    base = seconds["fp32, before (K/V every step)"]
    rows, records = [], []
    for name, s in seconds.items():
        d = diffs[name]
        rows.append(
            [name, f"{args.batch / s:.2f}", f"{base / s:.2f}x", f"{d.max():.2g}", f"{d.mean():.2g}"]
        )
        records.append(
            dict(
                kind="generation", name=name, batch=args.batch, steps=args.steps, seconds=s,
                images_per_second=args.batch / s, max_diff=float(d.max()),
                mean_diff=float(d.mean()),
            )
        )  # fmt: skip
    report(
        args,
        f"Pipeline.from_pretrained('default'): batch {args.batch}, {args.steps} steps of "
        f"dpmpp_2m, guidance {fp32.default_guidance:g} ({torch.get_num_threads()} threads)",
        ["path", "images/s", "vs before", "max |diff|", "mean |diff|"],
        rows,
        records,
        notes=[f"median of {args.reps} interleaved runs each; diffs vs fp32 K/V once"],
    )


if __name__ == "__main__":
    main()
