"""Seconds a training step takes for each backbone of `difusion compare --recipes` (the
`small` preset's U-Net, `dit` and `dit4`, on 1-channel 32 px images): forward, backward and
AdamW step of each network on the same batch, interleaved, the best of `--repeats`.

    .venv/bin/python bench/recipe_speed.py --batch 32 --repeats 2
"""

import argparse
import time

import torch

from difusion.compare import CompareConfig
from difusion.compare.config import PRESETS
from difusion.compare.study import diffusion_options
from difusion.data.digits import DigitsDataset
from difusion.model import DiffusionModel
from difusion.train import TrainConfig, model_config_for


def network(recipe: str, size: int) -> torch.nn.Module:
    options = diffusion_options(recipe, size, CompareConfig())
    data = DigitsDataset(size=size)
    config = model_config_for(TrainConfig(size=size, **options), data)
    return DiffusionModel(config).unet.to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    assert "dit" in PRESETS["small"]
    nets = {r: network(r, args.size) for r in ("unet-flow", "dit-flow", "dit4-flow")}
    opts = {r: torch.optim.AdamW(n.parameters(), fused=True) for r, n in nets.items()}
    x = torch.randn(args.batch, 1, args.size, args.size).contiguous(
        memory_format=torch.channels_last
    )
    t = torch.rand(args.batch) * 1000
    times: dict[str, list[float]] = {r: [] for r in nets}
    for rep in range(args.repeats + 1):  # the first round warms up
        for r, net in nets.items():
            start = time.perf_counter()
            net(x, t).square().mean().backward()
            opts[r].step()
            opts[r].zero_grad()
            if rep:
                times[r].append(time.perf_counter() - start)
    base = min(times["unet-flow"])
    for r, net in nets.items():
        params = sum(p.numel() for p in net.parameters())
        best = min(times[r])
        print(
            f"{r.split('-')[0]:5s} {params / 1e6:.2f}M parameters  {best:.3f} s/step  "
            f"{best / base:.2f}x the U-Net's"
        )


if __name__ == "__main__":
    main()
