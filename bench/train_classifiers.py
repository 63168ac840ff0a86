"""Train the small per-data-set classifiers that ship in src/difusion/weights/.

They are the fast feature networks of `difusion eval` (FID/KID/precision/recall on their
penultimate layer) and the judges of mode coverage. Reproduce with:

    .venv/bin/python bench/train_classifiers.py digits fashion
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from difusion.data import load_dataset
from difusion.nn.classifier import accuracy, train_classifier

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "difusion" / "weights"
STEPS = {"digits": 300, "fashion": 1500}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("datasets", nargs="+", choices=sorted(STEPS))
    args = parser.parse_args()
    WEIGHTS.mkdir(exist_ok=True)
    for name in args.datasets:
        data = load_dataset(name)
        n = len(data)
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        held_out = idx[: n // 10].tolist()
        train_part = torch.utils.data.Subset(data, idx[n // 10 :].tolist())
        for attr in ("channels", "size", "num_classes", "class_names"):
            setattr(train_part, attr, getattr(data, attr))
        start = time.monotonic()
        model = train_classifier(train_part, steps=STEPS[name])
        seconds = time.monotonic() - start
        held = torch.utils.data.Subset(data, held_out)
        for attr in ("channels", "size", "num_classes", "class_names"):
            setattr(held, attr, getattr(data, attr))
        acc = accuracy(model, held)
        model.save(WEIGHTS / f"classifier-{name}.safetensors")
        print(
            f"{name}: held-out accuracy {acc:.4f} ({len(held_out)} images), trained in {seconds:.0f} s"
        )


if __name__ == "__main__":
    main()
