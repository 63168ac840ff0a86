import json

import numpy as np
import pytest
import torch
from cli_util import cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from difusion.checkpoints import CheckpointError
from difusion.data import DigitsDataset
from difusion.images import auto_scale, grid, to_pil
from difusion.model import DiffusionModel
from difusion.runs import Run, TrainingError
from difusion.train import TrainConfig, train
from difusion.vae_train import (
    FORMAT,
    VAETrainConfig,
    latent_spec,
    load_vae,
    save_vae,
    train_vae,
    vae_for,
)


@pytest.fixture(scope="module")
def digits16():
    return DigitsDataset(size=16)


def tiny_vae(tmp_path, name="vae", **kw) -> VAETrainConfig:
    base = dict(
        data="digits", out=str(tmp_path / name), size=16, steps=4, batch_size=8, channels=8,
        channel_mult=(1, 1), layers_per_block=1, latent_channels=4, lr=1e-3, log_every=1,
        checkpoint_every=2, sample_every=1000, ema_decay=0.9, scale_batches=2, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return VAETrainConfig(**base)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, digits16):
    tmp = tmp_path_factory.mktemp("vae")
    return train_vae(tiny_vae(tmp, steps=6), dataset=digits16, progress=False)


def test_vae_training_reduces_the_loss(tmp_path, digits16):
    losses = []
    cfg = tiny_vae(tmp_path, steps=30, checkpoint_every=1000, lr=2e-3)
    train_vae(cfg, dataset=digits16, progress=False, on_step=lambda s, r: losses.append(r["rec"]))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    run = Run(cfg.out)
    assert (run.dir / "loss.png").is_file() and (run.dir / "reconstructions.png").is_file()
    with safe_open(str(run.model_path), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT


def test_vae_resume_is_exact(tmp_path, digits16):
    whole = train_vae(tiny_vae(tmp_path, "whole", steps=4), dataset=digits16, progress=False)
    half = tiny_vae(tmp_path, "half", steps=2)
    train_vae(half, dataset=digits16, progress=False)
    train_vae(tiny_vae(tmp_path, "half", steps=4), resume=True, dataset=digits16, progress=False)
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(tmp_path / "half" / name))
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("rng."):
                assert torch.equal(a[k], b[k]), (name, k)
    assert (
        load_vae(whole).config.scaling_factor == load_vae(tmp_path / "half").config.scaling_factor
    )
    assert [r["step"] for r in Run(tmp_path / "half").read_log()] == [1, 2, 3, 4]


def test_scaling_factor_gives_unit_latents(vae_run, digits16):
    vae = load_vae(vae_run)
    assert vae.config.scaling_factor != 1.0
    x = torch.stack([digits16[i]["image"] for i in range(64)])
    with torch.no_grad():
        z = vae.encode_latents(x, generator=torch.Generator().manual_seed(1))
    assert z.shape == (64, 4, 8, 8)
    assert 0.8 < z.std().item() < 1.25


class NaNData:
    size, channels = 16, 1

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.full((1, 16, 16), float("nan"))}


def test_vae_nan_guard(tmp_path):
    with pytest.raises(TrainingError, match="loss became nan at step 1; stopping: nothing"):
        train_vae(tiny_vae(tmp_path, steps=3), dataset=NaNData(), progress=False)


def tiny_unet(tmp_path, latent, name="ldm", **kw) -> TrainConfig:
    base = dict(
        data="digits", out=str(tmp_path / name), size=16, steps=2, batch_size=4, channels=8,
        channel_mult=(1, 2), attention_resolutions=(), layers_per_block=1, head_dim=8, log_every=1,
        checkpoint_every=1000, sample_every=1000, device="cpu", latent=str(latent),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_layout_map_refuses_latents(tmp_path, vae_run):
    text = dict(data="shapes", cond="text", text_encoder="scratch")
    cfg = tiny_unet(tmp_path, vae_run, layout_map=True, **text)
    with pytest.raises(TrainingError, match="--layout-map is fitted to pixels"):
        train(cfg, progress=False)
    assert not (tmp_path / "ldm").exists()


def test_latent_diffusion_trains_and_samples(monkeypatch, capsys, tmp_path, vae_run):
    out = tmp_path / "ldm"
    code, _, err = cli(
        monkeypatch, capsys, "train", "--data", "digits", "--size", "16", "--out", out,
        "--latent", vae_run, "--steps", "2", "--batch-size", "4", "--channels", "32",
        "--channel-mult", "1,1", "--attention", "8", "--layers-per-block", "1", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    model = DiffusionModel.load(out / "model.safetensors")
    spec = model.config.latent
    assert spec["sha256"] == latent_spec(vae_run)[0]["sha256"]
    assert model.config.channels == 4 and model.config.image_size == 8
    assert not model.config.clip_x0
    png, gif = tmp_path / "s.png", tmp_path / "s.gif"
    code, _, err = cli(
        monkeypatch, capsys, "sample", out, "-n", "1", "--steps", "3", "-o", png, "--gif", gif
    )
    assert code == 0, err
    pixel_grid = grid(to_pil(torch.zeros(1, 1, 16, 16)), scale=auto_scale(16))
    with Image.open(png) as im:
        assert im.size == pixel_grid.size
        final = np.asarray(im.convert("L"))
    with Image.open(gif) as anim:  # decoded frames at pixel size, ending on the image
        # (Pillow merges identical consecutive frames: a 2-step VAE decodes alike when noisy)
        assert 2 <= anim.n_frames <= 4 and anim.size == pixel_grid.size
        anim.seek(anim.n_frames - 1)
        assert np.array_equal(np.asarray(anim.convert("L")), final)
    # eval compares the decoded images (1 x 16 x 16), not the latents (4 x 8 x 8), with the data
    code, out_text, err = cli(
        monkeypatch, capsys, "eval", out, "--data", "digits", "-n", "8", "--steps", "2", "--json"
    )
    assert code == 0, err
    result = json.loads(out_text)
    assert result["n_fake"] == 8 and result["fid"] > 0 and result["num_classes"] == 10


def test_latent_model_refuses_another_vae(monkeypatch, capsys, tmp_path, vae_run, digits16):
    train(tiny_unet(tmp_path, vae_run), dataset=digits16, progress=False)
    model = DiffusionModel.load(tmp_path / "ldm" / "model.safetensors")
    # the VAE file changes (here: its scaling factor): the model refuses it, in one line
    vae = load_vae(vae_run)
    vae.config.scaling_factor *= 2
    save_vae(vae, vae_run / "model.safetensors")
    with pytest.raises(CheckpointError, match="not the VAE this model was trained with"):
        vae_for(model.config.latent)
    code, _, err = cli(monkeypatch, capsys, "sample", tmp_path / "ldm", "-n", "1", "--steps", "1")
    assert code == 1 and err.count("\n") == 1 and "not the VAE" in err
    vae.config.scaling_factor /= 2  # restore the module fixture's file
    save_vae(vae, vae_run / "model.safetensors")


def test_missing_or_garbage_vae_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    for vae in (tmp_path / "missing", garbage):
        code, _, err = cli(
            monkeypatch, capsys, "train", "--out", tmp_path / "x", "--latent", vae,
            "--steps", "1", "--size", "16",
        )  # fmt: skip
        assert code == 1 and err.startswith("error:") and err.count("\n") == 1, err


def test_vae_cli_and_option_checks(monkeypatch, capsys, tmp_path):
    out = tmp_path / "v"
    args = ("train", "--model", "vae", "--size", "16", "--steps", "2", "--batch-size", "4",
            "--channels", "8", "--channel-mult", "1,1", "--layers-per-block", "1",
            "--device", "cpu", "--out", out)  # fmt: skip
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert load_vae(out).config.downscale == 2
    code, _, err = cli(monkeypatch, capsys, *args, "--prediction", "v")
    assert code == 1 and "--prediction: not an option of --model vae" in err
    code, _, err = cli(monkeypatch, capsys, "sample", out)
    assert code == 1 and "a VAE, not a diffusion model" in err
