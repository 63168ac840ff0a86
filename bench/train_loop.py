"""The training loop's efficiency: `difusion train`'s images/s over a bare training step's.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_loop.py             # batch 32, fp32 and bf16
    OMP_NUM_THREADS=2 .venv/bin/python bench/train_loop.py --quick     # batch 8, 2 timed steps

The loop: `difusion.train.train` itself on `shapes`, with the shipped text model's recipe (its
file's training configuration: architecture, objective, optimizer) but a scratch text encoder,
no layout pre-fit, no checkpoint or sample grid inside the timed steps; timed from the
`on_step` callback's timestamps, after `--warmup` steps. The bare step: the same model (built
by the same functions) on one pre-made noised batch and its captions: the scratch text
encoder's and the U-Net's forward, MSE, backward, AdamW over both, nothing else: the work of
a training step, without what only the loop does (drawing and rendering the batch, condition
dropout, gradient clipping, the EMA update, logging). Both at the same batch size and
precision (fp32, or bf16 autocast as `--precision bf16` trains). The loop is timed
`--rounds` times, each between two timings of the bare step (the machine's speed drifts);
the efficiency is the loop's mean over the bare step's.
A third column times the U-Net's step alone, for scale: the scratch encoder's share.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import count_flops, parser, report, unet_flops

import difusion.train as train_module
from difusion.checkpoints import read_metadata
from difusion.data import ShapesDataset, random_batch
from difusion.denoiser import training_target
from difusion.model import DiffusionModel, default_model_path
from difusion.train import TrainConfig, build_text_encoder, model_config_for, train

AMP = {"fp32": None, "bf16": torch.bfloat16}


def recipe(batch: int, steps: int, precision: str, out: Path) -> TrainConfig:
    """The shipped model's training configuration, with a scratch text encoder, for a
    fixed number of steps and nothing saved or sampled before the last."""
    stored = json.loads(read_metadata(default_model_path())["train_config"])
    never = 10**9
    return replace(
        TrainConfig.from_dict(stored),
        out=str(out), steps=steps, minutes=None, batch_size=batch, precision=precision,
        device="cpu", text_encoder="scratch", text_encoder_path=None, init=None,
        init_sha256=None, layout_steps=0, sample_every=never, checkpoint_every=never, keep=0,
    )  # fmt: skip


def loop_images_per_s(cfg: TrainConfig, dataset: ShapesDataset, warmup: int) -> float:
    """`train` itself; images/s over its steps after the first `warmup`."""
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())

    train(cfg, dataset=dataset, progress=False, on_step=on_step)
    timed = len(stamps) - warmup
    return cfg.batch_size * timed / (stamps[-1] - stamps[warmup - 1])


def bare_model(cfg: TrainConfig, dataset: ShapesDataset) -> DiffusionModel:
    """The model `train` builds for `cfg` (the same functions, the same layout)."""
    encoder = build_text_encoder(cfg, dataset)
    config = model_config_for(cfg, dataset, encoder)
    model = DiffusionModel(config, text_encoder=encoder)
    return model.to(memory_format=torch.channels_last).train()


def bare_images_per_s(
    model: DiffusionModel,
    cfg: TrainConfig,
    dataset: ShapesDataset,
    warmup: int,
    steps: int,
    encoder: bool = True,
) -> float:
    """Forward + MSE + backward + AdamW on one pre-made batch: of the text encoder and the
    U-Net (as the loop trains them), or with `encoder=False` of the U-Net alone."""
    g = torch.Generator().manual_seed(0)
    batch = random_batch(dataset, cfg.batch_size, g)
    captions = batch["caption"]
    x0 = batch["image"].contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, model.schedule.num_steps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = model.schedule.q_sample(x0, t, noise)
    abar = model.schedule.alphas_cumprod[t].float()
    target = training_target(model.config.prediction, x0, noise, abar)
    trained = model if encoder else model.unet
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    amp = AMP[cfg.precision]
    model.train()
    with torch.no_grad():
        fixed = model.text_cond(captions)

    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            cond = model.text_cond(captions) if encoder else fixed
            out = model.unet(x_t, t.float(), **cond)
        loss = F.mse_loss(out.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return cfg.batch_size * steps / (time.perf_counter() - t0)


def encoder_flops(model: DiffusionModel, dataset: ShapesDataset, batch: int) -> int:
    """FLOPs of the scratch encoder's forward and backward on one batch of captions."""
    captions = [dataset[i]["caption"] for i in range(batch)]

    def fwd_bwd() -> None:
        tokens, _ = model.text_encoder.encode(captions)
        tokens.square().mean().backward()

    return count_flops(fwd_bwd)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each timing")
    p.add_argument(
        "--rounds", type=int, default=2, help="loop timings, each between two bare-step timings"
    )
    p.add_argument("--warmup", type=int, default=5, help="steps before the clock starts (>= 1)")
    p.add_argument("--precision", nargs="+", choices=list(AMP), default=list(AMP))
    args = p.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup, args.rounds = 8, 2, 1, 1
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the clock starts at the end of a step)")

    # the grid `train` draws after its last step is not timed, and costs more than a
    # quick run's steps: skipped here
    train_module.preview = lambda *a, **k: None
    records, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            cfg = recipe(args.batch, args.warmup + args.steps, precision, Path(tmp) / precision)
            dataset = ShapesDataset(cfg.size or 32, **cfg.data_options)
            model = bare_model(cfg, dataset)
            bares = [bare_images_per_s(model, cfg, dataset, args.warmup, args.steps)]
            loops = []
            for r in range(args.rounds):
                cfg = replace(cfg, out=str(Path(tmp) / f"{precision}-{r}"))
                loops.append(loop_images_per_s(cfg, dataset, args.warmup))
                bares.append(bare_images_per_s(model, cfg, dataset, args.warmup, args.steps))
            loop, bare = statistics.mean(loops), statistics.mean(bares)
            unet_alone = bare_images_per_s(
                model, cfg, dataset, args.warmup, args.steps, encoder=False
            )
            context = model.text_encoder.max_length
            flops = unet_flops(model.config.unet, args.batch, dataset.size, context, train=True)
            enc = encoder_flops(model, dataset, args.batch)
            records.append({"kind": "train_loop", "precision": precision, "batch": args.batch,
                            "loop_images_per_s": loop, "bare_images_per_s": bare,
                            "loops": loops, "bares": bares,
                            "unet_alone_images_per_s": unet_alone,
                            "flops": flops + enc, "unet_flops": flops,
                            "encoder_flops": enc})  # fmt: skip
            rows.append([precision, " / ".join(f"{x:.1f}" for x in loops),
                         " / ".join(f"{x:.1f}" for x in bares),
                         f"{loop / bare:.2f}", f"{unet_alone:.1f}",
                         f"{flops / 1e9:.0f} + {enc / 1e9:.1f}"])  # fmt: skip
    params = sum(q.numel() for q in model.unet.parameters()) / 1e6
    title = (
        f"Training loop vs bare step: the shipped model's U-Net ({params:.2f}M parameters, "
        f"shapes 32x32, scratch text encoder), batch {args.batch}, each timing {args.steps} steps "
        f"after {args.warmup}, {torch.get_num_threads()} threads"
    )
    headers = ["precision", "loop images/s (each timing)",
               "bare step images/s (before, between and after)",
               "loop / bare", "U-Net alone: bare step images/s",
               "GFLOP/step (fwd+bwd): U-Net + text encoder"]  # fmt: skip
    notes = [
        "bf16 = autocast (float32 weights); the bare step trains what the loop trains (the "
        "scratch text encoder and the U-Net); the loop's timings alternate with the bare step's "
        "(the machine's speed drifts), and loop / bare is over the means of each"
    ]
    report(args, title, headers, rows, records, notes)


if __name__ == "__main__":
    main()
