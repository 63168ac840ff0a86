"""The server over every kind of model the project loads: a user's class-conditional latent
run, an unconditional pixel run, a Stable Diffusion folder, several at once."""

import base64
import io

import httpx
import pytest
from PIL import Image
from serve_util import running
from test_latent import tiny_unet, tiny_vae
from test_sd import build

from difusion import Pipeline
from difusion.data import DigitsDataset
from difusion.serve import ServeSettings, create_app
from difusion.serve.models import load_models
from difusion.train import TrainConfig, train
from difusion.vae_train import train_vae


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64.partition(",")[2] or b64))).convert("RGB")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    digits = DigitsDataset(size=16)
    vae = train_vae(tiny_vae(tmp, steps=2), dataset=digits, progress=False)
    latent = train(tiny_unet(tmp, vae, cond="label"), dataset=digits, progress=False)
    pixel = TrainConfig(
        out=str(tmp / "pixel"), size=8, steps=1, batch_size=2, channels=16, channel_mult=(1, 2),
        attention_resolutions=(4,), layers_per_block=1, head_dim=16,
    )  # fmt: skip
    unconditional = train(pixel, dataset=DigitsDataset(size=8), progress=False)
    build(tmp, v2=False)
    return {"latent": str(latent), "pixel": str(unconditional), "sd": str(tmp / "folder")}


@pytest.fixture(scope="module")
def url(runs):
    models = load_models([runs["latent"], runs["pixel"], runs["sd"]])
    with running(create_app(ServeSettings(), models)) as base:
        yield base, models


def test_models_are_listed_by_name_and_kind(url):
    base, models = url
    names = [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    assert names == ["ldm", "pixel", "folder"]
    info = {m["name"]: m for m in httpx.get(f"{base}/api/info").json()["models"]}
    assert info["ldm"]["kind"] == "label" and info["ldm"]["classes"][:3] == ["0", "1", "2"]
    assert info["ldm"]["sizes"] == ["16x16"]  # 8x8 latents decoded by a VAE of factor 2
    assert info["pixel"]["kind"] == "unconditional" and info["pixel"]["default_guidance"] == 1
    assert info["folder"]["kind"] == "text" and info["folder"]["sizes"] == ["32x32"]


def test_label_latent_model_draws_the_class_named_by_the_prompt(url, runs):
    base, _ = url
    body = {"model": "ldm", "prompt": "3", "n": 2, "steps": 3, "seed": 5, "guidance": 2.0}
    r = httpx.post(f"{base}/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    want = Pipeline.from_pretrained(runs["latent"])("3", n=2, steps=3, seed=5, guidance=2.0)
    got = [decode(d["b64_json"]) for d in r.json()["data"]]
    assert [a.tobytes() for a in got] == [b.convert("RGB").tobytes() for b in want]
    refused = httpx.post(f"{base}/v1/images/generations", json={**body, "prompt": "three"})
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("prompt: 'three' is not a class of this model")


def test_latent_previews_are_latent_sized_pictures(url):
    base, _ = url
    body = {"model": "ldm", "prompt": "7", "n": 2, "steps": 3, "seed": 0}
    with httpx.stream("POST", f"{base}/api/generate", json=body) as r:
        previews = [line for line in r.iter_lines() if line.startswith('data: {"step"')]
    assert len(previews) == 3
    first = decode(previews[0].split('"preview": "')[1].split('"')[0])
    assert first.size == (2 * 8, 8)  # two 8x8 latents, mapped to colour without the decoder


def test_unconditional_model_ignores_the_prompt(url, runs):
    base, _ = url
    body = {"model": "pixel", "prompt": "anything", "steps": 3, "seed": 1}
    r = httpx.post(f"{base}/v1/images/generations", json=body)
    assert r.status_code == 200 and r.json()["data"][0]["revised_prompt"] == ""
    want = Pipeline.from_pretrained(runs["pixel"])("", steps=3, seed=1)[0].convert("RGB")
    assert decode(r.json()["data"][0]["b64_json"]).tobytes() == want.tobytes()
    r = httpx.post(f"{base}/v1/images/generations", json={**body, "guidance": 3})
    assert r.status_code == 422 and r.json()["detail"].startswith("guidance: must be 1")


def test_stable_diffusion_folder_through_automatic1111(url, runs):
    base, models = url
    body = {"prompt": "a cat", "steps": 3, "seed": 2, "cfg_scale": 4.0, "width": 32,
            "height": 32, "override_settings": {"sd_model_checkpoint": "folder"}}  # fmt: skip
    r = httpx.post(f"{base}/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    want = models["folder"].pipe("a cat", steps=3, seed=2, guidance=4.0)[0]
    assert decode(r.json()["images"][0]).tobytes() == want.tobytes()
    r = httpx.post(f"{base}/sdapi/v1/txt2img", json={**body, "width": 512, "height": 512})
    assert r.status_code == 422 and "this model makes 32x32" in r.json()["detail"]
