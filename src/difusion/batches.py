"""Where every trainer's batches come from, and the generators that draw them: `shapes`
rendered whole on the device, any other data set through a `BatchStream`; and the place in
the data that a checkpoint keeps."""

from __future__ import annotations

import json
from typing import Protocol

import torch
from torch.utils.data import Dataset

from .data import ShapesDataset
from .data.loader import BatchStream
from .runs import TrainingError

STREAM_KEY = "data_stream"  # the checkpoint metadata that holds the place in the data


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
    batch_size: int,
    seed: int,
    generator: torch.Generator,
    device: torch.device,
    *,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    crop: str = "center",
    flip: bool = False,
    buckets: bool = False,
    multiple: int = 8,
) -> Batches:
    """`shapes` rendered as whole batches by `generator`, on its device; any other data set
    through a `BatchStream` (its order from `seed`: each image once an epoch over the `world`
    processes, decoded by `workers` processes; bucket sides are multiples of `multiple`, what
    a U-Net's levels and a VAE divide by)."""
    plain = crop == "center" and not flip and not buckets
    if type(dataset) is ShapesDataset and plain:
        return RenderedShapes(dataset, batch_size, generator)
    try:
        return BatchStream(
            dataset, batch_size, seed=seed, rank=rank, world=world, workers=workers,
            pin_memory=device.type == "cuda", crop=crop, flip=flip, buckets=buckets,
            multiple=multiple,
        )  # fmt: skip
    except ValueError as e:
        raise TrainingError(str(e)) from None


def stream_metadata(batches: Batches) -> dict[str, str]:
    """The place in the data, as checkpoint metadata."""
    return {STREAM_KEY: json.dumps(batches.state_dict())}


def restore_stream(batches: Batches, metadata: dict[str, str]) -> None:
    """Go on from the place a checkpoint kept (one saved before it was kept: from the start)."""
    if STREAM_KEY in metadata:
        batches.load_state_dict(json.loads(metadata[STREAM_KEY]))
