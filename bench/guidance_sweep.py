"""Classifier-free guidance scale against FID and prompt alignment, for a shapes text model.

    .venv/bin/python bench/guidance_sweep.py default -n 200 --feature-net shapes \
        --out docs/guidance_sweep.png > docs/guidance_sweep.md

n real images of the `shapes` world (seed 1, never seen in training: the training set is
seed 0) give the prompts: their canonical captions, in the data's own mix of one- and
two-object scenes. For each scale the model draws one image per prompt (20 DPM-Solver++
steps); the same images give the FID against the real ones (in the feature space of
`--feature-net`, a classifier file or a data set with a shipped classifier) and the fraction
of prompts the strict scorer accepts. Prints a markdown table; `--out` plots both curves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from difusion import Pipeline
from difusion.alignment import score_batch
from difusion.data.shapes import ShapesDataset, canonical_caption
from difusion.metrics import extract_features, fid_from_features, load_feature_net

SCALES = (1.0, 2.0, 4.0, 7.0, 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="'default', a run folder or a model file")
    parser.add_argument("-n", type=int, default=200, help="prompts (and real images)")
    parser.add_argument("--feature-net", default="shapes", help="classifier for the FID")
    parser.add_argument("--batch", type=int, default=100, help="images sampled at once")
    parser.add_argument("--out", default=None, help="PNG plot to write")
    args = parser.parse_args()
    model = Pipeline.from_pretrained(args.model).model
    data = ShapesDataset(seed=1)
    items = [data[i] for i in range(args.n)]
    prompts = [canonical_caption(item["attributes"]) for item in items]
    net = load_feature_net(args.feature_net)
    real_f, _ = extract_features(net, torch.stack([item["image"] for item in items]))
    doubles = sum(len(item["attributes"]["objects"]) == 2 for item in items)
    print(
        f"{args.n} prompts from held-out shapes scenes ({doubles} with two objects); FID in "
        f"{net.name} features against their {args.n} real images; 20 DPM-Solver++ steps\n"
    )
    print("| guidance | FID | one object | two objects | all prompts | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for w in SCALES:
        start = time.monotonic()
        images = []
        for b in range(0, args.n, args.batch):
            chunk = prompts[b : b + args.batch]
            cond, uncond = model.text_cond(chunk), model.text_cond([""] * len(chunk))
            images.append(
                model.sample(len(chunk), steps=20, seed=b, cond=cond, uncond=uncond, guidance=w)
            )
        x = torch.cat(images)
        fid = fid_from_features(real_f, extract_features(net, x)[0])
        s = score_batch(x, prompts)
        rows.append((w, fid, s["pass_rate_single"], s["pass_rate_double"]))
        print(
            f"| {w:g} | {fid:.2f} | {s['pass_rate_single']:.3f} (n={s['n_single']}) | "
            f"{s['pass_rate_double']:.3f} (n={s['n_double']}) | {s['pass_rate']:.3f} | "
            f"{time.monotonic() - start:.0f} |",
            flush=True,
        )
    if args.out:
        plot(rows, Path(args.out), net.name)


def plot(rows: list[tuple[float, float, float, float]], path: Path, net: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(scales, [r[2] for r in rows], marker="o", label="one-object prompts satisfied")
    ax.plot(scales, [r[3] for r in rows], marker="o", label="two-object prompts satisfied")
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("fraction satisfied")
    ax.set_ylim(0, 1.02)
    twin = ax.twinx()
    twin.plot(scales, [r[1] for r in rows], marker="s", color="black", ls="--", label="FID")
    twin.set_ylim(0, 1.15 * max(r[1] for r in rows))
    twin.set_ylabel("FID")
    ax.set_title(f"FID in {net} features", fontsize=8)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(
        lines[0] + more[0], lines[1] + more[1], fontsize=8, ncol=3,
        loc="upper center", bbox_to_anchor=(0.5, -0.2),
    )  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
