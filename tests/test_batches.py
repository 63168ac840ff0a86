"""`training_batches`, the one source of every trainer's batches, and the place in the data
that each trainer's checkpoint keeps."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from difusion.batches import RenderedShapes, restore_stream, stream_metadata, training_batches
from difusion.data import DigitsDataset, ShapesDataset
from difusion.data.loader import BatchStream
from difusion.gan_train import GANTrainConfig, train_gan
from difusion.runs import TrainingError
from difusion.vae_train import VAETrainConfig, train_vae

CPU = torch.device("cpu")


class Numbered(Dataset):
    """Item i: an image filled with i, and label i."""

    size, channels = 2, 1

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(i)), "label": i}


def labels(batches, n: int) -> list[int]:
    return [label for _ in range(n) for label in batches.next()["label"].tolist()]


def stream(dataset: Dataset, batch_size: int = 3, **kw):
    return training_batches(dataset, batch_size, 0, torch.Generator().manual_seed(0), CPU, **kw)


def test_shapes_are_rendered_whole_batches_drawn_by_the_generator():
    shapes = ShapesDataset(size=16, length=100)
    a, b = stream(shapes, 4), stream(shapes, 4)
    assert isinstance(a, RenderedShapes)
    first, again = a.next(), b.next()
    assert first["image"].shape == (4, 3, 16, 16) and len(first["caption"]) == 4
    assert torch.equal(first["image"], again["image"]) and first["caption"] == again["caption"]
    assert not torch.equal(a.next()["image"], first["image"])
    # a crop, flip or bucket asks for the stream, which says what it cannot do in one line
    with pytest.raises(TrainingError, match="^--flip would swap left and right"):
        stream(shapes, flip=True)
    with pytest.raises(TrainingError, match="^--crop random needs a folder or file data set"):
        stream(shapes, crop="random")


def test_other_data_gives_each_image_once_an_epoch_over_the_processes():
    one = stream(Numbered(12))
    assert isinstance(one, BatchStream)
    assert sorted(labels(one, 4)) == list(range(12))
    ranks = [stream(Numbered(12), 2, rank=r, world=2) for r in range(2)]
    seen = [label for _ in range(3) for s in ranks for label in s.next()["label"].tolist()]
    assert sorted(seen) == list(range(12))
    assert labels(stream(Numbered(12)), 8) == labels(stream(Numbered(12)), 8)  # the seed's order
    with pytest.raises(TrainingError, match="^the data set is empty$"):
        stream(Numbered(0))
    with pytest.raises(TrainingError, match="^--workers must be 0 or more, not -1$"):
        stream(Numbered(4), workers=-1)


def test_the_place_in_the_data_goes_through_checkpoint_metadata():
    saved = stream(Numbered(10))
    labels(saved, 2)
    metadata = stream_metadata(saved)
    assert json.loads(metadata["data_stream"])["batch"] == 2
    resumed = stream(Numbered(10))
    restore_stream(resumed, metadata)
    assert labels(resumed, 5) == labels(saved, 5)
    # a checkpoint saved before the place was kept: the data starts afresh
    old, fresh = stream(Numbered(10)), stream(Numbered(10))
    restore_stream(old, {"step": "2"})
    assert labels(old, 3) == labels(fresh, 3)


TRAINERS = {
    "gan": (train_gan, GANTrainConfig, dict(channels=8)),
    "vae": (train_vae, VAETrainConfig, dict(channels=8, channel_mult=(1, 1), scale_batches=1)),
}


@pytest.mark.parametrize("model", TRAINERS)
def test_gan_and_vae_checkpoints_keep_their_place_in_the_data(tmp_path, model):
    train_fn, config, options = TRAINERS[model]
    cfg = config(
        out=str(tmp_path / model), size=16, steps=3, batch_size=8, checkpoint_every=3,
        sample_every=1000, device="cpu", **options,
    )  # fmt: skip
    run = train_fn(cfg, dataset=DigitsDataset(size=16), progress=False)
    with safe_open(str(run / "train_state.safetensors"), "pt") as f:
        place = json.loads(f.metadata()["data_stream"])
    assert place == {"seed": 0, "images": 1797, "global_batch": 8, "buckets": 0,
                     "epoch": 0, "batch": 3}  # fmt: skip
