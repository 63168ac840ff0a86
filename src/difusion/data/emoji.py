"""`emoji`: a captioned data set of real artwork, Debian's Noto Color Emoji.

Needs the font of `fonts-noto-color-emoji` (`FONT_PATH`). Choices:

- Which emoji: every single code point in the emoji blocks (`RANGES`) that Python's
  `unicodedata` names and that the font draws (non-empty glyph): about 1,350. Skipped:
  sequences (ZWJ, variation selectors, tags), skin-tone modifiers, regional indicators
  (flags) and keycap bases (# * 0-9, which are not in `RANGES`).
- Image: the colour bitmap rendered by Pillow at the font's native size 109
  (`embedded_color=True`, a 136x128 glyph box), alpha-composited on a **black**
  background (like `shapes` and Fashion-MNIST), padded to a centred square and resized
  (Lanczos, antialiased) to `size` x `size` (default 32, 64 works too). RGB, [-1, 1].
- Caption: in English (`language="en"`, the default) the lowercased Unicode name, as is:
  U+1F34E -> "red apple", U+1F63B -> "smiling cat face with heart-shaped eyes" (no article:
  names such as "cherries" or "two hearts" would read badly with one). In Spanish
  (`language="es"`) the emoji's short name in the Unicode CLDR annotations, as the `emoji`
  package ships them (`emoji.EMOJI_DATA[ch]["es"]`, underscores as spaces): U+1F34E ->
  "manzana roja", U+1F600 -> "cara sonriendo". `language="both"`: every emoji twice, first
  all of them in English, then all in Spanish (the data set is twice as long).
- Splits: "heldout" is the emoji whose seeded hash of (seed, code point) falls below
  `heldout_fraction` (default 0.1, seed 0); "train" the rest; "all" both. The split of
  an emoji depends on its code point only, so it stays put across font versions.
- Caching: rendering is done once per (font, size) and kept in memory; it is also saved
  as `emoji-<font sha256[:16]>-<size>-v1.npz` under `cache_dir` (default
  ~/.cache/difusion; None: memory only), so later processes load in well under a second.

Items: {"image": FloatTensor [3, size, size] in [-1, 1], "caption": str}; unlabelled
(`num_classes` / `class_names` None). `codepoints` and `captions` list the items in order.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from .language import caption_languages

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only bitmap strike of Noto Color Emoji
DEFAULT_SIZE = 32
CACHE_VERSION = 1
SPLITS = ("train", "heldout", "all")
# single-code-point emoji blocks (inclusive); regional indicators / modifiers excluded below
RANGES: tuple[tuple[int, int], ...] = (
    (0x00A9, 0x00A9),
    (0x00AE, 0x00AE),
    (0x203C, 0x203C),
    (0x2049, 0x2049),
    (0x2122, 0x2122),
    (0x2139, 0x2139),
    (0x2194, 0x21AA),
    (0x231A, 0x23FF),
    (0x24C2, 0x24C2),
    (0x25AA, 0x25FE),
    (0x2600, 0x27BF),
    (0x2934, 0x2935),
    (0x2B05, 0x2B55),
    (0x3030, 0x3030),
    (0x303D, 0x303D),
    (0x3297, 0x3299),
    (0x1F000, 0x1F0FF),
    (0x1F170, 0x1F251),
    (0x1F300, 0x1F64F),
    (0x1F680, 0x1F6FF),
    (0x1F7E0, 0x1F7FF),
    (0x1F900, 0x1F9FF),
    (0x1FA70, 0x1FAFF),
)
_EXCLUDED = set(range(0x1F1E6, 0x1F200)) | set(range(0x1F3FB, 0x1F400))  # flags, skin tones

_MEMORY: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}


def font_missing_message(path: Path) -> str:
    return f"emoji: font {path} not found: apt-get install fonts-noto-color-emoji"


def candidates() -> list[int]:
    """Code points tried, in order: named single code points of `RANGES`."""
    out = []
    for lo, hi in RANGES:
        for cp in range(lo, hi + 1):
            if cp not in _EXCLUDED and unicodedata.name(chr(cp), ""):
                out.append(cp)
    return out


def caption_of(cp: int, language: str = "en") -> str:
    """The emoji's English Unicode name, lowercased, or its Spanish CLDR short name."""
    if language == "en":
        return unicodedata.name(chr(cp)).lower()
    return spanish_name(cp)


def spanish_name(cp: int) -> str:
    """CLDR's Spanish short name of emoji `cp`, from the `emoji` package ("cara sonriendo")."""
    import emoji

    if "es" not in emoji.EMOJI_DATA.get("\N{GRINNING FACE}", {}):
        emoji.config.load_language("es")
    ch = chr(cp)
    data = emoji.EMOJI_DATA.get(ch) or emoji.EMOJI_DATA.get(ch + "\N{VARIATION SELECTOR-16}")
    if not data or "es" not in data:
        raise ValueError(f"emoji: no Spanish CLDR name for U+{cp:04X} in the emoji package")
    return data["es"].strip(":").replace("_", " ")


def _font_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def render_all(font_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(code points int64 [N], images uint8 [N, size, size, 3]) of every emoji drawn."""
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    cps, images = [], []
    for cp in candidates():
        ch = chr(cp)
        left, top, right, bottom = font.getbbox(ch)
        w, h = right - left, bottom - top
        if w <= 0 or h <= 0:
            continue
        side = max(w, h)
        glyph = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text(
            ((side - w) // 2 - left, (side - h) // 2 - top), ch, font=font, embedded_color=True
        )
        if glyph.getchannel("A").getbbox() is None:  # not in the font: empty glyph
            continue
        # compositing on black = premultiplying, so resizing afterwards is correct
        rgb = Image.alpha_composite(Image.new("RGBA", glyph.size, (0, 0, 0, 255)), glyph)
        rgb = rgb.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        cps.append(cp)
        images.append(np.asarray(rgb, dtype=np.uint8))
    return np.array(cps, dtype=np.int64), np.stack(images)


def load_emoji(
    size: int = DEFAULT_SIZE,
    font_path: str | Path = FONT_PATH,
    cache_dir: str | Path | None = "~/.cache/difusion",
) -> tuple[np.ndarray, np.ndarray]:
    """(code points, uint8 images) of all emoji at `size`, memory- and disk-cached."""
    font_path = Path(font_path)
    if not font_path.is_file():
        raise ValueError(font_missing_message(font_path))
    stat = font_path.stat()
    key = (f"{font_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}", size)
    if key in _MEMORY:
        return _MEMORY[key]
    file = None
    if cache_dir is not None:
        name = f"emoji-{_font_hash(font_path)}-{size}-v{CACHE_VERSION}.npz"
        file = Path(cache_dir).expanduser() / name
        try:
            with np.load(file) as z:
                _MEMORY[key] = (z["codepoints"], z["images"])
            return _MEMORY[key]
        except (OSError, KeyError, ValueError):
            pass  # absent or unreadable: render again
    result = render_all(font_path, size)
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, codepoints=result[0], images=result[1])
            os.replace(tmp, file)
        except OSError:
            pass  # a read-only cache is fine: memory only
    _MEMORY[key] = result
    return result


def is_heldout(cp: int, seed: int = 0, fraction: float = 0.1) -> bool:
    """Whether emoji `cp` is held out (a stable hash of (seed, cp) below `fraction`)."""
    digest = hashlib.sha256(f"{seed}:{cp:X}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class EmojiDataset(Dataset):
    """Noto Color Emoji, captioned by their Unicode names or CLDR's Spanish ones (module doc).

    Items: {"image": FloatTensor [3, size, size] in [-1, 1], "caption": str}.
    """

    channels = 3
    num_classes = None
    class_names = None

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        split: str = "all",
        seed: int = 0,
        heldout_fraction: float = 0.1,
        font_path: str | Path = FONT_PATH,
        cache_dir: str | Path | None = "~/.cache/difusion",
        language: str = "en",
    ):
        languages = caption_languages(language, "emoji")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        if size < 8:
            raise ValueError(f"emoji: size must be at least 8, got {size}")
        if not 0.0 <= heldout_fraction <= 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
        self.size, self.split, self.seed, self.language = size, split, seed, language
        cps, images = load_emoji(size, font_path, cache_dir)
        if split != "all":
            held = np.array([is_heldout(int(c), seed, heldout_fraction) for c in cps], bool)
            keep = held if split == "heldout" else ~held
            cps, images = cps[keep], images[keep]
        self.codepoints: list[int] = [int(c) for _ in languages for c in cps]
        self.captions: list[str] = [caption_of(int(c), lang) for lang in languages for c in cps]
        self._images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 [N, H, W, 3]

    def __len__(self) -> int:
        return len(self.codepoints)

    def __getitem__(self, i: int) -> dict:
        i = range(len(self))[int(i)]  # negative indices as a list's; IndexError past the end
        img = self._images[i % len(self._images)].permute(2, 0, 1).float().div(127.5).sub(1.0)
        return {"image": img, "caption": self.captions[i]}
