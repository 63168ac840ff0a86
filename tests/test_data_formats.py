"""Captioned-image formats: metadata.jsonl folders, saved HF data sets, parquet, WebDataset."""

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from difusion.data import (
    FolderDataset,
    HFDiskDataset,
    MetadataDataset,
    ParquetDataset,
    WebDataset,
    load_dataset,
)
from difusion.data.decode import decode_image
from difusion.data.webdataset import expand_braces
from difusion.train import TrainConfig, train

COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220)]
CAPTIONS = ["a red square", "a green square", "a blue square"]


def encoded(colour, fmt="PNG", size=(16, 12), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def samples():
    """(name, png bytes, caption) for the three colours."""
    return [(f"{k:03d}", encoded(COLOURS[k]), CAPTIONS[k]) for k in range(3)]


def check(ds, n, size=8, captions=CAPTIONS):
    assert len(ds) == n and ds.size == size and ds.channels == 3
    assert ds.num_classes is None and ds.class_names is None
    for i in range(n):
        item = ds[i]
        x = item["image"]
        assert x.dtype == torch.float32 and x.shape == (3, size, size)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert item["caption"] == captions[i]
    px = (ds[0]["image"][:, size // 2, size // 2] + 1) * 127.5
    assert torch.allclose(px, torch.tensor([220.0, 20, 20]), atol=2)


# ----------------------------------------------------------------------------- makers


def make_metadata(root, rows=None):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, data, caption in rows or samples():
        (root / f"{name}.png").write_bytes(data)
        lines.append({"file_name": f"{name}.png", "text": caption})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return root


def make_hf(root, image="image", text="text"):
    import datasets

    rows = samples()
    features = datasets.Features({image: datasets.Image(), text: datasets.Value("string")})
    data = {image: [{"bytes": d, "path": None} for _, d, _ in rows], text: [c for *_, c in rows]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root))
    return root


def make_parquet(path, image="image", text="text", as_struct=True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = samples()
    cells = [{"bytes": d, "path": f"{n}.png"} if as_struct else d for n, d, _ in rows]
    pq.write_table(pa.table({image: cells, text: [c for *_, c in rows]}), path)
    return path


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder):
    """Two img2dataset-style shards: captions in .txt in the first, in .json in the second."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = samples()
    with tarfile.open(folder / "000000.tar", "w") as tar:
        for name, data, caption in rows[:2]:
            add_member(tar, f"{name}.png", data)
            add_member(tar, f"{name}.txt", caption.encode())
    with tarfile.open(folder / "000001.tar", "w") as tar:
        name, data, caption = rows[2]
        add_member(tar, f"{name}.jpg", encoded((20, 20, 220), "JPEG"))
        add_member(tar, f"{name}.json", json.dumps({"caption": caption, "width": 16}).encode())
    return folder


# ----------------------------------------------------------------------------- each format


def test_metadata_jsonl_folder(tmp_path):
    ds = load_dataset(make_metadata(tmp_path / "meta"), size=8)
    assert isinstance(ds, MetadataDataset) and ds.skipped == 0
    check(ds, 3)


def test_saved_hf_dataset_and_column_options(tmp_path):
    ds = load_dataset(make_hf(tmp_path / "hf"), size=8)
    assert isinstance(ds, HFDiskDataset) and ds.image_column == "image"
    check(ds, 3)
    ds = load_dataset(
        make_hf(tmp_path / "hf2", image="pixels", text="prompt"),
        size=8,
        image_column="pixels",  # found anyway (an Image column): named here to test the option
    )
    assert (ds.image_column, ds.caption_column) == ("pixels", "prompt")
    check(ds, 3)
    with pytest.raises(ValueError, match="no caption column 'words'.*has: pixels, prompt"):
        load_dataset(tmp_path / "hf2", size=8, caption_column="words")

    import datasets

    splits = {"train": datasets.load_from_disk(str(tmp_path / "hf")).select([2, 1, 0])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    ds = load_dataset(tmp_path / "dict", size=8)
    assert [ds[i]["caption"] for i in range(3)] == CAPTIONS[::-1]
    with pytest.raises(ValueError, match="no split 'test' .splits: train."):
        load_dataset(tmp_path / "dict", split="test")


@pytest.mark.parametrize("as_struct", [True, False])
def test_parquet_file_with_bytes_or_hf_image_structs(tmp_path, as_struct):
    path = make_parquet(tmp_path / "d.parquet", "img", "caption", as_struct=as_struct)
    ds = load_dataset(str(path), size=8)
    assert isinstance(ds, ParquetDataset) and (ds.image_column, ds.caption_column) == (
        "img",
        "caption",
    )
    check(ds, 3)


def test_webdataset_folder_pattern_and_single_shard(tmp_path):
    folder = make_shards(tmp_path / "shards")
    ds = load_dataset(folder, size=8)
    assert isinstance(ds, WebDataset) and ds.skipped == 0
    check(ds, 3)
    pattern = load_dataset(str(folder / "{000000..000001}.tar"), size=8)
    assert pattern.names == ds.names
    assert load_dataset(str(folder / "000001.tar"), size=8)[0]["caption"] == CAPTIONS[2]
    with pytest.raises(ValueError, match="shard not found: .*000002.tar"):
        load_dataset(str(folder / "{000000..000002}.tar"), size=8)
    with pytest.raises(ValueError, match="no caption 'cls' in any sample"):
        load_dataset(folder, caption_column="cls")
    # members are read in place by offset, and lazily decoded ones match the preloaded
    lazy = WebDataset(folder, size=8, cache=False)
    assert all(torch.equal(lazy[i]["image"], ds[i]["image"]) for i in range(3))


def test_expand_braces():
    assert expand_braces("s/{08..10}.tar") == ["s/08.tar", "s/09.tar", "s/10.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    with pytest.raises(ValueError, match="bad shard range"):
        expand_braces("{5..1}.tar")


def test_unknown_option_and_empty_data_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="has no option colour"):
        load_dataset(make_metadata(tmp_path / "m"), colour=1)
    with pytest.raises(ValueError, match="no caption 'prompt' in any sample"):
        load_dataset(tmp_path / "m", caption_column="prompt")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"no usable images .*\(1 skipped: missing file\)"):
        load_dataset(tmp_path / "e")
    (tmp_path / "e" / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="metadata.jsonl line 1: not a JSON object"):
        load_dataset(tmp_path / "e")


# ----------------------------------------------------------------------------- bad input


def bad_files():
    """name -> (bytes, caption): 5 odd but good images, 2 broken files, 2 caption faults."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    noise = buf.getvalue()
    palette = Image.new("RGB", (16, 16), (220, 20, 20)).convert("P", palette=Image.ADAPTIVE)
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    deep = io.BytesIO()
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(deep, "PNG")  # 16-bit gray
    rotated = Image.new("RGB", (16, 16), (220, 20, 20))
    rotated.paste((20, 20, 220), (0, 8, 16, 16))  # top red, bottom blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: blue on the left
    rot = io.BytesIO()
    rotated.save(rot, "JPEG", exif=exif.tobytes(), quality=95)
    return {
        "cmyk.jpg": (encoded((0, 255, 255, 0), "JPEG", mode="CMYK"), "cmyk red"),
        "palette.png": (buf.getvalue(), "palette red"),
        "deep.png": (deep.getvalue(), "sixteen bit gray"),
        "alpha.png": (encoded((0, 0, 0, 0), "PNG", mode="RGBA"), "transparent"),
        "rotated.jpg": (rot.getvalue(), "rotated"),
        "truncated.jpg": (noise[: len(noise) // 2], "cut short"),
        "text.png": (b"just some text, not a picture\n", "fake"),
        "uncaptioned.png": (encoded((1, 2, 3)), None),
        "empty.png": (encoded((4, 5, 6)), "   "),
    }


GOOD = ["alpha.png", "cmyk.jpg", "deep.png", "palette.png", "rotated.jpg"]


@pytest.mark.parametrize("cache", [None, False])
def test_bad_input_folder_keeps_the_good_and_counts_skips(tmp_path, caplog, cache):
    files = bad_files()
    rows = []
    for name, (data, caption) in sorted(files.items()):
        (tmp_path / name).write_bytes(data)
        row = {"file_name": name}
        if caption is not None:
            row["text"] = caption
        rows.append(json.dumps(row))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows))
    with caplog.at_level(logging.WARNING, logger="difusion.data.encoded"):
        ds = load_dataset(tmp_path, size=8, cache=cache)
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    if cache is False:  # verify() cannot see a truncated JPEG: decoding steps over it later
        assert ds.skips["unreadable image"] == ["text.png"] and "truncated.jpg" in ds.names
        assert len(warnings) == 1 and "skipped 3 of 9" in warnings[0]
        return
    assert len(warnings) == 1 and "skipped 4 of 9" in warnings[0]
    assert ds.skipped == 4
    assert sorted(ds.skips["unreadable image"]) == ["text.png", "truncated.jpg"]
    assert sorted(ds.skips["missing or empty caption"]) == ["empty.png", "uncaptioned.png"]
    assert ds.names == GOOD
    items = {name: ds[i] for i, name in enumerate(ds.names)}
    assert items["cmyk.jpg"]["caption"] == "cmyk red"
    rgb = {name: (item["image"] + 1) * 127.5 for name, item in items.items()}
    assert torch.allclose(rgb["cmyk.jpg"][:, 4, 4], torch.tensor([255.0, 0, 0]), atol=30)
    assert torch.allclose(rgb["palette.png"][:, 4, 4], torch.tensor([220.0, 20, 20]), atol=3)
    assert torch.allclose(rgb["deep.png"][:, 4, 4], torch.tensor([128.0] * 3), atol=2)
    assert (items["alpha.png"]["image"] == 1).all()  # transparent over white
    left, right = rgb["rotated.jpg"][:, 4, 1], rgb["rotated.jpg"][:, 4, 6]
    assert left[2] > 150 > left[0] and right[0] > 150 > right[2]
    # the plain folder reads the same odd images through the same decoder
    folder = FolderDataset(tmp_path, size=8)
    assert folder.skipped == 3  # truncated.jpg, text.png and the stray metadata.jsonl
    assert torch.equal(
        folder[folder.paths.index(tmp_path / "cmyk.jpg")]["image"], rgb["cmyk.jpg"] / 127.5 - 1
    )


def test_bad_shard_members_and_pixel_limit(tmp_path):
    files = bad_files()
    with tarfile.open(tmp_path / "0.tar", "w") as tar:
        for name, (data, caption) in sorted(files.items()):
            key, ext = name.split(".")
            add_member(tar, f"{key}.{ext}", data)
            if caption is not None:
                add_member(tar, f"{key}.txt", caption.encode())
        add_member(tar, "orphan.txt", b"a caption without an image")
    ds = load_dataset(tmp_path / "0.tar", size=8)
    assert len(ds) == 5 and ds.skipped == 5
    assert ds.skips["no image member"] == ["0.tar:orphan"]
    with pytest.raises(ValueError, match="over the limit of 100"):
        decode_image(encoded((1, 2, 3)), 8, max_pixels=100)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("form", ["metadata", "hf", "parquet", "webdataset"])
def test_train_on_each_format(tmp_path, form):
    make = {
        "metadata": lambda: make_metadata(tmp_path / "meta"),
        "hf": lambda: make_hf(tmp_path / "hf", "img", "prompt"),
        "parquet": lambda: make_parquet(tmp_path / "d.parquet"),
        "webdataset": lambda: str(make_shards(tmp_path / "shards") / "{000000..000001}.tar"),
    }
    options = {"image_column": "img", "caption_column": "prompt"} if form == "hf" else {}
    cfg = TrainConfig(
        data=str(make[form]()),
        data_options=options,
        out=str(tmp_path / "run"),
        cond="text",
        text_encoder="scratch",
        size=8,
        steps=2,
        batch_size=2,
        channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(4,),
        layers_per_block=1,
        head_dim=16,
        log_every=1,
        checkpoint_every=2,
        sample_every=1000,
    )
    out = train(cfg, progress=False)
    assert (out / "model.safetensors").is_file()
