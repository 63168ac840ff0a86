"""Prompt alignment of a text model against the classifier-free guidance scale.

    .venv/bin/python bench/guidance_sweep.py default --prompts 36 --out docs/guidance_sweep.png

For each scale: the fraction of one-object and two-object canonical prompts (prompt_set,
seed 0) that the strict scorer accepts, 20 DPM-Solver++ steps. Prints a markdown table.
"""

from __future__ import annotations

import argparse

from difusion import Pipeline
from difusion.evaluate import evaluate_alignment
from difusion.train import plot_series

SCALES = (1.0, 2.0, 4.0, 7.0, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="'default', a run folder or a model file")
    parser.add_argument("--prompts", type=int, default=36, help="prompts of each kind")
    parser.add_argument("--out", default=None, help="PNG plot to write")
    args = parser.parse_args()
    model = Pipeline.from_pretrained(args.model).model
    rows = []
    print(f"| guidance | one object (n={args.prompts}) | two objects (n={args.prompts}) |")
    print("| --- | --- | --- |")
    for w in SCALES:
        r = evaluate_alignment(model, args.prompts, args.prompts, (0,), guidance=w)
        rows.append((w, r["alignment_single"], r["alignment_double"]))
        print(f"| {w:g} | {r['alignment_single']:.3f} | {r['alignment_double']:.3f} |", flush=True)
    if args.out:
        from pathlib import Path

        scales = [w for w, _, _ in rows]
        series = {
            "one-object prompts": (scales, [s for _, s, _ in rows]),
            "two-object prompts": (scales, [d for _, _, d in rows]),
        }
        plot_series(Path(args.out), series, "prompts satisfied", log=False, xlabel="guidance scale")


if __name__ == "__main__":
    main()
