"""The training loader: each image once an epoch over all processes, decoded by DataLoader
workers, resumed exactly, with random crops, flips and aspect-ratio buckets.

Order. Epoch e's permutation of range(len(dataset)) is drawn by a generator seeded by
(seed, e). The permutations, one after another, are cut into global batches of
`batch_size * world`, and rank r takes the r-th slice of each: over all ranks each image
comes once an epoch. Every batch is full: the batch that holds the end of an epoch is
completed by the start of the next (a data set smaller than a global batch is fine). The
same (seed, rank, world, position) always gives the same batch.

Buckets (`buckets=True`, as SDXL and kohya's scripts train on pictures of mixed shapes):
each image sits in the bucket of `bucket_shapes` nearest its aspect ratio and is resized to
cover it, then cropped. Each bucket is a stream of its own (the epochs' permutations read
bucket by bucket), cut as above, so every batch is full and holds one bucket: a bucket's
last batch of an epoch is completed by its first images of the next (a bucket of fewer
images than a global batch repeats them within one). The batches of an epoch (those
that start in it) are interleaved, bucket by bucket, in an order drawn from (seed, e).

Items. The crop ("random": a random window of the image resized to cover the square or
the bucket) and the flip (p = 0.5) of each item are drawn by a generator seeded by
(seed, epoch, index), so neither workers nor resuming change them. Flipped captions that
say "left" or "right" become wrong; `shapes`, whose captions are about left and right,
refuses --flip.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import collate
from .shapes import ShapesDataset

log = logging.getLogger(__name__)

CROPS = ("center", "random")
MAX_BUCKET_ASPECT = 2.0  # the widest bucket is at most twice as wide as high (and the tallest)
ERROR = "_error"  # the key of a batch that could not be made, with its one-line reason
PERMUTATION, SCHEDULE, ITEM = 1, 2, 3  # the seeds of the three kinds of draws differ here

Key = tuple[int, int]  # (epoch, index in the data set)


class LoaderError(ValueError):
    """A batch could not be made (an image that fails to read, a worker that died)."""


def rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([k % 2**64 for k in keys])


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def bucket_shapes(
    size: int, multiple: int = 8, max_aspect: float = MAX_BUCKET_ASPECT
) -> list[tuple[int, int]]:
    """(height, width) buckets of at most size x size pixels, sides multiples of `multiple`,
    from the tallest to the widest: size x size and the widest shapes whose width grows in
    steps of about size / 16, up to the aspect ratio `max_aspect`, each also turned upright."""
    side = size // multiple * multiple
    if side < multiple:
        raise ValueError(f"--buckets: size {size} is under the bucket sides' multiple {multiple}")
    step = max(multiple, round(size / 16 / multiple) * multiple)
    shapes = {(side, side)}
    for w in range(side + step, 2 * size + 1, step):
        h = size * size // w // multiple * multiple
        if h < multiple or w > max_aspect * h:
            break
        shapes |= {(h, w), (w, h)}
    return sorted(shapes, key=lambda s: s[1] / s[0])


def nearest_bucket(shapes: list[tuple[int, int]], width: int, height: int) -> int:
    """The index of the shape nearest in aspect ratio (on a log scale) to width x height."""
    aspect = math.log(width / height)
    return min(
        range(len(shapes)), key=lambda k: abs(math.log(shapes[k][1] / shapes[k][0]) - aspect)
    )


class BatchOrder:
    """The (epoch, index) keys of one rank's batches: see the module's docstring.

    Batch number j of a bucket's stream takes that stream's places [j G, (j + 1) G) (G the
    global batch), place p being image p mod n of epoch p // n (n the bucket's images).
    """

    def __init__(
        self, bucket_of: np.ndarray, batch_size: int, seed: int, rank: int, world: int
    ) -> None:
        self.bucket_of, self.batch_size, self.seed, self.rank = bucket_of, batch_size, seed, rank
        self.global_batch = batch_size * world
        self.sizes = np.bincount(bucket_of)  # images per bucket (0 for an empty one)
        self._orders: dict[int, list[np.ndarray]] = {}

    def _first(self, epoch: int) -> np.ndarray:
        """Per bucket, the number of its first batch that starts in `epoch`."""
        return -(-epoch * self.sizes // self.global_batch)

    def length(self, epoch: int) -> int:
        """How many batches start in `epoch` (0 for a small data set's epoch that one batch
        began earlier and covers)."""
        return int((self._first(epoch + 1) - self._first(epoch)).sum())

    def schedule(self, epoch: int) -> list[tuple[int, int]]:
        """The (bucket, batch number) of each batch that starts in `epoch`, in order."""
        first, end = self._first(epoch), self._first(epoch + 1)
        buckets = np.repeat(np.arange(len(self.sizes)), end - first)
        if len(self.sizes) > 1:
            rng(self.seed, SCHEDULE, epoch).shuffle(buckets)
        seen = first.copy()
        out = []
        for b in buckets.tolist():
            out.append((b, int(seen[b])))
            seen[b] += 1
        return out

    def order(self, epoch: int) -> list[np.ndarray]:
        """Per bucket, its images in the order of epoch `epoch`'s permutation."""
        if epoch not in self._orders:
            if len(self._orders) >= 4:  # the epochs a batch straddles, for all but tiny data
                del self._orders[min(self._orders)]
            perm = rng(self.seed, PERMUTATION, epoch).permutation(len(self.bucket_of))
            if len(self.sizes) == 1:
                self._orders[epoch] = [perm]
            else:
                grouped = perm[np.argsort(self.bucket_of[perm], kind="stable")]
                self._orders[epoch] = np.split(grouped, np.cumsum(self.sizes)[:-1])
        return self._orders[epoch]

    def keys(self, bucket: int, number: int) -> list[Key]:
        """This rank's slice of global batch `number` of `bucket`."""
        n = int(self.sizes[bucket])
        start = number * self.global_batch + self.rank * self.batch_size
        keys = []
        for place in range(start, start + self.batch_size):
            epoch, k = divmod(place, n)
            keys.append((epoch, int(self.order(epoch)[bucket][k])))
        return keys

    def batches(self, epoch: int, batch: int) -> Iterator[list[Key]]:
        """The keys of every batch from batch `batch` of `epoch` on, without end."""
        while True:
            for bucket, number in self.schedule(epoch)[batch:]:
                yield self.keys(bucket, number)
            epoch, batch = epoch + 1, 0

    def normal(self, epoch: int, batch: int) -> tuple[int, int]:
        """The place (epoch, batch) as the first batch still to come: past an epoch's end, the
        start of the next epoch that has a batch."""
        while batch >= self.length(epoch):
            epoch, batch = epoch + 1, 0
        return epoch, batch


class StreamItems(Dataset):
    """The items of a `BatchStream`, by (epoch, index): cropped, flipped and fitted to their
    bucket. A failure becomes an item {ERROR: its one-line reason}, not a worker's traceback."""

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        crop: str,
        flip: bool,
        shapes: list[tuple[int, int]] | None,
    ) -> None:
        self.dataset, self.seed, self.crop, self.flip = dataset, seed, crop, flip
        self.shapes = shapes  # each image's bucket, or None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Key) -> dict:
        epoch, i = key
        try:
            return self.make(epoch, i)
        except Exception as e:
            return {ERROR: f"image {i} (epoch {epoch}): {one_line(e)}"}

    def make(self, epoch: int, i: int) -> dict:
        draw = rng(self.seed, ITEM, epoch, i) if self.flip or self.crop == "random" else None
        flip = self.flip and draw.random() < 0.5
        shape = self.shapes[i] if self.shapes is not None else None
        if self.crop == "random":
            h, w = shape or (self.dataset.size, self.dataset.size)
            item = self.dataset.item(i, (h, w), crop=False)
            x = item["image"]
            top = int(draw.integers(x.shape[-2] - h + 1))
            left = int(draw.integers(x.shape[-1] - w + 1))
            item["image"] = x[:, top : top + h, left : left + w]
        elif shape is not None:
            item = self.dataset.item(i, shape)
        else:
            item = self.dataset[i]
        return {**item, "image": item["image"].flip(-1)} if flip else item


def collate_items(items: list[dict]) -> dict:
    """`collate`, or the first failure's {ERROR: reason} (see `StreamItems`)."""
    failed = next((item for item in items if ERROR in item), None)
    if failed is not None:
        return failed
    try:
        return collate(items)
    except Exception as e:
        return {ERROR: f"a batch of {len(items)} images: {one_line(e)}"}


class KeyBatches:
    """The batch sampler of the DataLoader: `order`'s batches from (epoch, batch) on."""

    def __init__(self, order: BatchOrder, epoch: int, batch: int) -> None:
        self.order, self.epoch, self.batch = order, epoch, batch

    def __iter__(self) -> Iterator[list[Key]]:
        return self.order.batches(self.epoch, self.batch)


class BatchStream:
    """This rank's batches, without end: {"image": [B, C, H, W] in [-1, 1], "label",
    "caption"} as `collate` makes them (pinned when `pin_memory` and CUDA is there).

    `workers` processes decode (0: this one), `prefetch` batches ahead each. `crop`
    "center" gives the data set's own images; "random" and `buckets` need a data set that
    decodes files (a folder or the captioned formats), whose image `size` they take; bucket
    sides are multiples of `multiple` (what the U-Net's downsampling, and a VAE's, needs).
    `state_dict()` is small ints: after `load_state_dict`, `next()` goes on as the saved
    stream would have (batches prefetched but not taken do not count).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
        crop: str = "center",
        flip: bool = False,
        buckets: bool = False,
        multiple: int = 8,
    ) -> None:
        for name, value, low in (
            ("--batch-size", batch_size, 1),
            ("--workers", workers, 0),
            ("prefetch", prefetch, 1),
            ("world", world, 1),
            ("multiple", multiple, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be {low} or more, not {value}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be from 0 to {world - 1} (world {world}), not {rank}")
        if crop not in CROPS:
            raise ValueError(f"--crop must be center or random, not {crop!r}")
        if len(dataset) == 0:
            raise ValueError("the data set is empty")
        kind = type(dataset).__name__
        decodes = callable(getattr(dataset, "item", None))
        if crop == "random" and not decodes:
            raise ValueError(f"--crop random needs a folder or file data set, not {kind}")
        if buckets and not callable(getattr(dataset, "image_sizes", None)):
            raise ValueError(f"--buckets needs a folder or file data set, not {kind}")
        if flip and isinstance(dataset, ShapesDataset):
            raise ValueError("--flip would swap left and right in shapes' images, not captions")

        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.workers, self.prefetch = workers, prefetch
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.shapes: list[tuple[int, int]] | None = None
        bucket_of = np.zeros(len(dataset), dtype=np.int64)
        if buckets:
            self.shapes = bucket_shapes(dataset.size, multiple)
            bucket_of = np.array(
                [nearest_bucket(self.shapes, w, h) for w, h in dataset.image_sizes()]
            )
        self.order = BatchOrder(bucket_of, batch_size, seed, rank, world)
        self.items = StreamItems(
            dataset,
            seed,
            crop,
            flip,
            None if self.shapes is None else [self.shapes[b] for b in bucket_of],
        )
        # images / global batch, rounded up (an epoch's batches, on average N / G)
        self.batches_per_epoch = -(-len(dataset) // self.order.global_batch)
        self._place = (0, 0)  # (epoch, batch in it) of the next batch `next` returns
        self._batches: Iterator[dict] | None = None

    @property
    def epoch(self) -> int:
        """Epochs completed: over all ranks, every image of each has been in a batch."""
        return self._place[0]

    def item(self, epoch: int, index: int) -> dict:
        """Image `index` as the stream makes it in epoch `epoch`."""
        return self.items.make(epoch, index)

    def next(self) -> dict:
        if self._batches is None:
            loader = DataLoader(
                self.items,
                batch_sampler=KeyBatches(self.order, *self._place),
                num_workers=self.workers,
                collate_fn=collate_items,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch if self.workers else None,
                persistent_workers=self.workers > 0,
                generator=torch.Generator().manual_seed(self.seed),  # not the global RNG
            )
            self._batches = iter(loader)
        try:
            batch = next(self._batches)
        except Exception as e:  # a worker that died, or failed outside an item
            raise LoaderError(f"data loader: {one_line(e)}") from None
        if ERROR in batch:
            raise LoaderError(f"data loader: {batch[ERROR]}")
        epoch, k = self._place
        self._place = self.order.normal(epoch, k + 1)
        return batch

    def _identity(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "images": len(self.dataset),
            "global_batch": self.order.global_batch,
            "buckets": 0 if self.shapes is None else len(self.shapes),
        }

    def state_dict(self) -> dict[str, int]:
        epoch, batch = self._place
        return {**self._identity(), "epoch": epoch, "batch": batch}

    def load_state_dict(self, state: dict) -> None:
        """Go on from `state`; saved by a stream of another seed, data set size, global
        batch or bucket list, from the start of its next epoch (with a warning)."""
        if not all(isinstance(state.get(k), int) and state[k] >= 0 for k in ("epoch", "batch")):
            raise ValueError(f"data stream state needs epoch and batch counts, got {state!r}")
        epoch, batch = state["epoch"], state["batch"]
        changed = [k for k, v in self._identity().items() if state.get(k) != v]
        if changed and batch > 0:
            log.warning(
                "the data order changed since the stream was saved (%s): going on from the "
                "start of epoch %d",
                ", ".join(f"{k} {state.get(k)} -> {self._identity()[k]}" for k in changed),
                epoch + 1,
            )
            epoch, batch = epoch + 1, 0
        self.close()
        self._place = self.order.normal(epoch, batch)

    def close(self) -> None:
        """Stop the workers; a later `next` starts them again."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
