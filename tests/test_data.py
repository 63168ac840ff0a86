"""Data sets: registry, digits, IDX reader, Fashion-MNIST / MNIST, image folders."""

import gzip
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from difusion.data import (
    DigitsDataset,
    FolderDataset,
    IDXDataset,
    collate,
    load_dataset,
    read_idx,
    write_idx,
)
from difusion.data.fashion import FASHION_CLASSES, FASHION_ROOT, FashionMNIST, has_idx_files


def check_item(item, channels, size):
    x = item["image"]
    assert x.dtype == torch.float32
    assert x.shape == (channels, size, size)
    assert x.min() >= -1.0 and x.max() <= 1.0


# ----------------------------------------------------------------------------- registry


def test_unknown_name_and_missing_path_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'nope'.*digits"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset(str(tmp_path / "missing"))
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_dataset(str(f))
    with pytest.raises(ValueError, match="has no option colour"):
        load_dataset("digits", colour=3)


def test_collate_stacks_images_and_labels():
    ds = load_dataset("digits")
    batch = collate([ds[i] for i in range(5)])
    assert batch["image"].shape == (5, 1, 16, 16)
    assert batch["label"].tolist() == [int(ds.labels[i]) for i in range(5)]


# ----------------------------------------------------------------------------- digits


def test_digits():
    ds = load_dataset("digits")
    assert isinstance(ds, DigitsDataset)
    assert len(ds) == 1797
    assert (ds.channels, ds.size, ds.num_classes) == (1, 16, 10)
    assert ds.class_names == [str(i) for i in range(10)]
    check_item(ds[0], 1, 16)
    assert ds.images.min() == -1.0 and ds.images.max() == 1.0
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert all(isinstance(ds[i]["label"], int) for i in range(3))

    big = load_dataset("digits", size=32)
    check_item(big[100], 1, 32)
    assert big[100]["label"] == ds[100]["label"]

    from sklearn.datasets import load_digits

    raw = DigitsDataset(size=8)
    expected = torch.tensor(load_digits().images[7], dtype=torch.float32) / 8 - 1
    assert torch.allclose(raw[7]["image"][0], expected)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 4)) * 100).astype(dtype)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    if name.endswith(".gz"):
        assert (tmp_path / name).read_bytes()[:2] == b"\x1f\x8b"


def test_idx_header_layout(tmp_path):
    write_idx(tmp_path / "x", np.arange(6, dtype=np.int16).reshape(2, 3))
    raw = (tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0B, 2])
    assert raw[4:12] == bytes([0, 0, 0, 2, 0, 0, 0, 3])
    assert raw[12:16] == bytes([0, 0, 0, 1])  # big-endian data


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"\x01\x00\x08\x01" + bytes([0, 0, 0, 1, 5]), "bad magic"),
        (b"\x00\x00\x07\x01" + bytes([0, 0, 0, 1, 5]), "type code"),
        (b"\x00\x00\x08\x03" + bytes([0, 0, 0, 1]), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + bytes([0, 0, 0, 4, 1, 2]), "size mismatch"),
        (b"\x00\x00\x08\x01" + bytes([0, 0, 0, 1, 1, 2]), "size mismatch"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
)
def test_idx_malformed_raises(tmp_path, data, message):
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "bad")


# ----------------------------------------------------------------------------- fashion / mnist


@pytest.fixture(scope="module")
def fashion():
    if not has_idx_files(FASHION_ROOT):
        pytest.skip(f"{FASHION_ROOT} missing: apt-get install dataset-fashion-mnist")
    return load_dataset("fashion")


def test_fashion_all(fashion):
    assert isinstance(fashion, FashionMNIST)
    assert len(fashion) == 70_000
    assert (fashion.channels, fashion.size, fashion.num_classes) == (1, 32, 10)
    assert fashion.class_names == FASHION_CLASSES
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    item = fashion[123]
    check_item(item, 1, 32)
    assert 0 <= item["label"] < 10
    x = item["image"][0]
    assert (x[:2] == -1).all() and (x[-2:] == -1).all() and (x[:, :2] == -1).all()
    assert torch.bincount(fashion.labels).tolist() == [7000] * 10


def test_fashion_split_and_size(fashion):
    test = FashionMNIST(split="test", size=28, pad=0)
    assert len(test) == 10_000
    first = test[0]["image"]
    assert first.shape == (1, 28, 28)
    assert torch.equal(fashion[60_000]["image"][0, 2:30, 2:30], first[0])
    check_item(FashionMNIST(split="test", size=16)[0], 1, 16)
    with pytest.raises(ValueError, match="unknown split"):
        FashionMNIST(split="valid")


# the gender and number of every Spanish noun a fashion caption may use, and English plurals
SPANISH_NOUNS = {
    "camiseta": "fs", "top": "ms", "pantalones": "mp", "pantalón": "ms", "jersey": "ms",
    "suéter": "ms", "vestido": "ms", "abrigo": "ms", "chaquetón": "ms", "sandalia": "fs",
    "sandalias": "fp", "camisa": "fs", "zapatilla": "fs", "zapatillas": "fp", "bolso": "ms",
    "bolsa": "fs", "botín": "ms", "bota": "fs", "botines": "mp",
}  # fmt: skip
ARTICLES = {"un": "ms", "una": "fs", "unos": "mp", "unas": "fp"}
ADJECTIVES = {"deportiva": "fs", "deportivas": "fp", "largo": "ms", "largos": "mp", "corta": "fs"}


def spanish_agreement(caption):
    """(article, noun, adjective) agreement of a caption "[una foto de ]ART NOUN [ADJ][ de ...]"."""
    for frame in ("una foto de ", "una imagen de "):
        caption = caption.removeprefix(frame)
    article, noun, *rest = caption.split()
    adjective = rest[0] if rest and rest[0] != "de" else None
    expected = SPANISH_NOUNS[noun]
    return ARTICLES[article] == expected and (
        adjective is None or ADJECTIVES[adjective] == expected
    )


def test_fashion_captions_in_both_languages_are_grammatical():
    from difusion.data.fashion import fashion_caption, fashion_variants

    assert fashion_caption(0, "en") == "a t-shirt" and fashion_caption(0, "es") == "una camiseta"
    assert (
        fashion_caption(9, "en") == "an ankle boot"
        and fashion_caption(1, "es") == "unos pantalones"
    )
    for label in range(10):
        spanish, english = fashion_variants(label, "es"), fashion_variants(label, "en")
        assert len(set(spanish)) == len(spanish) >= 6 and len(set(english)) >= 6
        assert all(spanish_agreement(c) for c in spanish), spanish
        for caption in english:
            words = caption.removeprefix("a photo of ").removeprefix("a picture of ").split()
            if words[0] in ("a", "an"):
                assert (words[0] == "an") == (words[1][0] in "aeiou"), caption
            else:  # no article: a plural
                assert words[-1].endswith("s"), caption


def test_fashion_language_option(fashion):
    assert "caption" in fashion[0] and fashion[0]["caption"] in fashion_variants_of(fashion[0])
    both = FashionMNIST(split="test", language="both")
    n = 10_000
    assert len(both) == 2 * n
    english, spanish = both[7], both[n + 7]
    assert torch.equal(english["image"], spanish["image"]) and english["label"] == spanish["label"]
    assert spanish["caption"] in fashion_variants_of(spanish, "es")
    captions = {both[i]["caption"] for i in range(n, n + 300)}
    assert {"una camiseta", "una foto de una camiseta"} & captions  # the variants all turn up
    with pytest.raises(ValueError, match="fashion: language must be one of en, es, both"):
        FashionMNIST(language="de")


def fashion_variants_of(item, language="en"):
    from difusion.data.fashion import fashion_variants

    return fashion_variants(item["label"], language)


def test_fashion_missing_package_message(tmp_path):
    with pytest.raises(ValueError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion", root=tmp_path / "nowhere")


def write_mnist(root, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte{ext}",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_user_folder(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", root=tmp_path)
    assert isinstance(ds, IDXDataset) and len(ds) == 17
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10
    check_item(ds[3], 1, 32)
    assert ds[3]["label"] == 3 and ds[12]["label"] == 0
    raw = read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    assert torch.allclose(
        ds[1]["image"][0, 2:30, 2:30], torch.tensor(raw[1] / 127.5 - 1).float(), atol=1e-6
    )
    by_path = load_dataset(str(tmp_path), split="train", size=28, pad=0)
    assert isinstance(by_path, IDXDataset) and len(by_path) == 12
    assert by_path[0]["image"].shape == (1, 28, 28)
    # the same folder can stand in for Fashion-MNIST
    assert load_dataset("fashion", root=tmp_path).class_names == FASHION_CLASSES


def test_mnist_errors(tmp_path):
    with pytest.raises(ValueError, match="mnist needs root"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="not found"):
        load_dataset("mnist", root=tmp_path / "absent")
    with pytest.raises(ValueError, match="no IDX image files"):
        load_dataset("mnist", root=tmp_path)
    write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3]))
    )
    with pytest.raises(ValueError, match="3 labels for 12 images"):
        load_dataset("mnist", root=tmp_path)


# ----------------------------------------------------------------------------- folders


def solid(size, color, mode="RGB"):
    return Image.new(mode, size, color)


@pytest.fixture
def image_tree(tmp_path):
    """cats/ (2 images, one nested deeper) and dogs/ (3 + junk)."""
    root = tmp_path / "imgs"
    (root / "cats" / "inner").mkdir(parents=True)
    (root / "dogs").mkdir()
    solid((40, 20), (200, 10, 10)).save(root / "cats" / "a.png")
    solid((30, 30), (10, 200, 10)).save(root / "cats" / "inner" / "b.jpg", quality=95)
    solid((16, 48), (10, 10, 200, 255), "RGBA").save(root / "dogs" / "c.webp", lossless=True)
    solid((25, 25), 128, "L").save(root / "dogs" / "d.png")
    solid((20, 20), (0, 0, 0, 0), "RGBA").save(root / "dogs" / "e.png")  # fully transparent
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "dogs" / "notes.md").write_text("not an image")
    (root / ".hidden").mkdir()
    solid((8, 8), (1, 2, 3)).save(root / ".hidden" / "x.png")
    return root


@pytest.mark.parametrize("cache", [None, False])
def test_folder_labels_and_skips(image_tree, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="difusion.data.folder"):
        ds = FolderDataset(image_tree, size=16, cache=cache)
    assert len(ds) == 5
    assert ds.skipped == 2
    warnings = [r for r in caplog.records if "skipped 2" in r.getMessage()]
    assert len(warnings) == 1
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2
    assert [ds[i]["label"] for i in range(5)] == [0, 0, 1, 1, 1]
    assert "caption" not in ds[0]
    for i in range(5):
        check_item(ds[i], 3, 16)
    # colours survive: red PNG, green JPEG, blue WebP with alpha, gray, transparent -> white
    px = [(ds[i]["image"][:, 8, 8] + 1) * 127.5 for i in range(5)]
    assert torch.allclose(px[0], torch.tensor([200.0, 10, 10]), atol=1)
    assert torch.allclose(px[1], torch.tensor([10.0, 200, 10]), atol=8)
    assert torch.allclose(px[2], torch.tensor([10.0, 10, 200]), atol=1)
    assert torch.allclose(px[3], torch.tensor([128.0] * 3), atol=1)
    assert (ds[4]["image"] == 1).all()


def test_folder_images_without_a_caption_are_skipped_and_counted(image_tree, caplog):
    (image_tree / "cats" / "a.txt").write_text("  a red\ncat  \n")
    (image_tree / "dogs" / "e.txt").write_text(" \n")  # empty: no caption either
    with caplog.at_level(logging.WARNING, logger="difusion.data.folder"):
        ds = FolderDataset(image_tree, size=16)
    assert len(ds) == 1 and ds[0]["caption"] == "a red cat"
    assert ds.skipped == 1 + 5  # notes.md, and b, c, d, e, broken.png without a caption
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 5 image(s) without a caption" in m for m in messages), messages


def test_folder_grayscale_and_centre_crop(tmp_path):
    im = Image.new("RGB", (100, 20), (255, 0, 0))
    im.paste((0, 255, 0), (40, 0, 60, 20))
    im.paste((0, 0, 255), (60, 0, 100, 20))
    im.save(tmp_path / "wide.png")
    Image.new("L", (10, 50), 255).save(tmp_path / "tall.png")
    ds = load_dataset(str(tmp_path), size=8)
    assert isinstance(ds, FolderDataset)
    assert ds.labels is None and ds.num_classes is None and ds.class_names is None
    assert "caption" not in ds[0] and "label" not in ds[0]
    wide = (ds[1]["image"] + 1) * 127.5  # sorted: tall.png, wide.png
    assert torch.allclose(wide[:, 2:6, 2:6].mean((1, 2)), torch.tensor([0.0, 255, 0]), atol=3)
    gray = FolderDataset(tmp_path, size=8, channels=1)
    assert gray.channels == 1
    check_item(gray[0], 1, 8)
    assert (gray[0]["image"] == 1).all()


def test_folder_empty_or_unreadable_raises(tmp_path):
    with pytest.raises(ValueError, match="no readable images"):
        FolderDataset(tmp_path)
    (tmp_path / "junk.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable images"):
        load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        FolderDataset(tmp_path / "absent")


def test_folder_mixed_levels_unlabelled(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    solid((8, 8), (1, 1, 1)).save(tmp_path / "top.png")
    solid((8, 8), (2, 2, 2)).save(tmp_path / "sub" / "low.png")
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(tmp_path, size=8)
    assert len(ds) == 2 and ds.labels is None and ds.skipped == 0
    assert "no labels" in caplog.text


def test_folder_truncated_jpeg(tmp_path, caplog):
    """verify() cannot catch a truncated JPEG: preloading skips it, lazy mode steps over it."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    solid((8, 8), (255, 255, 255)).save(tmp_path / "b.png")
    eager = FolderDataset(tmp_path, size=8)
    assert len(eager) == 1 and eager.skipped == 1
    lazy = FolderDataset(tmp_path, size=8, cache=False)
    assert len(lazy) == 2 and lazy.skipped == 0
    with caplog.at_level(logging.WARNING):
        item = lazy[0]
    assert (item["image"] == 1).all() and "cannot decode" in caplog.text
