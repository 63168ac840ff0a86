"""A folder of images (PNG, JPEG, WebP, BMP, GIF), searched recursively.

- Each image is resized (shorter side to `size`) and centre-cropped to `size` x `size`;
  RGB by default, grayscale with `channels=1`. Transparent images are composited over
  `background` (white by default); EXIF orientation is applied; 16-bit images scaled
  (`decode.py`, shared with the other formats, which also refuses huge images).
- Labels: when every image sits in a first-level subfolder, the subfolder names, sorted,
  are the classes (`label` = index). Images at the top level and in subfolders at once:
  unlabelled, with a warning.
- Captions: `photo.png` takes its caption from `photo.txt` beside it. When any image has
  one, every item carries "caption", and an image without one (no .txt, or an empty one)
  is skipped, as the captioned formats skip an uncaptioned sample.
- Unreadable files with an image extension and other stray files (not .txt, not hidden)
  are skipped; `skipped` counts them with the uncaptioned images, and one warning names a
  few of each.
- Decoding happens once: small sets (`cache=None` and at most 2,048 images, or
  `cache=True`) are decoded up front; larger ones are checked with Pillow's cheap
  `verify()` at scan time, decoded on first use and memoised while that fits in 1 GiB.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .decode import ImageSource, decode_image, first_decodable, image_size, verify_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
FOLDER_DEFAULT_SIZE = 64
PRELOAD_MAX_IMAGES = 2048
LAZY_CACHE_MAX_BYTES = 1 << 30


class DecodedItems(Dataset):
    """The items of a data set of encoded images (`FolderDataset`, `EncodedImageDataset`),
    decoded on demand and memoised. Subclasses set `size`, `channels`, `background`,
    `labels`, `captions`, `_cache`, `_memoise`, `_failed` and define `_source` and `_name`.

    `item(i, shape, crop)` serves the training loader (`loader.py`): the image fitted to
    another shape, or only resized (to cover it) for the loader's own random crop.
    """

    labels: list[int] | None = None
    captions: list[str] | None = None
    _variant_bytes = 0  # memoised by `item` beside the size x size images
    _sizes: list[tuple[int, int]] | None = None

    def _source(self, i: int) -> ImageSource:
        """The encoded image of item i (a path or bytes)."""
        raise NotImplementedError

    def _name(self, i: int) -> str:
        """Item i as warnings name it."""
        raise NotImplementedError

    def _pixels(
        self, i: int, shape: tuple[int, int] | None = None, crop: bool = True
    ) -> torch.Tensor:
        key = i if shape is None and crop else (i, shape, crop)
        x = self._cache.get(key)
        if x is None:
            x = decode_image(
                self._source(i), shape or self.size, self.channels, self.background, crop=crop
            )
            if key == i:
                if self._memoise:
                    self._cache[i] = x
            elif self._memoise and self._variant_bytes + x.nbytes <= LAZY_CACHE_MAX_BYTES:
                self._cache[key] = x
                self._variant_bytes += x.nbytes
        return x

    def item(self, i: int, shape: tuple[int, int] | None = None, crop: bool = True) -> dict:
        """`self[i]` with its image fitted to `shape` (height, width) instead of size x size;
        `crop=False`: resized to just cover that shape, not cropped."""
        j, x = first_decodable(
            i, len(self), lambda k: self._pixels(k, shape, crop), self._failed, self._name
        )
        out = {"image": x.float().div_(127.5).sub_(1.0)}
        if self.labels is not None:
            out["label"] = self.labels[j]
        if self.captions is not None:
            out["caption"] = self.captions[j]
        return out

    def __getitem__(self, i: int) -> dict:
        return self.item(i)

    def image_sizes(self) -> list[tuple[int, int]]:
        """Each image's (width, height) as decoded, read from the headers once; size x size
        for an image whose header no longer reads."""
        if self._sizes is None:
            self._sizes = []
            for i in range(len(self)):
                try:
                    self._sizes.append(image_size(self._source(i)))
                except Exception:
                    self._sizes.append((self.size, self.size))
        return self._sizes


class FolderDataset(DecodedItems):
    """Items: {"image": FloatTensor [C, size, size] in [-1, 1]} + "label" / "caption"."""

    def __init__(
        self,
        root: str | Path,
        size: int = FOLDER_DEFAULT_SIZE,
        channels: int = 3,
        cache: bool | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
    ):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ValueError(f"image folder not found: {root}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.root, self.size, self.channels, self.background = root, size, channels, background

        candidates, stray = [], []
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                candidates.append(p)
            elif p.suffix.lower() != ".txt":
                stray.append(p)

        captions = {p: caption_beside(p) for p in candidates}
        uncaptioned = []
        if any(c is not None for c in captions.values()):
            uncaptioned = [p for p in candidates if captions[p] is None]
            candidates = [p for p in candidates if captions[p] is not None]
        preload = cache if cache is not None else len(candidates) <= PRELOAD_MAX_IMAGES
        self.paths: list[Path] = []
        self._cache: dict[int, torch.Tensor] = {}
        bad = list(stray)
        for p in candidates:
            if preload:
                try:
                    x = decode_image(p, size, channels, background)
                except Exception:
                    bad.append(p)
                    continue
                self._cache[len(self.paths)] = x
            elif not verify_image(p):
                bad.append(p)
                continue
            self.paths.append(p)
        self.skipped = len(bad) + len(uncaptioned)
        for files, what in (
            (bad, "unreadable or non-image file(s)"),
            (uncaptioned, "image(s) without a caption (.txt)"),
        ):
            if files:
                examples = ", ".join(str(p.relative_to(root)) for p in files[:3])
                log.warning("%s: skipped %d %s (e.g. %s)", root, len(files), what, examples)
        if not self.paths:
            raise ValueError(f"no readable images (PNG/JPEG/WebP) in {root}")
        self._memoise = preload or len(self.paths) * channels * size * size <= LAZY_CACHE_MAX_BYTES
        self._failed: set[int] = set()

        # labels from first-level subfolders
        tops = [p.relative_to(root).parts for p in self.paths]
        in_sub = [len(parts) > 1 for parts in tops]
        self.labels: list[int] | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        if all(in_sub):
            self.class_names = sorted({parts[0] for parts in tops})
            index = {name: k for k, name in enumerate(self.class_names)}
            self.labels = [index[parts[0]] for parts in tops]
            self.num_classes = len(self.class_names)
        elif any(in_sub):
            log.warning("%s: images both at the top level and in subfolders: no labels", root)

        self.captions: list[str] | None = None
        if uncaptioned or any(captions[p] is not None for p in self.paths):
            self.captions = [captions[p] for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def _source(self, i: int) -> Path:
        return self.paths[i]

    def _name(self, i: int) -> str:
        return str(self.paths[i])


def caption_beside(image: Path) -> str | None:
    """The caption in the same-name .txt file beside an image, as one line (None: no file,
    or an empty one)."""
    t = image.with_suffix(".txt")
    if not t.is_file():
        return None
    return " ".join(t.read_text(encoding="utf-8", errors="replace").split()) or None
