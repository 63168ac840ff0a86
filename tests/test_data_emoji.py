"""The `emoji` data set: Noto Color Emoji from Debian's fonts-noto-color-emoji."""

import time

import numpy as np
import pytest
import torch

from difusion.data import emoji, load_dataset
from difusion.data.emoji import FONT_PATH, EmojiDataset

pytestmark = pytest.mark.skipif(
    not FONT_PATH.is_file(),
    reason=f"{FONT_PATH} missing: apt-get install fonts-noto-color-emoji",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emoji-cache")


@pytest.fixture(scope="module")
def full(cache):
    emoji._MEMORY.clear()  # rendered here, so the disk cache under test is written
    return EmojiDataset(cache_dir=cache)


def test_count_and_items(full):
    assert 1_000 < len(full) < 2_000
    assert full.channels == 3 and full.size == 32
    assert full.num_classes is None and full.class_names is None
    for i in (0, len(full) // 2, len(full) - 1):
        item = full[i]
        assert set(item) == {"image", "caption"}
        img = item["image"]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert img.min() >= -1.0 and img.max() <= 1.0
        assert img.max() > -1.0  # not an empty (all-black) glyph
        assert isinstance(item["caption"], str) and item["caption"]


def test_captions(full):
    assert all(c and c == c.lower() and c.strip() == c for c in full.captions)
    assert len(set(full.captions)) / len(full) > 0.99
    known = {
        0x1F34E: "red apple",
        0x1F63B: "smiling cat face with heart-shaped eyes",
        0x2615: "hot beverage",
        0x1F680: "rocket",
    }
    for cp, caption in known.items():
        i = full.codepoints.index(cp)
        assert full[i]["caption"] == caption
    # skipped: skin-tone modifiers, regional indicators (flags), keycap bases
    assert not {0x1F3FB, 0x1F1FA, ord("#"), ord("1")} & set(full.codepoints)
    # an apple is mostly red; pixels where the glyph is are not black
    apple = full[full.codepoints.index(0x1F34E)]["image"]
    r, g, b = ((apple + 1) / 2).flatten(1).sum(1)
    assert r > 2 * g and r > 2 * b


def test_splits(full, cache):
    train = EmojiDataset(split="train", cache_dir=cache)
    held = EmojiDataset(split="heldout", cache_dir=cache)
    assert not set(train.codepoints) & set(held.codepoints)
    assert sorted(train.codepoints + held.codepoints) == sorted(full.codepoints)
    assert 0.05 < len(held) / len(full) < 0.15
    other = EmojiDataset(split="heldout", seed=1, cache_dir=cache)
    assert set(other.codepoints) != set(held.codepoints)
    with pytest.raises(ValueError, match="split"):
        EmojiDataset(split="test", cache_dir=cache)


def test_deterministic_and_disk_cache(full, cache, monkeypatch):
    files = list(cache.glob("emoji-*-32-v*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(emoji, "_MEMORY", {})
    t = time.perf_counter()
    again = EmojiDataset(cache_dir=cache)  # from disk
    from_disk = time.perf_counter() - t
    assert again.codepoints == full.codepoints
    assert torch.equal(again._images, full._images)
    monkeypatch.setattr(emoji, "_MEMORY", {})
    t = time.perf_counter()
    fresh = EmojiDataset(cache_dir=None)  # rendered again
    rendering = time.perf_counter() - t
    assert fresh.codepoints == full.codepoints
    assert torch.equal(fresh._images, full._images)
    assert from_disk < rendering / 2  # the cache spares the rendering


def test_size_64_and_load_dataset(full, cache):
    ds = load_dataset("emoji", size=64, split="heldout", cache_dir=cache)
    assert isinstance(ds, EmojiDataset)
    assert ds[0]["image"].shape == (3, 64, 64)
    assert ds.captions == EmojiDataset(split="heldout", cache_dir=cache).captions
    # the 64 px image, box-downsampled, is close to the 32 px one
    i = full.codepoints.index(ds.codepoints[0])
    small = torch.nn.functional.avg_pool2d(ds[0]["image"][None], 2)[0]
    assert (small - full[i]["image"]).abs().mean() < 0.1


def test_missing_font(tmp_path):
    with pytest.raises(ValueError, match="apt-get install fonts-noto-color-emoji") as err:
        EmojiDataset(font_path=tmp_path / "nope.ttf", cache_dir=None)
    assert "\n" not in str(err.value)


def test_heldout_is_stable():
    held = [cp for cp in range(0x1F300, 0x1F400) if emoji.is_heldout(cp)]
    assert held == [cp for cp in range(0x1F300, 0x1F400) if emoji.is_heldout(cp, 0, 0.1)]
    assert 5 < len(held) < 50
    assert np.mean([emoji.is_heldout(cp, 3, 0.5) for cp in range(0x1F300, 0x1F700)]) > 0.4


def test_spanish_names_from_cldr(full, cache):
    spanish = EmojiDataset(cache_dir=cache, language="es")
    assert spanish.codepoints == full.codepoints and len(spanish) == len(full)
    assert all(c and "_" not in c and ":" not in c for c in spanish.captions)
    named = dict(zip(spanish.codepoints, spanish.captions, strict=True))
    assert named[0x1F34E] == "manzana roja" and named[0x1F600] == "cara sonriendo"
    assert named[0x2600] == "sol"  # keyed with its variation selector in the emoji package
    assert len(set(spanish.captions)) / len(spanish) > 0.99
    assert torch.equal(spanish[5]["image"], full[5]["image"])


def test_both_languages_give_every_emoji_twice(full, cache):
    both = EmojiDataset(cache_dir=cache, language="both", split="heldout")
    held = EmojiDataset(cache_dir=cache, split="heldout")
    n = len(held)
    assert len(both) == 2 * n and both.captions[:n] == held.captions
    assert (
        both.captions[n:] == EmojiDataset(cache_dir=cache, language="es", split="heldout").captions
    )
    assert torch.equal(both[n + 3]["image"], held[3]["image"])
    assert both[-1]["caption"] == both.captions[-1]
    with pytest.raises(IndexError):
        both[2 * n]
    with pytest.raises(ValueError, match="emoji: language must be one of en, es, both"):
        load_dataset("emoji", language="fr", cache_dir=cache)
