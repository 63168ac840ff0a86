"""Data sets: every one a `torch.utils.data.Dataset` of dicts.

Items: {"image": FloatTensor [C, H, W] in [-1, 1]} plus "label": int when labelled and
"caption": str when captioned (`shapes` adds its ground-truth "attributes"). Each data
set has `channels`, `size`, `num_classes` (None when unlabelled) and `class_names`.

Names `load_dataset` knows (default size in brackets):

- "digits"  scikit-learn's 8x8 digits upscaled, 1 channel, 10 labels [16]
- "emoji"   Noto Color Emoji (Debian font), ~1,360, RGB, captioned by Unicode name [32]
- "fashion" Fashion-MNIST, 70,000 images, 1 channel, 10 labels, 28 px padded by 2 [32]
- "mnist"   MNIST IDX files from `root=PATH`, same layout as fashion [32]
- "shapes"  procedural captioned shapes (the fixed spec of the design notes), RGB [32]
- a folder  IDX files (read like "mnist"), else images, recursively [64]

Names win over a same-named folder in the current directory: use "./digits" for that.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .digits import DigitsDataset
from .emoji import EmojiDataset
from .fashion import FashionMNIST, IDXDataset, has_idx_files, mnist
from .folder import FolderDataset
from .idx import read_idx, write_idx
from .shapes import ShapesDataset

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": DigitsDataset,
    "emoji": EmojiDataset,
    "fashion": FashionMNIST,
    "mnist": mnist,
    "shapes": ShapesDataset,
}

__all__ = [
    "DATASETS",
    "DigitsDataset",
    "EmojiDataset",
    "FashionMNIST",
    "FolderDataset",
    "IDXDataset",
    "ShapesDataset",
    "collate",
    "random_batch",
    "load_dataset",
    "read_idx",
    "write_idx",
]


def _build(name: str, factory: Callable[..., Dataset], size: int | None, kw: dict) -> Dataset:
    if size is not None:
        kw = {"size": size, **kw}
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown:
        options = ", ".join(p for p in params if p != "self")
        raise ValueError(
            f"data set {name!r} has no option {', '.join(unknown)} (options: {options})"
        )
    return factory(**kw)


def load_dataset(name_or_path: str | Path, size: int | None = None, **kw: Any) -> Dataset:
    """A data set by name ("digits", "emoji", "fashion", "mnist", "shapes") or folder path.

    `size` None keeps the data set's default; other options go to its constructor
    (e.g. `root=`, `split=`, `seed=`, `channels=`). Raises ValueError with a one-line
    message on an unknown name, a missing path, an unknown option or missing data.
    """
    name = str(name_or_path)
    factory = DATASETS.get(name.lower())
    if factory is not None:
        return _build(name.lower(), factory, size, kw)
    path = Path(name).expanduser()
    if path.is_dir():
        if has_idx_files(path):
            return _build(name, IDXDataset, size, {"root": path, **kw})
        return _build(name, FolderDataset, size, {"root": path, **kw})
    if path.exists():
        raise ValueError(f"data set {name!r} is a file, not a folder of images")
    raise ValueError(
        f"unknown data set {name!r}: expected one of {', '.join(DATASETS)} or a folder of images"
    )


def collate(batch: list[dict]) -> dict:
    """DataLoader collate for our items: stacks "image", tensors "label", lists the rest.

    Unlike torch's default collate it accepts the nested, variable-length "attributes"
    of `shapes` (kept as a list of dicts).
    """
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "label":
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


def random_batch(dataset: Dataset, n: int, generator: torch.Generator) -> dict:
    """`n` items drawn uniformly (with replacement) by `generator`, collated."""
    idx = torch.randint(len(dataset), (n,), generator=generator)
    return collate([dataset[int(i)] for i in idx])
