"""MNIST-style IDX image sets: Fashion-MNIST (from Debian) and MNIST from a user folder.

A folder holds `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]` and the
same with `t10k` (or `test`) for the test split; `train-images.idx3-ubyte` spellings work
too. The 28x28 images are padded with `pad` black pixels on each side (default 2, giving
the customary 32x32) and then resized to `size` when that differs (default 32).

Fashion-MNIST is also captioned, in English or Spanish (`language=`): each class has a few
names (`FASHION_NAMES`; the first is its canonical one), each with its article, or none for
a plural ("trousers"), and in Spanish the article and adjectives agreeing with the noun's
gender and number ("una zapatilla deportiva", "unos pantalones"); image i reads one name, in
one of a few frames ("a photo of ...", "una foto de ..."), both picked by a hash of i.
`language="both"`: every image twice, first all with English captions, then all with Spanish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .idx import read_idx
from .language import caption_languages

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# per class: (name, gender, number); English "gender" is the article ("a", "an", "" for none)
FASHION_NAMES: dict[str, list[list[tuple[str, str, str]]]] = {
    "en": [
        [("t-shirt", "a", "s"), ("top", "a", "s"), ("tee", "a", "s")],
        [("pair of trousers", "a", "s"), ("trousers", "", "p"), ("pair of pants", "a", "s")],
        [("pullover", "a", "s"), ("sweater", "a", "s"), ("jumper", "a", "s")],
        [("dress", "a", "s"), ("long dress", "a", "s")],
        [("coat", "a", "s"), ("overcoat", "an", "s"), ("winter coat", "a", "s")],
        [("sandal", "a", "s"), ("sandals", "", "p"), ("summer sandal", "a", "s")],
        [("shirt", "a", "s"), ("button-up shirt", "a", "s"), ("long-sleeved shirt", "a", "s")],
        [("sneaker", "a", "s"), ("trainer", "a", "s"), ("sneakers", "", "p")],
        [("bag", "a", "s"), ("handbag", "a", "s")],
        [("ankle boot", "an", "s"), ("boot", "a", "s"), ("ankle boots", "", "p")],
    ],
    "es": [
        [("camiseta", "f", "s"), ("top", "m", "s"), ("camiseta de manga corta", "f", "s")],
        [("pantalones", "m", "p"), ("pantalón", "m", "s"), ("pantalones largos", "m", "p")],
        [("jersey", "m", "s"), ("suéter", "m", "s"), ("jersey de punto", "m", "s")],
        [("vestido", "m", "s"), ("vestido largo", "m", "s")],
        [("abrigo", "m", "s"), ("chaquetón", "m", "s"), ("abrigo largo", "m", "s")],
        [("sandalia", "f", "s"), ("sandalias", "f", "p"), ("sandalia de verano", "f", "s")],
        [
            ("camisa", "f", "s"),
            ("camisa de botones", "f", "s"),
            ("camisa de manga larga", "f", "s"),
        ],
        [
            ("zapatilla deportiva", "f", "s"),
            ("zapatilla", "f", "s"),
            ("zapatillas deportivas", "f", "p"),
        ],
        [("bolso", "m", "s"), ("bolsa", "f", "s")],
        [("botín", "m", "s"), ("bota corta", "f", "s"), ("botines", "m", "p")],
    ],
}
SPANISH_ARTICLES = {("m", "s"): "un", ("f", "s"): "una", ("m", "p"): "unos", ("f", "p"): "unas"}
FRAMES = {
    "en": ("{}", "a photo of {}", "a picture of {}"),
    "es": ("{}", "una foto de {}", "una imagen de {}"),
}
IDX_DEFAULT_SIZE = 32
SPLITS = {"train": ("train",), "test": ("t10k", "test"), "all": ("train", "t10k", "test")}


def fashion_caption(label: int, language: str = "en", variant: int = 0) -> str:
    """Caption `variant` of class `label` ("a t-shirt", "una foto de unos pantalones"); variant
    0 is the class's canonical name with its article, unframed."""
    names = FASHION_NAMES[language][label]
    name, gender, number = names[variant % len(names)]
    article = gender if language == "en" else SPANISH_ARTICLES[gender, number]
    frames = FRAMES[language]
    return frames[variant // len(names) % len(frames)].format(f"{article} {name}".strip())


def fashion_variants(label: int, language: str = "en") -> list[str]:
    """Every caption class `label` has in `language`."""
    count = len(FASHION_NAMES[language][label]) * len(FRAMES[language])
    return [fashion_caption(label, language, v) for v in range(count)]


def _variant(i: int) -> int:
    """A well-mixed number from item index i (which name and frame its caption takes)."""
    return (i * 0x9E3779B1 & 0xFFFFFFFF) >> 16


def _find(root: Path, prefix: str, kind: str, rank: str) -> Path | None:
    """The file for e.g. prefix="train", kind="images", rank="idx3"; None if absent."""
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            p = root / f"{prefix}-{kind}{sep}{rank}-ubyte{ext}"
            if p.is_file():
                return p
    return None


def find_idx_files(root: str | Path, split: str = "all") -> list[tuple[Path, Path | None]]:
    """(images, labels-or-None) file pairs of `split` in `root`, train first."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root)
    pairs = []
    for prefix in SPLITS[split]:
        images = _find(root, prefix, "images", "idx3")
        if images is not None:
            pairs.append((images, _find(root, prefix, "labels", "idx1")))
    return pairs


def has_idx_files(root: str | Path) -> bool:
    return Path(root).is_dir() and bool(find_idx_files(root, "all"))


class IDXDataset(Dataset):
    """Grayscale images (and labels when the label files are there) from IDX files.

    Items: {"image": FloatTensor [1, size, size] in [-1, 1], "label": int} ("label" only
    when every split read has its label file).
    """

    channels = 1

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        size: int = IDX_DEFAULT_SIZE,
        pad: int = 2,
        class_names: list[str] | None = None,
    ):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ValueError(f"IDX folder not found: {root}")
        pairs = find_idx_files(root, split)
        if not pairs:
            raise ValueError(
                f"no IDX image files for split {split!r} in {root} "
                "(expected e.g. train-images-idx3-ubyte.gz, t10k-images-idx3-ubyte.gz)"
            )
        images, labels = [], []
        for img_path, lab_path in pairs:
            x = read_idx(img_path)
            if x.ndim != 3 or x.dtype != np.uint8:
                raise ValueError(f"{img_path}: expected uint8 images [N, H, W], got {x.shape}")
            images.append(x)
            if lab_path is not None:
                y = read_idx(lab_path)
                if y.shape != (len(x),):
                    raise ValueError(f"{lab_path}: {y.shape[0]} labels for {len(x)} images")
                labels.append(y)
        if len({x.shape[1:] for x in images}) != 1:
            raise ValueError(f"{root}: splits have different image sizes")
        self.images = torch.from_numpy(np.concatenate(images))  # uint8 [N, H, W]
        self.labels = (
            torch.from_numpy(np.concatenate(labels).astype(np.int64))
            if len(labels) == len(images)
            else None
        )
        if size < 1 or pad < 0:
            raise ValueError(f"bad size {size} / pad {pad}")
        self.size, self.pad, self.root, self.split = size, pad, root, split
        if self.labels is None:
            self.num_classes, self.class_names = None, None
        else:
            n = int(self.labels.max()) + 1 if len(self.labels) else 0
            if class_names is None:
                class_names = [str(i) for i in range(n)]
            elif len(class_names) < n:
                raise ValueError(
                    f"{root}: labels go up to {n - 1} but only {len(class_names)} names"
                )
            self.class_names = list(class_names)
            self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float().div_(127.5).sub_(1.0)[None]  # [1, H, W]
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, value=-1.0)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(
                x[None], size=(self.size, self.size), mode="bilinear", antialias=True
            )[0].clamp_(-1.0, 1.0)
        item = {"image": x}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


class FashionMNIST(IDXDataset):
    """Fashion-MNIST: 60,000 train + 10,000 test 28x28 images of 10 clothing classes.

    Read from Debian's `dataset-fashion-mnist` package by default, or any folder of the
    same IDX files (`root`). `split` is "train", "test" or "all" (default: 70,000 images).
    Items also hold a "caption" in `language` (module doc); "both" doubles the length.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "all",
        size: int = IDX_DEFAULT_SIZE,
        pad: int = 2,
        language: str = "en",
    ):
        self.language, self.languages = language, caption_languages(language, "fashion")
        root = Path(root).expanduser() if root is not None else FASHION_ROOT
        if not has_idx_files(root):
            raise ValueError(
                f"Fashion-MNIST not found in {root}: install it with "
                "`apt-get install dataset-fashion-mnist` (or pass a folder of IDX files: root=PATH)"
            )
        super().__init__(root, split=split, size=size, pad=pad, class_names=FASHION_CLASSES)

    def __len__(self) -> int:
        return len(self.images) * len(self.languages)

    def __getitem__(self, i: int) -> dict:
        i = range(len(self))[int(i)]  # negative indices as a list's; IndexError past the end
        item = super().__getitem__(i % len(self.images))
        language = self.languages[i // len(self.images)]
        item["caption"] = fashion_caption(item["label"], language, _variant(i))
        return item


def mnist(
    root: str | Path | None = None, split: str = "all", size: int = IDX_DEFAULT_SIZE, pad: int = 2
):
    """MNIST (or any MNIST-format set) from the folder `root` the user gives."""
    if root is None:
        raise ValueError(
            "mnist needs root=PATH: a folder with the MNIST IDX files "
            "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)"
        )
    return IDXDataset(root, split=split, size=size, pad=pad)
