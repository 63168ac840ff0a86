"""Where a diffusion run's batches come from, and the generators that draw them: `shapes`
rendered whole on the device, any other data set through a `BatchStream`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch.utils.data import Dataset

from .data import ShapesDataset
from .data.loader import BatchStream
from .runs import TrainingError

if TYPE_CHECKING:  # the configuration's module imports this one
    from .train import TrainConfig


def training_generators(seed: int, rank: int, device: torch.device) -> dict[str, torch.Generator]:
    """The run's generators: "data" (this process's: rendered `shapes`, VAE posteriors) and
    "noise" on the device, "cond" (which conditions are dropped) on the host; "noise" and
    "cond" are the same in every process, each taking its share of the world's draws."""
    return {
        "data": torch.Generator(device=device).manual_seed(seed * 7919 + rank),
        "noise": torch.Generator(device=device).manual_seed(seed * 104729 + 1),
        "cond": torch.Generator().manual_seed(seed * 15485863 + 2),
    }


class Batches(Protocol):
    """Where a run's batches come from; its place is saved with each checkpoint."""

    def next(self) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


class RenderedShapes:
    """`shapes` batches rendered by tensor operations on the generator's device: their place
    in the data is the generator's state, saved with the run's other generators."""

    def __init__(self, dataset: ShapesDataset, batch_size: int, generator: torch.Generator):
        from .data.shapes_batch import ShapesBatches

        self.render, self.batch_size = ShapesBatches(dataset, generator), batch_size

    def next(self) -> dict:
        return self.render.next(self.batch_size)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def training_batches(
    dataset: Dataset,
    cfg: TrainConfig,
    rank: int,
    world: int,
    device: torch.device,
    generator: torch.Generator,
    multiple: int = 8,
) -> Batches:
    """`shapes` rendered as whole batches on the device; any other data set through a
    `BatchStream` (each image once an epoch over all processes, decoded by `cfg.workers`;
    bucket sides are multiples of `multiple`, what the U-Net's levels and a VAE divide by)."""
    plain = cfg.crop == "center" and not cfg.flip and not cfg.buckets
    if type(dataset) is ShapesDataset and plain:
        return RenderedShapes(dataset, cfg.batch_size, generator)
    try:
        return BatchStream(
            dataset, cfg.batch_size, seed=cfg.seed, rank=rank, world=world,
            workers=cfg.workers, pin_memory=device.type == "cuda",
            crop=cfg.crop, flip=cfg.flip, buckets=cfg.buckets, multiple=multiple,
        )  # fmt: skip
    except ValueError as e:
        raise TrainingError(str(e)) from None
