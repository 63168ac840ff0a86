"""Quality vs sampler and number of steps for one trained model, on the same initial noise.

    .venv/bin/python bench/samplers.py runs/digits --data digits -n 300

Prints FID / precision / recall on the data set's shipped classifier features, and
images per second, for the 1000-step DDPM and the fast samplers.
"""

from __future__ import annotations

import argparse

from difusion.evaluate import evaluate
from difusion.model import DiffusionModel, resolve_checkpoint

RUNS = [
    ("ddpm", 1000),
    ("ddim", 50),
    ("euler", 20),
    ("heun", 10),
    ("dpmpp_2m", 20),
    ("dpmpp_2m", 10),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("--data", required=True)
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--feature-net", default=None)
    args = parser.parse_args()
    model = DiffusionModel.load(resolve_checkpoint(args.run))
    print(
        f"| sampler | steps | FID ({args.data} classifier, n={args.n}) | precision | recall | images/s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for sampler, steps in RUNS:
        r = evaluate(
            model, args.data, args.n, args.feature_net or args.data, sampler=sampler, steps=steps
        )
        print(
            f"| {sampler} | {steps} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['images_per_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
