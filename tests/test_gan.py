import json

import pytest
import torch
from cli_util import cli
from safetensors import safe_open
from safetensors.torch import load_file

from difusion.checkpoints import CheckpointError
from difusion.compare import load_generator_or_diffusion
from difusion.data import DigitsDataset
from difusion.evaluate import draw, evaluate
from difusion.gan_train import GANTrainConfig, train_gan
from difusion.model import DiffusionModel
from difusion.nn.gan import GAN, Discriminator, GANConfig, Generator, is_gan_file, parameter_count
from difusion.runs import Run, TrainingError
from difusion.train import TrainConfig, train


def tiny(tmp_path, name="gan", **kw) -> GANTrainConfig:
    base = dict(
        data="digits", out=str(tmp_path / name), size=16, steps=6, batch_size=8, channels=8,
        log_every=1, checkpoint_every=3, sample_every=1000, ema_decay=0.9,
    )  # fmt: skip
    base.update(kw)
    return GANTrainConfig(**base)


@pytest.fixture(scope="module")
def digits16():
    return DigitsDataset(size=16)


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_shapes(size, channels):
    config = GANConfig(image_size=size, channels=channels, z_dim=128, g_channels=8, d_channels=8)
    gen, disc = Generator(config), Discriminator(config)
    x = gen(torch.randn(5, 128))
    assert x.shape == (5, channels, size, size)
    assert x.abs().max() <= 1  # tanh
    assert disc(x).shape == (5,)
    assert gen(torch.randn(2, 128, 1, 1)).shape == (2, channels, size, size)


def test_parameter_counts_match_dcgan():
    # the DCGAN of the paper / PyTorch's tutorial: 64 px RGB, z 100, 64 base channels
    config = GANConfig(image_size=64, channels=3, z_dim=100)
    assert parameter_count(Generator(config)) == 3_576_704
    assert parameter_count(Discriminator(config)) == 2_765_568
    small = GANConfig(image_size=16, channels=1)
    g, d = parameter_count(Generator(small)), parameter_count(Discriminator(small))
    assert 100_000 < d < g < 1_000_000
    # BatchNorm in G after every hidden layer; none in D's first layer
    kinds = [type(m).__name__ for m in Discriminator(small).net]
    assert kinds[:2] == ["Conv2d", "LeakyReLU"] and "BatchNorm2d" in kinds
    with pytest.raises(ValueError, match="power of two"):
        GANConfig(image_size=24)


def test_sample_is_deterministic_and_batch_independent(tmp_path):
    gan = GAN(GANConfig(image_size=16, channels=1, g_channels=8))
    a = gan.sample(6, seed=3)
    b = gan.sample(6, seed=3, batch_size=4)
    assert torch.allclose(a, b, atol=1e-6) and a.shape == (6, 1, 16, 16)
    assert not torch.equal(a, gan.sample(6, seed=4))
    path = tmp_path / "g.safetensors"
    gan.save(path)
    assert is_gan_file(path)
    assert torch.equal(GAN.load(path).sample(6, seed=3), a)


def test_training_runs_saves_and_d_loss_falls(tmp_path, digits16):
    records = []
    out = train_gan(
        tiny(tmp_path, steps=30, channels=16, batch_size=32, log_every=5),
        dataset=digits16,
        progress=False,
        on_step=lambda step, rec: records.append(rec),
    )
    assert len(records) == 30 and all(set(r) >= {"loss_d", "loss_g"} for r in records)
    first = sum(r["loss_d"] for r in records[:3]) / 3
    last = sum(r["loss_d"] for r in records[-5:]) / 5
    assert last < first
    for name in ("model.safetensors", "train_state.safetensors", "log.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "samples.png").is_file()
    log = Run(out).read_log()
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    assert {"loss_d", "loss_g", "d_real", "d_fake"} <= set(log[0])
    assert json.loads((out / "train_config.json").read_text())["model"] == "gan"
    gan = GAN.load(out / "model.safetensors")
    assert gan.config.image_size == 16 and gan.config.data == "digits"
    x = gan.sample(4, seed=0)
    assert x.shape == (4, 1, 16, 16) and x.abs().max() <= 1


def test_resume_continues_exactly(tmp_path, digits16):
    full = train_gan(tiny(tmp_path, "full", steps=6), dataset=digits16, progress=False)
    half = train_gan(tiny(tmp_path, "half", steps=3), dataset=digits16, progress=False)
    resumed = train_gan(
        tiny(tmp_path, "half", steps=6), resume=True, dataset=digits16, progress=False
    )
    assert resumed == half
    a = load_file(full / "train_state.safetensors")
    b = load_file(resumed / "train_state.safetensors")
    assert set(a) == set(b)
    for key in a:
        if key.startswith(("g.", "d.", "opt_")):
            assert torch.equal(a[key], b[key]), key
    ema_a = load_file(full / "model.safetensors")
    ema_b = load_file(resumed / "model.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert [r["step"] for r in Run(resumed).read_log()] == list(range(1, 7))
    with safe_open(str(resumed / "train_state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["data_stream"])["batch"] == 6  # the place in the data


def test_resume_needs_a_gan_run_and_runs_are_not_overwritten(tmp_path, digits16):
    cfg = tiny(tmp_path, steps=2)
    train_gan(cfg, dataset=digits16, progress=False)
    with pytest.raises(TrainingError, match="already holds a run"):
        train_gan(cfg, dataset=digits16, progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_gan(tiny(tmp_path, "none"), resume=True, dataset=digits16, progress=False)
    diffusion = TrainConfig(
        out=str(tmp_path / "unet"), size=8, steps=1, batch_size=2, channels=16,
        channel_mult=(1, 2), attention_resolutions=(), layers_per_block=1, head_dim=16,
    )  # fmt: skip
    train(diffusion, dataset=DigitsDataset(size=8), progress=False)
    with pytest.raises(TrainingError, match="diffusion run, not a GAN run"):
        train_gan(tiny(tmp_path, "unet"), resume=True, dataset=digits16, progress=False)


class NaNDigits(torch.utils.data.Dataset):
    """Digits whose images turn into NaN after a few steps."""

    def __init__(self, base, after_steps, batch):
        self.base, self.calls, self.limit = base, 0, after_steps * batch
        self.channels, self.size = base.channels, base.size

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.calls += 1
        item = dict(self.base[i])
        if self.calls > self.limit:
            item["image"] = item["image"] * float("nan")
        return item


@pytest.mark.parametrize("log_every", [1, 100])  # found at a log line, or before a checkpoint
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits16, log_every):
    cfg = tiny(tmp_path, steps=10, checkpoint_every=3, log_every=log_every)
    with pytest.raises(TrainingError) as error:
        train_gan(cfg, dataset=NaNDigits(digits16, after_steps=4, batch=8), progress=False)
    assert str(error.value) == (
        f"loss_d became nan at step 5; stopping: the last good checkpoint (step 3) is kept in "
        f"{cfg.out}"
    )
    run = Run(cfg.out)
    with safe_open(str(run.state_path), "pt") as f:
        assert f.metadata()["step"] == "3"
    assert all(torch.isfinite(v).all() for v in load_file(run.model_path).values())


def test_loader_dispatches_on_the_checkpoint_format(tmp_path, digits16):
    out = train_gan(tiny(tmp_path, steps=2), dataset=digits16, progress=False)
    gan = load_generator_or_diffusion(out)
    assert isinstance(gan, GAN)
    assert draw(gan, 3, sampler="ddpm", steps=1000).shape == (3, 1, 16, 16)
    with pytest.raises(CheckpointError):
        DiffusionModel.load(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a difusion GAN"):
        GAN.load(_diffusion_file(tmp_path))
    result = evaluate(gan, "digits", 20, "random")
    assert result["n_fake"] == 20 and result["steps"] == 1 and result["fid"] > 0


def _diffusion_file(tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path / "d"), size=8, steps=1, batch_size=2, channels=16, channel_mult=(1, 2),
        attention_resolutions=(), layers_per_block=1, head_dim=16,
    )  # fmt: skip
    run = train(cfg, dataset=DigitsDataset(size=8), progress=False)
    assert isinstance(load_generator_or_diffusion(run), DiffusionModel)
    return run / "model.safetensors"


# ---- command line ----


TINY_CLI = ("--model", "gan", "--size", "16", "--steps", "4", "--batch-size", "8",
            "--channels", "8", "--checkpoint-every", "2")  # fmt: skip


def test_cli_trains_a_gan_and_resumes(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = cli(monkeypatch, capsys, "train", "--out", out, *TINY_CLI)
    assert code == 0, err
    assert GAN.load(out / "model.safetensors").config.g_channels == 8
    more = [a if a != "4" else "6" for a in TINY_CLI]  # --steps 6
    code, _, err = cli(
        monkeypatch, capsys, "train", "--out", out, *more, "--resume", "--workers", 1
    )
    assert code == 0, err
    assert Run(out).read_log()[-1]["step"] == 6
    assert json.loads((out / "train_config.json").read_text())["workers"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--cond", "label"), "--cond: not an option of --model gan"),
        (("--prediction", "v", "--dropout", "0.1"), "--prediction, --dropout: not an option"),
        (("--flip", "--crop", "random"), "--crop, --flip: not an option of --model gan"),
        (("--model", "flow"), "--model must be unet, gan, vae"),
    ],
)
def test_cli_gan_errors_are_one_line(monkeypatch, capsys, tmp_path, extra, message):
    code, _, err = cli(monkeypatch, capsys, "train", "--out", tmp_path / "r", *TINY_CLI, *extra)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_samples_a_gan_run(monkeypatch, capsys, tmp_path, digits16):
    run = train_gan(tiny(tmp_path, steps=2), dataset=digits16, progress=False)
    png = tmp_path / "s.png"
    code, out, err = cli(monkeypatch, capsys, "sample", run, "-n", "4", "-o", png)
    assert code == 0, err
    assert png.is_file() and "GAN" in out


def test_cli_evaluates_a_gan_run(monkeypatch, capsys, tmp_path, digits16):
    run = train_gan(tiny(tmp_path, steps=2), dataset=digits16, progress=False)
    args = ("eval", run, "-n", "12", "--feature-net", "random", "--json")
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    result = json.loads(out)
    assert result["n_fake"] == 12 and result["data"] == "digits" and result["steps"] == 1
