"""The common part of the captioned-image formats (metadata.jsonl, HF datasets, parquet,
WebDataset shards): samples whose image is encoded bytes (or a file) read by index.

- Items are those of `FolderDataset`: {"image": FloatTensor [C, size, size] in [-1, 1]}
  plus "caption" when the data is captioned; unlabelled.
- When the data is captioned, a sample with a missing or empty caption is skipped.
  Unreadable images (corrupt, truncated, not an image, over the pixel limit) are skipped.
  `skipped` counts both, `skips` lists the sample names by reason, and one warning, when
  the data set is built, names the first few. Nothing usable left: a ValueError.
- Decoding as in `FolderDataset`: small sets (`cache=None` and at most 2,048 samples, or
  `cache=True`) are decoded up front; larger ones are checked with Pillow's `verify()`,
  decoded on first use and memoised while that fits in 1 GiB.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .decode import decode_image, verify_image
from .folder import FOLDER_DEFAULT_SIZE, LAZY_CACHE_MAX_BYTES, PRELOAD_MAX_IMAGES, DecodedItems

log = logging.getLogger(__name__)

DEFAULT_SIZE = FOLDER_DEFAULT_SIZE
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "picture", "photo")
CAPTION_COLUMNS = ("text", "caption", "prompt", "txt", "captions", "sentence")
NO_CAPTION = "missing or empty caption"
UNREADABLE = "unreadable image"


def pick_column(
    available: Sequence[str], asked: str | None, defaults: Sequence[str], what: str, where: str
) -> str | None:
    """`asked` when given (a ValueError when absent), else the first of `defaults` present."""
    if asked is not None:
        if asked not in available:
            raise ValueError(f"{where}: no {what} {asked!r} (has: {', '.join(available)})")
        return asked
    return next((name for name in defaults if name in available), None)


def caption_text(value: Any) -> str | None:
    """A caption cell as one line: a string, or the first non-empty string of a list."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


class EncodedImageDataset(DecodedItems):
    """Subclasses read their index, then call `_keep_usable`, and implement `_read`."""

    num_classes: int | None = None
    class_names: list[str] | None = None

    def _read(self, row: int) -> bytes | Path:
        """The encoded image of source row `row`."""
        raise NotImplementedError

    def _keep_usable(
        self,
        where: str,
        names: Sequence[str],
        captions: Sequence[str | None] | None,
        size: int,
        channels: int,
        background: tuple[int, int, int],
        cache: bool | None,
        skips: dict[str, list[str]] | None = None,
    ) -> None:
        """Keep the rows (of `names`, one per sample) that have a caption, when captioned,
        and an image that decodes; `skips` brings those the subclass already refused."""
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.where, self.size, self.channels, self.background = where, size, channels, background
        self.skips: dict[str, list[str]] = {k: list(v) for k, v in (skips or {}).items()}
        rows = range(len(names))
        if captions is not None:
            captions = [caption_text(c) for c in captions]
            self.skips.setdefault(NO_CAPTION, []).extend(names[r] for r in rows if not captions[r])
            rows = [r for r in rows if captions[r]]
        preload = cache if cache is not None else len(rows) <= PRELOAD_MAX_IMAGES
        self.rows: list[int] = []
        self._cache: dict[int, torch.Tensor] = {}
        for r in rows:
            try:
                data = self._read(r)
                if preload:
                    self._cache[len(self.rows)] = decode_image(data, size, channels, background)
                elif not verify_image(data):
                    raise ValueError("not an image")
            except Exception:
                self.skips.setdefault(UNREADABLE, []).append(names[r])
                continue
            self.rows.append(r)
        self.names = [names[r] for r in self.rows]
        self.captions = None if captions is None else [captions[r] for r in self.rows]
        self.skips = {reason: found for reason, found in self.skips.items() if found}
        self.skipped = sum(len(found) for found in self.skips.values())
        if self.skipped:
            log.warning(
                "%s: skipped %d of %d sample(s): %s",
                where,
                self.skipped,
                self.skipped + len(self.rows),
                "; ".join(
                    f"{len(found)} {reason} (e.g. {', '.join(found[:3])})"
                    for reason, found in self.skips.items()
                ),
            )
        if not self.rows:
            why = f" ({self.skipped} skipped: {', '.join(self.skips)})" if self.skipped else ""
            raise ValueError(f"no usable images in {where}{why}")
        self._memoise = preload or len(self.rows) * channels * size * size <= LAZY_CACHE_MAX_BYTES
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def _source(self, i: int) -> bytes | Path:
        return self._read(self.rows[i])

    def _name(self, i: int) -> str:
        return f"{self.where}: {self.names[i]}"
