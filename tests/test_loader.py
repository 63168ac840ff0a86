"""The training loader (`difusion.data.loader`): order, resume, workers, crops, buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from difusion.data import FolderDataset, ShapesDataset
from difusion.data.decode import decode_image, image_size
from difusion.data.loader import BatchStream, LoaderError, bucket_shapes


class Numbered(Dataset):
    """Item i: an image filled with i, and label i."""

    size, channels = 2, 1

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.fail_at:
            raise OSError(f"disk on fire\nwhile reading {i}")
        return {"image": torch.full((1, 2, 2), float(i)), "label": i}


def global_order(streams: list[BatchStream], n_batches: int) -> list[int]:
    """The labels of `n_batches` global batches, rank by rank."""
    return [
        label for _ in range(n_batches) for s in streams for label in s.next()["label"].tolist()
    ]


def close_all(*streams: BatchStream) -> None:
    for s in streams:
        s.close()


def photo_folder(tmp_path, n: int, shapes=((20, 12),), size: int = 8) -> FolderDataset:
    """`n` PNGs (width, height from `shapes` in turn): red is 15 * k (which image),
    green a horizontal ramp and blue a vertical one, so that a crop and a flip show."""
    for k in range(n):
        w, h = shapes[k % len(shapes)]
        a = np.zeros((h, w, 3), np.uint8)
        a[..., 0] = 15 * k
        a[..., 1] = np.linspace(0, 255, w)[None, :]
        a[..., 2] = np.linspace(0, 255, h)[:, None]
        Image.fromarray(a).save(tmp_path / f"{k:02d}.png")
    return FolderDataset(tmp_path, size=size)


def which(image: torch.Tensor) -> int:
    """The photo `photo_folder` drew (from its red channel)."""
    return round(((image[0].mean().item() + 1) * 127.5) / 15)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_once_an_epoch_over_ranks(workers):
    data = Numbered(10)  # global batch 6: batches straddle the epochs' ends
    streams = [BatchStream(data, 3, world=2, rank=r, workers=workers) for r in range(2)]
    assert streams[0].batches_per_epoch == 2
    seen, epochs = [], []
    for _ in range(6):
        seen += global_order(streams, 1)
        epochs.append(streams[1].epoch)
    close_all(*streams)
    for e in range(3):
        assert sorted(seen[10 * e : 10 * e + 10]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new permutation each epoch
    assert epochs == [len(seen[: 6 * (g + 1)]) // 10 for g in range(6)]  # epochs completed


def test_small_data_set_and_single_rank_order():
    seen = global_order([BatchStream(Numbered(3), 8)], 3)  # 24 images: 8 epochs
    assert all(sorted(seen[3 * e : 3 * e + 3]) == [0, 1, 2] for e in range(8))
    one = global_order([BatchStream(Numbered(10), 6)], 4)
    two = global_order([BatchStream(Numbered(10), 3, world=2, rank=r) for r in range(2)], 4)
    assert one == two  # the same global order, whatever the split


@pytest.mark.parametrize(
    "options",
    [dict(workers=2), dict(workers=2, crop="random", flip=True, buckets=True, multiple=4)],
)
def test_resume_gives_the_uninterrupted_batches(tmp_path, options):
    # three buckets at size 16: (20, 12), (16, 16), (12, 20)
    data = photo_folder(tmp_path, 10, shapes=((32, 20), (20, 20), (20, 32)), size=16)
    whole = BatchStream(data, 3, seed=5, **options)
    first = BatchStream(data, 3, seed=5, **options)
    for _ in range(5):  # the workers prefetch further: those batches do not count
        whole.next()
        first.next()
    state = json.loads(json.dumps(first.state_dict()))
    assert all(isinstance(v, int) for v in state.values())
    assert state["epoch"] == 1 and state["batch"] > 0  # within an epoch
    first.close()
    resumed = BatchStream(data, 3, seed=5, **options)
    resumed.load_state_dict(state)
    for _ in range(5):
        a, b = whole.next(), resumed.next()
        assert torch.equal(a["image"], b["image"])
    assert resumed.state_dict() == whole.state_dict()
    close_all(whole, resumed)


def test_workers_give_the_batches_of_the_main_process(tmp_path):
    data = photo_folder(tmp_path, 7)
    options = dict(seed=1, world=2, rank=1, crop="random", flip=True)
    here, workers = BatchStream(data, 2, **options), BatchStream(data, 2, workers=2, **options)
    for _ in range(6):
        assert torch.equal(here.next()["image"], workers.next()["image"])
    close_all(here, workers)


def test_centre_crop_is_the_data_sets_own_image(tmp_path):
    data = photo_folder(tmp_path, 6)
    batch = BatchStream(data, 6).next()
    for x in batch["image"]:
        assert torch.equal(x, data[which(x)]["image"])
    assert torch.equal(data[0]["image"], decode_image(tmp_path / "00.png", 8) / 127.5 - 1)


def test_random_crops_are_windows_drawn_per_epoch_and_image(tmp_path):
    data = photo_folder(tmp_path, 8)  # 20 x 12 -> covers 8 x 8 as 13 x 8: 6 places
    stream = BatchStream(data, 4, seed=3, crop="random")
    places: dict[int, list[int]] = {}
    for b in range(6):  # 3 epochs of 2 batches
        for x in stream.next()["image"]:
            i = which(x)
            assert torch.equal(x, stream.item(b // 2, i)["image"])  # (seed, epoch, index)
            whole = data.item(i, (8, 8), crop=False)["image"]
            assert whole.shape == (3, 8, 13)
            left = [k for k in range(6) if torch.equal(whole[:, :, k : k + 8], x)]
            assert len(left) == 1
            places.setdefault(i, []).append(left[0])
    assert all(len(p) == 3 for p in places.values())
    assert sum(len(set(p)) > 1 for p in places.values()) >= 4  # they move between epochs
    assert len({p[0] for p in places.values()}) > 1  # and differ between images


def test_flip_mirrors_half_the_images(tmp_path):
    data = photo_folder(tmp_path, 16)
    plain = BatchStream(data, 16, seed=2).next()["image"]
    flipped = BatchStream(data, 16, seed=2, flip=True).next()["image"]
    mirrored = [torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain, strict=True)]
    kept = [torch.equal(f, p) for f, p in zip(flipped, plain, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 3 <= sum(mirrored) <= 13


def test_bucket_shapes():
    assert bucket_shapes(32) == [(40, 24), (32, 32), (24, 40)]
    shapes = bucket_shapes(256, multiple=16)
    assert (256, 256) in shapes and len(shapes) > 5
    for h, w in shapes:
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 256 * 256 and max(h, w) <= 2 * min(h, w)
        assert (w, h) in shapes


@pytest.mark.parametrize("crop", ["center", "random"])
def test_buckets_one_shape_a_batch_every_image_once(tmp_path, crop):
    sizes = [(32, 32)] * 6 + [(48, 30)] * 5 + [(30, 48)] * 7  # (width, height)
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (10 * k, 0, 0)).save(tmp_path / f"{k:02d}.png")
    data = FolderDataset(tmp_path, size=32)
    streams = [BatchStream(data, 2, world=2, rank=r, buckets=True, crop=crop) for r in range(2)]
    want = {(32, 32): range(6), (24, 40): range(6, 11), (40, 24): range(11, 18)}
    per_bucket: dict[tuple, list[int]] = {shape: [] for shape in want}
    seen_in_epoch_0: set[int] = set()
    for _ in range(24):
        in_epoch_0 = streams[0].epoch == 0
        batches = [s.next()["image"] for s in streams]
        shape = tuple(batches[0].shape[-2:])
        assert all(tuple(b.shape[-2:]) == shape for b in batches)  # one bucket a global batch
        ks = [round((x[0, 0, 0].item() + 1) * 127.5 / 10) for b in batches for x in b]
        assert set(ks) <= set(want[shape])
        per_bucket[shape] += ks
        if in_epoch_0:
            seen_in_epoch_0 |= set(ks)
    for shape, ks in per_bucket.items():
        n = len(want[shape])
        for e in range(len(ks) // n):
            assert sorted(ks[e * n : (e + 1) * n]) == list(want[shape])
    assert seen_in_epoch_0 == set(range(18)) and streams[0].epoch >= 4
    close_all(*streams)


def test_image_size_reads_the_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side
    Image.new("RGB", (20, 12)).save(tmp_path / "turned.jpg", exif=exif)
    assert image_size(tmp_path / "turned.jpg") == (12, 20)
    assert decode_image(tmp_path / "turned.jpg", (8, 8), crop=False).shape == (3, 13, 8)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(batch_size=0), "--batch-size must be 1 or more, not 0"),
        (dict(workers=-1), "--workers must be 0 or more, not -1"),
        (dict(world=0), "world must be 1 or more, not 0"),
        (dict(world=2, rank=2), "rank must be from 0 to 1 (world 2), not 2"),
        (dict(rank=-1), "rank must be from 0 to 0 (world 1), not -1"),
        (dict(crop="middle"), "--crop must be center or random, not 'middle'"),
        (dict(crop="random"), "--crop random needs a folder or file data set, not Numbered"),
        (dict(buckets=True), "--buckets needs a folder or file data set, not Numbered"),
        (dict(prefetch=0), "prefetch must be 1 or more, not 0"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    options = {"batch_size": 2, **options}
    with pytest.raises(ValueError) as e:
        BatchStream(Numbered(4), options.pop("batch_size"), **options)
    assert str(e.value) == message


def test_flip_refused_on_shapes_and_empty_data():
    with pytest.raises(ValueError, match="^--flip would swap left and right"):
        BatchStream(ShapesDataset(size=32, length=4), 2, flip=True)
    with pytest.raises(ValueError, match="^the data set is empty$"):
        BatchStream(Numbered(0), 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_image_is_a_one_line_error(workers):
    stream = BatchStream(Numbered(8, fail_at=3), 8, workers=workers)
    with pytest.raises(LoaderError) as e:
        stream.next()
    stream.close()
    assert str(e.value) == "data loader: image 3 (epoch 0): OSError: disk on fire while reading 3"


def test_resume_after_the_order_changed_starts_the_next_epoch(caplog):
    old = BatchStream(Numbered(10), 2)
    old.next()
    state = old.state_dict()
    new = BatchStream(Numbered(10), 3)  # another global batch: no exact place
    new.load_state_dict(state)
    assert new.epoch == 1 and "data order changed" in caplog.text
    fresh = BatchStream(Numbered(10), 3)
    assert global_order([fresh], 4) and fresh.epoch == 1  # 4 batches start in epoch 0
    assert global_order([new], 3) == global_order([fresh], 3)
    with pytest.raises(ValueError, match="needs epoch and batch"):
        new.load_state_dict({"epoch": "1"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches():
    stream = BatchStream(Numbered(8), 4, workers=2, pin_memory=True)
    assert stream.next()["image"].is_pinned()
    stream.close()


def test_training_on_pictures_of_three_shapes_with_workers_crops_flips_and_buckets(
    tmp_path, monkeypatch, capsys
):
    """End to end: `difusion train` with 2 decoding workers, random crops, flips and buckets
    on captioned pictures of three aspect ratios; it resumes where the data stream was."""
    from test_cli import ok, run_cli

    from difusion.model import DiffusionModel

    folder = tmp_path / "pics"
    folder.mkdir()
    photo_folder(folder, 12, shapes=((24, 12), (12, 24), (16, 16)))
    for i, p in enumerate(sorted(folder.glob("*.png"))):
        p.with_suffix(".txt").write_text(f"picture {i}")
    args = [
        "train", "--data", folder, "--size", "8", "--channels", "8", "--channel-mult", "1,2",
        "--attention", "", "--layers-per-block", "1", "--batch-size", "4", "--cond", "text",
        "--text-encoder", "scratch", "--workers", "2", "--crop", "random", "--flip",
        "--buckets", "--checkpoint-every", "2", "--sample-every", "100",
    ]  # fmt: skip
    out = tmp_path / "run"
    ok(monkeypatch, capsys, *args, "--steps", "3", "--out", out)
    ok(monkeypatch, capsys, *args, "--steps", "5", "--out", out, "--resume")
    model = DiffusionModel.load(out / "model.safetensors")
    assert model.sample(2, steps=2, cond=model.text_cond(["picture 1"] * 2)).shape == (2, 3, 8, 8)
    shapes = ["--data", "shapes", "--size", "16", "--out", tmp_path / "s"]
    code, _, err = run_cli(monkeypatch, capsys, *args, *shapes)
    assert code != 0 and "--crop random" in err and len(err.strip().splitlines()) == 1
