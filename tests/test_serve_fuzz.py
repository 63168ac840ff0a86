"""A property-based fuzzer over every route of `difusion serve`: arbitrary Unicode (lone
surrogates included), arbitrary JSON types in every field, random bodies and uploads, sent
over one kept-alive loopback connection; no answer may be a 5xx, and the connection may
never be reset. A tiny 16x16 model with at most 4 steps keeps the generations quick."""

import io
import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serve_util import running
from test_pipeline import tiny_text_run

from difusion.serve import ServeSettings, create_app
from difusion.serve.models import load_models

EXAMPLES = 25  # per route: about 300 requests in all
text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates too
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


def field(plausible):
    """Mostly what a client means, sometimes anything JSON holds."""
    return st.one_of(plausible, json_values)


GENERATION = {
    "prompt": field(st.sampled_from(["a red circle", "a blue square", ""]) | text),
    "negative_prompt": field(text),
    "steps": field(st.integers(1, 4)),
    "guidance": field(st.floats(0.5, 12)),
    "sampler": field(st.sampled_from(["euler", "dpmpp_2m", "heun", "x"])),
    "seed": field(st.integers(-2, 2**64)),
    "n": field(st.integers(0, 3)),
    "size": field(st.sampled_from(["16x16", "auto", "0x16", "16x", "１６x16"]) | text),
    "model": field(st.sampled_from(["run", "nope"])),
    "strength": field(st.floats(0, 1.5)),
    "response_format": field(st.sampled_from(["b64_json", "url"])),
}
A1111 = {
    "prompt": GENERATION["prompt"],
    "steps": GENERATION["steps"],
    "cfg_scale": GENERATION["guidance"],
    "sampler_name": field(st.sampled_from(["Euler a", "DPM++ 2M Karras", "LMS", "zzz"])),
    "scheduler": field(st.sampled_from(["Karras", "Automatic", "Beta"])),
    "seed": GENERATION["seed"],
    "width": field(st.integers(0, 64)),
    "height": field(st.integers(0, 64)),
    "batch_size": field(st.integers(0, 3)),
    "n_iter": field(st.integers(0, 3)),
    "override_settings": field(
        st.fixed_dictionaries(
            {}, optional={"sd_model_checkpoint": field(st.sampled_from(["run", "x"]))}
        )
    ),  # fmt: skip
    "denoising_strength": GENERATION["strength"],
    "mask": field(st.just("")),
    "init_images": field(st.lists(st.sampled_from(["", "@@", "aGk="]), max_size=2)),
}


def images() -> st.SearchStrategy[bytes]:
    """Image files of every accepted format and mode, of any size up to 40 px; or junk."""

    def encode(mode, fmt, w, h) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (w, h)).save(buf, fmt)
        return buf.getvalue()

    made = st.builds(
        encode, st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]),
        st.just("PNG"), st.integers(1, 40), st.integers(1, 40),
    ) | st.builds(encode, st.sampled_from(["L", "RGB", "CMYK"]), st.just("JPEG"),
                  st.integers(1, 40), st.integers(1, 40))  # fmt: skip
    return (
        made
        | st.binary(max_size=64)
        | st.builds(
            encode, st.sampled_from(["RGB", "LAB"]), st.just("TIFF"), st.just(16), st.just(16)
        )
    )


def body(fields: dict) -> st.SearchStrategy:
    known = st.fixed_dictionaries({}, optional=fields)
    return known | st.builds(lambda a, b: {**a, **b}, known, st.dictionaries(text, json_values,
                                                                              max_size=2)) | json_values  # fmt: skip


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    run = tiny_text_run(tmp_path_factory.mktemp("fuzz"), "scratch", "run")  # 16x16, fast
    models = load_models([str(run)])
    models["run"].max_steps = 4  # a fuzzed request is refused past 4 steps: quick ones
    app = create_app(ServeSettings(queue_size=64, timeout=120), models)
    with running(app) as base, httpx.Client(base_url=base, timeout=120) as http:
        yield http


def check(http: httpx.Client, response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.url, response.text[:300])
    pool = http._transport._pool  # the one connection, still open (413 alone may close it)
    if response.status_code != 413:
        assert len(pool.connections) == 1 and not pool.connections[0].has_expired()


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))  # fmt: skip


def post_json(http: httpx.Client, path: str, value) -> httpx.Response:
    data = json.dumps(value).encode()  # lone surrogates go as \\udXXX escapes
    return http.post(path, content=data, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("path", "fields"),
    [("/v1/images/generations", GENERATION), ("/api/generate", GENERATION),
     ("/sdapi/v1/txt2img", A1111), ("/sdapi/v1/img2img", A1111),
     ("/sdapi/v1/options", {"sd_model_checkpoint": A1111["override_settings"],
                            "sd_vae": field(text), "CLIP_stop_at_last_layers": field(st.integers())})],
)  # fmt: skip
def test_json_routes_never_answer_5xx(client, path, fields):
    @SETTINGS
    @given(body(fields))
    def fuzz(value):
        check(client, post_json(client, path, value))

    fuzz()


def test_raw_bodies_never_answer_5xx(client):
    paths = st.sampled_from(["/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img",
                             "/sdapi/v1/options", "/api/generate"])  # fmt: skip
    types = st.sampled_from(["application/json", "multipart/form-data; boundary=x",
                             "text/plain", "application/x-www-form-urlencoded"])  # fmt: skip

    @SETTINGS
    @given(paths, types, st.binary(max_size=200))
    def fuzz(path, kind, data):
        check(client, client.post(path, content=data, headers={"content-type": kind}))

    fuzz()


def test_edits_never_answer_5xx(client):
    form = st.fixed_dictionaries({}, optional={
        k: st.text(max_size=12) | st.sampled_from(["1", "16x16", "0.5", "url", "run"])
        for k in ("prompt", "steps", "n", "size", "strength", "seed", "response_format", "model")
    })  # fmt: skip

    @SETTINGS
    @given(form, images(), st.none() | images(), st.booleans())
    def fuzz(data, image, mask, as_list):
        files = [("image[]" if as_list else "image", ("a.png", image, "image/png"))]
        if mask is not None:
            files.append(("mask", ("m.png", mask, "image/png")))
        check(client, client.post("/v1/images/edits", data=data, files=files))

    fuzz()


def test_get_routes_never_answer_5xx(client):
    paths = st.sampled_from(["/v1/models/{}", "/images/{}", "/sdapi/v1/progress?skip_current_image={}",
                             "/healthz?{}", "/api/info?{}", "/static/{}", "/{}", "/docs?{}"])  # fmt: skip

    @SETTINGS
    @given(paths, st.text(st.characters(exclude_categories=("Cs",)), max_size=20))
    def fuzz(path, part):
        url = path.format(quote(part, safe=""))
        check(client, client.get(url))

    fuzz()
