"""Time per training step and per sampled image: the same small U-Net (32 channels, 3 levels, no attention) in pixel space vs in the
latent space of an f=4 KL autoencoder, on 64x64 `shapes`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/latent_vs_pixel.py [--batch 8] [--steps 5]

The VAE is untrained (its speed does not depend on its weights); a latent training step
includes encoding the batch, a latent sample includes decoding it. Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import time

import torch

from difusion.data import collate, load_dataset
from difusion.model import DiffusionModel
from difusion.nn.vae import AutoencoderKL, VAEConfig
from difusion.objective import diffusion_loss
from difusion.train import TrainConfig, model_config_for


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench(dataset, vae, args) -> tuple[float, float, int]:
    cfg = TrainConfig(
        channels=32, channel_mult=(1, 2, 2), attention_resolutions=(), layers_per_block=1
    )
    latent = None
    if vae is not None:
        latent = {"vae": vae.config.to_dict(), "sha256": "bench", "path": ""}
    torch.manual_seed(0)
    model = DiffusionModel(model_config_for(cfg, dataset, None, latent))
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = collate([dataset[i] for i in range(args.batch)])["image"]

    def train_step() -> None:
        x0 = batch
        if vae is not None:
            with torch.no_grad():
                x0 = vae.encode_latents(x0, generator=g)
        x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = diffusion_loss(model.unet, model, x0, None, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def sample_one() -> None:
        model.eval()
        x = model.sample(1, steps=args.sample_steps, seed=0)
        if vae is not None:
            vae.decode_latents(x)
        model.train()

    params = sum(p.numel() for p in model.unet.parameters())
    return timed(train_step, args.steps), timed(sample_one, args.samples), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--samples", type=int, default=4, help="timed sampled images")
    parser.add_argument("--sample-steps", type=int, default=20, help="dpmpp_2m steps")
    args = parser.parse_args()
    dataset = load_dataset("shapes", 64)
    vae_cfg = VAEConfig(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=1, scaling_factor=1.0, sample_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKL(vae_cfg).eval().requires_grad_(False)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); shapes 64x64, "
        f"batch {args.batch}, {args.sample_steps} dpmpp_2m steps per image"
    )
    rows = [("pixel 64x64x3", bench(dataset, None, args))]
    rows.append(("latent 16x16x4 (f=4)", bench(dataset, vae, args)))
    print(f"{'space':24} {'U-Net params':>12} {'s/train step':>13} {'s/image':>9}")
    for name, (step, image, params) in rows:
        print(f"{name:24} {params / 1e6:11.2f}M {step:13.3f} {image:9.3f}")
    (_, (ps, pi, _)), (_, (ls, li, _)) = rows
    print(f"latent speed-up: training x{ps / ls:.1f}, sampling x{pi / li:.1f}")


if __name__ == "__main__":
    main()
