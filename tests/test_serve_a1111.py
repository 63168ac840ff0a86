"""AUTOMATIC1111's habits that its clients depend on: /interrupt during `webuiapi`'s own
txt2img gives the image as far as it got, and every sampler name the web UI has listed is
served by the nearest of ours (Karras sigmas included) and reported, or refused naming it."""

import base64
import io
import json
import threading

import httpx
import pytest
from PIL import Image
from serve_util import running

from difusion.images import to_pil
from difusion.serve import ServeSettings, create_app
from difusion.serve.a1111_samplers import SAMPLER_NAMES
from difusion.serve.models import load_models

PROMPT = "a red circle above a blue square"
# every sampler AUTOMATIC1111 has listed: k-diffusion's (1.0-1.5 with " Karras" variants,
# 1.6-1.10 with a separate scheduler), the timestep samplers, LCM
A1111_NAMES = [
    "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
    "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast", "DPM adaptive",
    "LMS Karras", "DPM2 Karras", "DPM2 a Karras", "DPM++ 2S a Karras", "DPM++ 2M Karras",
    "DPM++ SDE Karras", "DPM++ 2M SDE Karras", "DPM++ 2M SDE Exponential",
    "DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun Exponential", "DPM++ 3M SDE Karras",
    "DPM++ 3M SDE Exponential", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM",
    "k_euler_a", "k_dpmpp_2m",
]  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return load_models(["default"])


@pytest.fixture(scope="module")
def url(models):
    with running(create_app(ServeSettings(), models)) as base:
        yield base


def txt2img(url: str, **body) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 3, "seed": 1, "width": 32, "height": 32, **body}
    return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)


@pytest.mark.parametrize("name", A1111_NAMES)
def test_every_automatic1111_sampler_is_served_and_what_ran_is_reported(url, name):
    r = txt2img(url, sampler_name=name)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == name and f"Sampler: {name}," in info["infotexts"][0]
    ran = info["sampler_used"].split(" ")[0].rstrip(",")
    assert ran in {ours for ours, _, _ in SAMPLER_NAMES.values()}
    assert ("karras sigmas" in info["sampler_used"]) == name.endswith(("Karras", "Exponential"))


def test_names_in_any_case_and_karras_sigmas_give_the_pipelines_pixels(url, models):
    pipe = models["default"].pipe
    upper = txt2img(url, sampler_name="EULER A").json()["images"][0]
    assert upper == txt2img(url, sampler_name="euler a").json()["images"][0]
    r = txt2img(url, sampler_name="DPM++ 2M Karras")
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    want = pipe(PROMPT, steps=3, seed=1, sampler="dpmpp_2m", spacing="karras")[0]
    assert got.convert("RGB").tobytes() == want.tobytes()
    plain = pipe(PROMPT, steps=3, seed=1, sampler="dpmpp_2m")[0]
    assert plain.tobytes() != want.tobytes()  # Karras's sigmas are not the model's own
    # the 1.9 way: the sampler and a scheduler apart
    apart = txt2img(url, sampler_name="DPM++ 2M", scheduler="Karras").json()["images"][0]
    assert apart == r.json()["images"][0]


def test_an_unknown_sampler_is_refused_in_the_clients_words(url):
    r = txt2img(url, sampler_name="Euler Zeta")
    detail = r.json()["detail"]
    assert r.status_code == 422 and detail.startswith("sampler_name: unknown sampler 'Euler Zeta'")
    assert "DPM++ 2M, Euler a" in detail and "dpmpp_2m" not in detail


def test_samplers_route_lists_every_name_with_what_it_runs(url):
    listed = {s["name"]: s for s in httpx.get(f"{url}/sdapi/v1/samplers").json()}
    assert set(listed) == set(SAMPLER_NAMES)
    assert listed["LMS"]["options"]["runs"] == "dpmpp_2m" and "k_lms" in listed["LMS"]["aliases"]


def test_webuiapi_interrupt_during_its_txt2img_returns_the_image_so_far(url, models):
    import webuiapi

    pipe = models["default"].pipe
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=1000)
    out = {}
    call = threading.Thread(target=lambda: out.update(result=api.txt2img(
        prompt=PROMPT, seed=5, cfg_scale=2.0, width=32, height=32)))  # fmt: skip
    call.start()
    while api.get_progress()["state"]["sampling_step"] < 2:
        assert call.is_alive()
    api.interrupt()
    call.join(120)
    result = out["result"]  # webuiapi raises on anything but 200
    done = result.info["steps_done"]
    assert result.info["interrupted"] and 2 <= done < 1000

    class Enough(Exception):
        pass

    seen = {}

    def stop_at(i, sigma, x0):  # the pipeline's own x0 estimate at the same step
        if i + 1 == done:
            seen["x0"] = x0.clone()
            raise Enough

    with pytest.raises(Enough):
        pipe.sample(PROMPT, steps=1000, seed=5, guidance=2.0, sampler="euler", callback=stop_at)
    want = to_pil(pipe.decode(seen["x0"]).clamp(-1, 1))[0]
    assert result.image.convert("RGB").tobytes() == want.tobytes()
