import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difusion import Pipeline
from difusion.checkpoints import CheckpointError
from difusion.data import ShapesDataset
from difusion.model import DiffusionModel
from difusion.train import TrainConfig, train


def tiny_text_run(tmp_path, encoder, name):
    cfg = TrainConfig(
        data="shapes", out=str(tmp_path / name), size=16, steps=2, batch_size=4, channels=16,
        channel_mult=(1, 2), attention_resolutions=(8,), layers_per_block=1, head_dim=16,
        cond="text", text_encoder=encoder, prediction="v",
    )  # fmt: skip
    return train(cfg, dataset=ShapesDataset(size=16, length=64), progress=False)


@pytest.fixture(scope="module", params=["scratch", "minilm"])
def text_run(request, tmp_path_factory):
    return tiny_text_run(tmp_path_factory.mktemp(request.param), request.param, "run")


def test_pipeline_images_deterministic_and_prompt_dependent(text_run):
    pipe = Pipeline.from_pretrained(text_run)
    a = pipe("a red circle", steps=3, seed=1, n=2)
    b = pipe("a red circle", steps=3, seed=1, n=2)
    assert len(a) == 2 and a[0].size == (16, 16) and a[0].mode == "RGB"
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    c = pipe("a blue square above a green triangle", steps=3, seed=1, n=2, guidance=7.0)
    assert a[0].tobytes() != c[0].tobytes()


def test_negative_prompt_and_guidance_one(text_run):
    pipe = Pipeline.from_pretrained(text_run)
    x = pipe.sample("a red circle", steps=3, seed=0, guidance=4.0)
    x_neg = pipe.sample(
        "a red circle", steps=3, seed=0, guidance=4.0, negative_prompt="a red square"
    )
    assert not torch.allclose(x, x_neg)
    # guidance 1 ignores the unconditional branch, so the negative prompt has no effect
    g1 = pipe.sample("a red circle", steps=3, seed=0, guidance=1.0)
    g1_neg = pipe.sample(
        "a red circle", steps=3, seed=0, guidance=1.0, negative_prompt="a red square"
    )
    assert torch.equal(g1, g1_neg)


def test_callback_and_latents(text_run):
    pipe = Pipeline.from_pretrained(text_run)
    seen = []
    latents = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    x = pipe.sample(
        "a red circle", steps=4, latents=latents, callback=lambda i, s, x0: seen.append((i, s))
    )
    y = pipe.sample("a red circle", steps=4, latents=latents, seed=99)
    assert torch.equal(x, y)  # the latents, not the seed, decide
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe.sample("a red circle", latents=torch.randn(1, 3, 8, 8))


def test_batched_guidance_equals_two_forwards(text_run):
    """Classifier-free guidance in one batched forward equals the textbook two forwards."""
    model = DiffusionModel.load(text_run / "model.safetensors")
    cond, uncond = model.text_cond(["a red circle"]), model.text_cond([""])
    den = model.denoiser()
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([2.0])
    from difusion.denoiser import guided

    got = guided(den, cond, uncond, 3.0)(x, sigma)
    want = den(x, sigma, uncond) + 3.0 * (den(x, sigma, cond) - den(x, sigma, uncond))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_checkpoint_records_text_encoder_and_refuses_another(tmp_path, text_run):
    path = text_run / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = json.loads(meta["config"])
    spec = config["text_encoder"]
    assert spec["identity"]["name"] == spec["name"]
    assert (
        "text_encoder.embed.weight" in tensors
        or any(k.startswith("text_encoder.") for k in tensors)
    ) == (spec["name"] == "scratch")
    config["text_encoder"]["identity"]["sha256"] = "0" * 64
    meta["config"] = json.dumps(config)
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata=meta)
    with pytest.raises(CheckpointError, match="text encoder mismatch"):
        Pipeline.from_pretrained(forged)


def test_pipeline_draws_label_and_unconditional_models(tmp_path):
    """The prompt is what the model is conditioned on: a class name, or nothing."""
    from difusion.data import DigitsDataset

    small = dict(size=8, steps=1, batch_size=2, channels=16, channel_mult=(1, 2),
                 attention_resolutions=(4,), layers_per_block=1, head_dim=16)  # fmt: skip
    data = DigitsDataset(size=8)
    uncond = Pipeline.from_pretrained(
        train(TrainConfig(out=str(tmp_path / "u"), **small), dataset=data, progress=False)
    )
    assert uncond.kind == "unconditional" and uncond.default_guidance == 1.0
    x = uncond.sample("", n=2, steps=3, seed=0)
    assert torch.equal(x, uncond.model.sample(2, steps=3, seed=0))
    with pytest.raises(ValueError, match="unconditional: give an empty prompt"):
        uncond.sample("a seven", steps=2)
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        uncond.sample("", steps=2, guidance=3.0)

    run = train(
        TrainConfig(out=str(tmp_path / "l"), cond="label", **small), dataset=data, progress=False
    )
    labels = Pipeline.from_pretrained(run)
    assert labels.kind == "label" and labels.class_names == [str(i) for i in range(10)]
    sevens = labels.sample("7", n=2, steps=3, seed=0, guidance=3.0)
    cond, uncond_branch = labels.model.label_cond([7, 7])
    want = labels.model.sample(2, steps=3, seed=0, cond=cond, uncond=uncond_branch, guidance=3.0)
    assert torch.equal(sevens, want)
    with pytest.raises(ValueError, match="not a class of this model; choose one of 0, 1"):
        labels.sample("seven", steps=2)
    with pytest.raises(ValueError, match="negative prompt needs a text model"):
        labels.sample("7", steps=2, negative_prompt="1")


def test_generate_cli(monkeypatch, capsys, tmp_path, text_run):
    from PIL import Image

    from difusion.cli import main

    out, gif = tmp_path / "g.png", tmp_path / "g.gif"
    argv = ["difusion", "generate", "a red circle", "a blue square", "-n", "2", "--steps", "3",
            "--model", str(text_run), "-o", str(out), "--gif", str(gif), "--negative", "noise"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    assert "4 images" in capsys.readouterr().out
    assert Image.open(gif).n_frames == 3  # one x0 estimate a step
    monkeypatch.setattr(sys, "argv", ["difusion", "generate", " ", "--model", str(text_run)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1 and "a prompt is empty" in capsys.readouterr().err
