"""The size of a LoRA adapter `difusion train --init SD --lora RANK --lora-targets T` trains on
Stable Diffusion 1.5's U-Net: its layers and its file (float32), for a few ranks and targets.

    .venv/bin/python bench/lora_sizes_sd.py

The U-Net is built on the meta device from SD 1.5's config (no weights, no download) and given
the adapter as training gives it (`difusion.lora.add_trainable`).
"""

from __future__ import annotations

import torch
from sd_unet import SD15_UNET

from difusion import lora
from difusion.model import DiffusionModel, ModelConfig
from difusion.nn.unet import UNet, UNetConfig

CASES = [(4, "attn"), (8, "attn"), (8, "attn+ff"), (16, "attn+ff"), (8, "all")]


def main() -> None:
    print("| `--lora` | `--lora-targets` | layers | file |\n| --- | --- | --- | --- |")
    for rank, targets in CASES:
        with torch.device("meta"):
            unet = UNet(UNetConfig.from_diffusers_config(SD15_UNET))
            config = ModelConfig(unet=unet.config, image_size=64, channels=4)
            model = DiffusionModel(config, unet)
            layers = lora.add_trainable(model, rank, None, targets)
        params = sum(t.numel() for t in lora.adapter_state(model).values())
        print(f"| {rank} | {targets} | {layers} | {params * 4 / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
