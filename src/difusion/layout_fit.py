"""The layout map's pre-fit: before the denoiser trains, a new layout map is fitted alone to
the data's images averaged down to a small grid, from their captions."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .batches import training_batches
from .loop import Stop
from .model import DiffusionModel
from .runs import Run, TrainingError

if TYPE_CHECKING:  # the configuration's module imports this one
    from .train import TrainConfig


LAYOUT_GRID = 8  # the layout map is fitted to the images averaged down to this grid


def pretrain_layout(
    diffusion: DiffusionModel,
    dataset: Dataset,
    cfg: TrainConfig,
    generator: torch.Generator,
    run: Run | None = None,
    progress: bool = True,
    stop: Stop | None = None,
) -> None:
    """Fit a layout map alone (a new one, or a model's own on new captions) to the data's
    images, averaged down to an 8x8 grid, from their captions: the pure-noise end of denoising without the noise. Learning which object
    a relation puts first takes a product of three things (the place, the relation and the
    word's position); inside the denoiser that product starts at zero and its gradient with
    it, while here it is the whole loss. The mean loss of each `log_every` steps goes to the
    run's log as `layout_loss` (with `step` 0: before the denoiser's first step). It ends
    early when `stop` asks (budget spent, or a signal). Its batches are drawn as training's
    are, in an order of its own (from `generator`), center-cropped squares."""
    layout = diffusion.unet.layout_map
    device = layout.query.weight.device
    seed = int(torch.randint(2**62, (), generator=generator))
    batches = training_batches(
        dataset, cfg.batch_size, seed, generator, device, workers=cfg.workers
    )
    opt = torch.optim.Adam(layout.parameters(), lr=cfg.layout_lr)
    size = LAYOUT_GRID
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.layout_steps, desc="layout map", unit="step", dynamic_ncols=True)
    total, count, done = torch.zeros((), device=device), 0, 0

    def log() -> None:
        """The mean loss since the last log line: the only point where the loop waits for
        the device, and where a non-finite loss stops the run."""
        nonlocal total, count
        if not count:
            return
        mean = total.item() / count
        if not math.isfinite(mean):
            raise TrainingError(
                f"the layout map's loss became {mean} within steps {done - count + 1}-{done}"
            )
        if run is not None:
            run.append_log({"step": 0, "layout_step": done, "layout_loss": mean})
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}")
        total, count = torch.zeros((), device=device), 0

    with contextlib.closing(batches):
        for step in range(1, cfg.layout_steps + 1):
            if stop is not None and stop.requested():
                break
            batch = batches.next()
            target = F.adaptive_avg_pool2d(batch["image"].to(device, non_blocking=True), size)
            with torch.no_grad():  # the text encoder is not the map's to train
                cond = diffusion.text_cond(batch["caption"])
            loss = F.mse_loss(
                layout.image(size, size, cond["context"], cond["context_mask"]), target
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count, done = total + loss.detach(), count + 1, step
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0:
                log()
    log()
    if bar is not None:
        bar.close()
