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

Captioned-image formats, found from the path (each in its own module) [64]:

- a folder with `metadata.jsonl` (file_name + text: Hugging Face's imagefolder) `metadata.py`
- a folder saved by `datasets`' `save_to_disk`                                   `hf.py`
- a .parquet file, or a folder of them, with image bytes + caption columns       `parquet.py`
- WebDataset shards: a .tar, a folder of .tar files, "shards/{000..009}.tar"     `webdataset.py`

Their options `caption_column=` and (but for metadata.jsonl) `image_column=` name the
columns (or tar member extensions) to read; by default the usual names are tried ("image", "img", ...; "text",
"caption", "prompt", ...).

Names win over a same-named folder in the current directory: use "./digits" for that.
"""

from __future__ import annotations

import inspect
import numbers
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .digits import DigitsDataset
from .emoji import EmojiDataset
from .fashion import FashionMNIST, IDXDataset, has_idx_files, mnist
from .folder import IMAGE_EXTENSIONS, FolderDataset
from .hf import HFDiskDataset, is_hf_saved
from .idx import read_idx, write_idx
from .metadata import MetadataDataset, has_metadata
from .parquet import ParquetDataset, parquet_files
from .shapes import ShapesDataset
from .webdataset import WebDataset, is_shard_pattern

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
    "HFDiskDataset",
    "IDXDataset",
    "MetadataDataset",
    "ParquetDataset",
    "ShapesDataset",
    "WebDataset",
    "collate",
    "random_batch",
    "load_dataset",
    "read_idx",
    "write_idx",
]


def _build(name: str, factory: Callable[..., Dataset], size: int | None, kw: dict) -> Dataset:
    if size is not None:
        kw = {"size": size, **kw}
    params = inspect.signature(factory, eval_str=True).parameters
    unknown = sorted(set(kw) - set(params))
    if unknown:
        options = ", ".join(p for p in params if p != "self")
        raise ValueError(
            f"data set {name!r} has no option {', '.join(unknown)} (options: {options})"
        )
    return factory(**{k: _option_value(name, k, v, params[k].annotation) for k, v in kw.items()})


_MISFIT = object()  # what `_fit` returns for a value of another type


def _option_value(name: str, key: str, value: Any, annotation: Any) -> Any:
    """`value` as the option's annotation wants it (an int where a float goes, a list where
    a tuple goes); a value of another type is a ValueError naming the option."""
    fitted = _fit(value, annotation)
    if fitted is _MISFIT:
        wanted = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        raise ValueError(f"data set {name!r}: option {key} must be {wanted}, got {value!r}")
    return fitted


def _fit(value: Any, annotation: Any) -> Any:
    """`value` converted to `annotation` where that is lossless, else `_MISFIT`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        fits = (_fit(value, a) for a in args)
        return next((f for f in fits if f is not _MISFIT), _MISFIT)
    if annotation is None or annotation is type(None):
        return value if value is None else _MISFIT
    if annotation in (int, float):
        number = numbers.Integral if annotation is int else numbers.Real
        fits = isinstance(value, number) and not isinstance(value, bool)
        return annotation(value) if fits else _MISFIT
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return _MISFIT
        same_kind = origin is list or (len(args) == 2 and args[1] is ...)
        kinds = args[:1] * len(value) if same_kind else args
        if len(kinds) != len(value):
            return _MISFIT
        items = [_fit(v, k) for v, k in zip(value, kinds, strict=True)]
        return _MISFIT if any(i is _MISFIT for i in items) else origin(items)
    if isinstance(annotation, type):
        return value if isinstance(value, annotation) else _MISFIT
    return value  # an annotation this check does not read: the data set checks the value


def load_dataset(name_or_path: str | Path, size: int | None = None, **kw: Any) -> Dataset:
    """A data set by name ("digits", "emoji", "fashion", "mnist", "shapes") or path (a
    folder, a .parquet or .tar file, a shard pattern: see the module's docstring).

    `size` None keeps the data set's default; other options go to its constructor
    (e.g. `root=`, `split=`, `seed=`, `channels=`). Raises ValueError with a one-line
    message on an unknown name, a missing path, an unknown option or missing data.
    """
    name = str(name_or_path)
    factory = DATASETS.get(name.lower())
    if factory is not None:
        return _build(name.lower(), factory, size, kw)
    path = Path(name).expanduser()
    format_of_path = _format_of(path)
    if format_of_path is not None:
        factory, where = format_of_path
        return _build(name, factory, size, {where: path, **kw})
    if path.exists():
        raise ValueError(
            f"data set {name!r} is a file, not a folder of images, a .parquet or a .tar file"
        )
    if is_shard_pattern(name):
        return _build(name, WebDataset, size, {"shards": name, **kw})
    raise ValueError(
        f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}, a folder, "
        "a .parquet or .tar file, or a shard pattern"
    )


def option_names(name_or_path: str | Path) -> set[str]:
    """The options (constructor keywords) of the data set `load_dataset` would make of it."""
    name = str(name_or_path)
    factory = DATASETS.get(name.lower())
    if factory is None:
        found = _format_of(Path(name).expanduser())
        factory = found[0] if found else (WebDataset if is_shard_pattern(name) else None)
    if factory is None:
        return set()
    return set(inspect.signature(factory).parameters) - {"self"}


def _format_of(path: Path) -> tuple[Callable[..., Dataset], str] | None:
    """The data set class that reads `path`, and the name of its path argument."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            return ParquetDataset, "path"
        if suffix == ".tar":
            return WebDataset, "shards"
        return None
    if not path.is_dir():
        return None
    if is_hf_saved(path):
        return HFDiskDataset, "root"
    if has_metadata(path):
        return MetadataDataset, "root"
    if has_idx_files(path):
        return IDXDataset, "root"
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
        if any(path.rglob("*.tar")):
            return WebDataset, "shards"
        if parquet_files(path):
            return ParquetDataset, "path"
    return FolderDataset, "root"


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
