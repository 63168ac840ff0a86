"""Prompt alignment and speed of a distilled student beside its teacher, in one run.

    .venv/bin/python bench/distill_alignment.py default-fast --teacher default

The 200 + 200 prompts per seed of docs/text-to-image.md (`difusion eval --alignment
--prompts 200`), the teacher at 20 steps of its own sampler and guidance, the student at 1,
2, 4 and 8 steps of `lcm` at the same guidance; images/s of the sampling alone, batches of
200 on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from difusion.evaluate import evaluate_alignment
from difusion.model import DiffusionModel, resolve_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("student")
    p.add_argument("--teacher", default="default")
    p.add_argument("--steps", default="1,2,4,8", help="student step counts")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--prompts", type=int, default=200, help="of each kind per seed")
    args = p.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; seeds {seeds}, "
          f"{args.prompts} + {args.prompts} prompts a seed")  # fmt: skip
    print("| model | sampler, steps | guidance | one object | two objects | images/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    runs = [(args.teacher, None)] + [(args.student, int(k)) for k in args.steps.split(",")]
    for name, steps in runs:
        model = DiffusionModel.load(resolve_checkpoint(name))
        r = evaluate_alignment(model, args.prompts, args.prompts, seeds, steps=steps)
        print(f"| {name} | {r['sampler']}, {r['steps']} | {r['guidance']:g} | "
              f"{100 * r['alignment_single']:.1f}% | {100 * r['alignment_double']:.1f}% | "
              f"{r['images_per_s']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
