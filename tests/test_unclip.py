"""unCLIP: the prior and the decoder train, the prior's embeddings are CLIP's, guidance 1 is
no guidance, and the packed model generates and makes variations through Pipeline, the
command line and the OpenAI client; bad inputs get one line."""

import base64
import io

import pytest
import torch
from PIL import Image
from serve_util import running
from test_cli import run_cli

from difusion.clip import Clip, ClipConfig
from difusion.data.shapes import ShapesDataset
from difusion.denoiser import bind, guided
from difusion.pipeline import Pipeline
from difusion.prior import Prior, text_cond
from difusion.prior_train import PriorTrainConfig, train_prior
from difusion.samplers import SAMPLERS
from difusion.train import TrainConfig, train
from difusion.unclip import UnclipPipeline, frozen_clip, pack, slerp

SIZE = 16
PROMPTS = ["a red circle", "un círculo rojo encima de un cuadrado azul"]


def tiny_clip(folder, embed_dim=32):
    torch.manual_seed(0)
    config = ClipConfig(
        vision_layers=1, text_layers=1, vision_width=64, text_width=64, embed_dim=embed_dim
    )
    Clip(config).save(folder)
    return folder


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("unclip")


@pytest.fixture(scope="module")
def clip_dir(tmp):
    return tiny_clip(tmp / "clip")


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(size=SIZE, length=512)


@pytest.fixture(scope="module")
def prior_run(tmp, clip_dir, shapes):
    losses = []
    cfg = PriorTrainConfig(
        data="shapes", clip=str(clip_dir), out=str(tmp / "prior"), steps=30, batch_size=16,
        lr=1e-3, warmup=1, width=32, layers=1, heads=2, log_every=10, sample_every=1000,
        checkpoint_every=1000,
    )  # fmt: skip
    folder = train_prior(cfg, dataset=shapes, progress=False, on_step=lambda s, r: losses.append(r))
    return folder, [r["loss"] for r in losses]


@pytest.fixture(scope="module")
def decoder_run(tmp, clip_dir, shapes):
    losses = []
    cfg = TrainConfig(
        data="shapes", out=str(tmp / "decoder"), size=SIZE, steps=24, batch_size=8, channels=16,
        channel_mult=(1, 2), attention_resolutions=(8,), layers_per_block=1, head_dim=16,
        lr=2e-3, warmup=1, cond="image", clip=str(clip_dir), log_every=8, sample_every=1000,
        checkpoint_every=1000,
    )  # fmt: skip
    folder = train(cfg, dataset=shapes, progress=False, on_step=lambda s, loss: losses.append(loss))
    return folder, losses


@pytest.fixture(scope="module")
def model_dir(tmp, prior_run, decoder_run):
    return pack(prior_run[0], decoder_run[0], tmp / "model")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir)


def picture(colour=(230, 30, 30)) -> Image.Image:
    image = Image.new("RGB", (24, 24))
    image.paste(colour, (6, 6, 18, 18))
    return image


def first_and_last(losses, k=6):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_prior_and_decoder_training_lower_their_loss(prior_run, decoder_run):
    for _, losses in (prior_run, decoder_run):
        first, last = first_and_last(losses)
        assert last < 0.8 * first, losses


def test_prior_draws_unit_embeddings_of_clip_size(pipe):
    clip = pipe.clip
    drawn = pipe.prior_embeds(PROMPTS * 2, seed=3)
    images = clip.encode_image(torch.zeros(1, 3, SIZE, SIZE))
    assert drawn.shape == (4, images.shape[1]) == (4, 32)
    assert torch.allclose(drawn.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.equal(drawn[0], drawn[2])  # each draw its own noise
    assert torch.equal(drawn, pipe.prior_embeds(PROMPTS * 2, seed=3))
    cond, uncond = text_cond(clip, PROMPTS), text_cond(clip, ["", ""])
    for sampler in SAMPLERS:  # every sampler takes x [B, D] as it takes images
        drawn = pipe.prior.sample(cond, uncond, sampler=sampler, steps=3, guidance=3.0)
        assert drawn.shape == (2, 32) and torch.allclose(drawn.norm(dim=-1), torch.ones(2))


def test_prior_guidance_one_is_the_unguided_prior(pipe):
    prior: Prior = pipe.prior
    cond = text_cond(pipe.clip, PROMPTS)
    uncond = text_cond(pipe.clip, ["", ""])
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.tensor(2.5)
    both_branches = guided(prior.denoiser(), cond, uncond, torch.tensor(1.0))(x, sigma)
    assert torch.allclose(both_branches, bind(prior.denoiser(), cond)(x, sigma), atol=1e-5)
    one = prior.sample(cond, uncond, guidance=1.0, seed=1)
    assert torch.equal(one, prior.sample(cond, None, seed=1))
    assert not torch.allclose(one, prior.sample(cond, uncond, guidance=4.0, seed=1), atol=1e-4)


def test_text_to_image_through_every_sampler(pipe):
    for sampler in SAMPLERS:
        images = pipe(PROMPTS, n=2, steps=2, sampler=sampler)
        assert [im.size for im in images] == [(SIZE, SIZE)] * 4, sampler
    seen = []
    pipe("a blue square", steps=3, callback=lambda i, sigma, x0: seen.append(x0.shape))
    assert seen == [(1, 3, SIZE, SIZE)] * 3


def test_variations_and_interpolation_through_pipeline(pipe):
    images = pipe.variations(picture(), n=3, steps=2)
    assert [im.size for im in images] == [(SIZE, SIZE)] * 3
    assert images[0].tobytes() != images[1].tobytes()
    strip = pipe.variations(picture(), mix=picture((30, 60, 230)), weights=[0, 0.5, 1], steps=2)
    assert len(strip) == 3
    a, b = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert abs(float(mid.norm()) - 1) < 1e-5 and torch.allclose(mid @ a, mid @ b, atol=1e-5)
    with pytest.raises(ValueError, match="weights"):
        pipe.variations(picture(), mix=picture(), weights=[1.5])


def test_cli_generate_and_variations(monkeypatch, capsys, tmp, model_dir):
    src = tmp / "red.png"
    picture().save(src)
    grid, gif = tmp / "grid.png", tmp / "steps.gif"
    code, _, err = run_cli(
        monkeypatch, capsys, "generate", PROMPTS[1], "--model", model_dir, "-n", "2",
        "--steps", "2", "--gif", gif, "-o", grid, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(gif).n_frames == 2
    out = tmp / "variations.png"
    code, _, err = run_cli(
        monkeypatch, capsys, "variations", src, "--model", model_dir, "-n", "3", "--steps", "2",
        "-o", out, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    strip = tmp / "strip.png"
    code, _, err = run_cli(
        monkeypatch, capsys, "variations", src, "--model", model_dir, "--mix", src,
        "--weights", "0,0.5,1", "--steps", "2", "-o", strip, "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(strip).size == Image.open(out).size  # three pictures each


def test_bad_inputs_get_one_line(monkeypatch, capsys, tmp, model_dir, decoder_run, prior_run):
    text = tmp / "not-an-image.png"
    text.write_text("hello")
    cases = [
        (("variations", text, "--model", model_dir), "not a readable image"),
        (("variations", tmp / "missing.png", "--model", model_dir), "no such file"),
        (("train", "--model", "prior", "--data", "shapes"), "needs --clip"),
        (("train", "--model", "decoder", "--clip", tmp / "clip", "--cond", "text"), "--cond"),
        (("train", "--clip", tmp / "clip"), "--clip is for"),
    ]
    src = tmp / "red.png"
    picture().save(src)
    cases.append((("variations", src, "--model", model_dir, "--weights", "0,2", "--mix", src),
                   "--weights"))  # fmt: skip
    cases.append((("variations", src, "--model", decoder_run[0]), "not an unCLIP model"))
    other = tiny_clip(tmp / "clip16", embed_dim=16)
    capsys.readouterr()  # transformers' progress bar of the save
    cases.append((("unclip", "--prior", prior_run[0], "--decoder", decoder_run[0], "--out",
                   tmp / "mismatch", "--clip", other), "clip16"))  # fmt: skip
    for args, says in cases:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 1 and says in err and len(err.strip().splitlines()) == 1, (args, err)
    with pytest.raises(ValueError, match="16 values; the decoder takes 32"):
        UnclipPipeline(Prior.load(prior_run[0]), pipe_decoder(decoder_run[0]), frozen_clip(other))


def test_cli_resume_keeps_the_runs_own_options(monkeypatch, capsys, tmp, prior_run,
                                               decoder_run):  # fmt: skip
    import shutil

    prior, decoder = tmp / "prior-again", tmp / "decoder-again"
    shutil.copytree(prior_run[0], prior)
    shutil.copytree(decoder_run[0], decoder)
    clip = ("--clip", tmp / "clip")
    for args, says in [
        (("--model", "prior", "--out", prior, "--lr", "0.5"), "--lr 0.5: the run in"),
        (("--model", "decoder", "--out", decoder, "--batch-size", "4"), "--batch-size 4: the"),
        (("--model", "decoder", "--out", decoder, "--steps", "10"), "is at step 24"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, "train", "--data", "shapes", *clip, *args,
                               "--resume")  # fmt: skip
        assert code == 1 and says in err and len(err.strip().splitlines()) == 1, (args, err)
    code, out, err = run_cli(monkeypatch, capsys, "train", "--model", "decoder", *clip,
                             "--out", decoder, "--resume", "--steps", "26")  # fmt: skip
    assert code == 0 and "stopped at step 26" in out + err, err


def pipe_decoder(folder):
    from difusion.model import DiffusionModel

    return DiffusionModel.load(folder / "model.safetensors")


def test_openai_client_create_variation(model_dir):
    from openai import OpenAI, UnprocessableEntityError

    from difusion.serve import ServeSettings, create_app
    from difusion.serve.models import load_models

    models = load_models([str(model_dir), "default"])
    with running(create_app(ServeSettings(), models)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        buf = io.BytesIO()
        picture().save(buf, "PNG")
        out = client.images.create_variation(
            image=("red.png", buf.getvalue(), "image/png"), model="model", n=2,
            response_format="b64_json", extra_body={"steps": 2, "seed": 5},
        )  # fmt: skip
        got = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
        assert [im.size for im in got] == [(SIZE, SIZE)] * 2
        expected = models["model"].pipe.variations(picture(), n=2, steps=2, seed=5)
        assert [a.convert("RGB").tobytes() for a in got] == [b.tobytes() for b in expected]
        with pytest.raises(UnprocessableEntityError, match="not an unCLIP model"):
            client.images.create_variation(image=("red.png", buf.getvalue(), "image/png"),
                                           model="default")  # fmt: skip
        text = client.images.generate(prompt=PROMPTS[0], model="model", extra_body={"steps": 2})
        assert len(text.data) == 1
