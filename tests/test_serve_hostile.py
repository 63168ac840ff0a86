"""`difusion serve` in front of clients that do not mean well: every fault found by trying
it as one answers a 4xx naming the field (never a 5xx or a reset connection), uploads are
decoded off the event loop, memory stays bounded, and the answers give nothing away."""

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image
from serve_util import running

from difusion.serve import ServeSettings, create_app
from difusion.serve.models import load_models

PROMPT = "a red circle above a blue square"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def models():
    return load_models(["default"])


@pytest.fixture(scope="module")
def app(models):
    return create_app(ServeSettings(), models)


@pytest.fixture(scope="module")
def url(app):
    with running(app) as base:
        yield base


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def refused(r: httpx.Response, field: str, status: int = 422) -> bool:
    return r.status_code == status and r.json()["detail"].startswith(f"{field}:")


@pytest.mark.parametrize(
    "size", ["３２x３２", "٣٢x٣٢", "3" * 5000 + "x32", "0x0", "0x32", "32x0", "-32x32", "32x 32"]
)
def test_sizes_that_are_not_ascii_wxh_or_have_a_zero_side_are_refused(url, size):
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT, "size": size})
    assert refused(r, "size"), r.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/images/generations", b'{"prompt": "a\\ud800"}', "prompt"),
        ("/v1/images/generations", b'{"prompt": "x", "negative_prompt": "\\udfff"}',
         "negative_prompt"),
        ("/sdapi/v1/txt2img", b'{"prompt": "x", "override_settings": {"k\\udc80": 1}}',
         "override_settings"),  # a key: the object that holds it
        ("/sdapi/v1/img2img", b'{"init_images": ["\\ud800"]}', "init_images.0"),
        ("/sdapi/v1/options", b'{"sd_vae": "\\ud800"}', "sd_vae"),
        ("/api/generate", b'{"prompt": "\\ud800 a red circle"}', "prompt"),
        ("/v1/images/generations", b'{"prompt": "a \xed\xa0\x80"}', "prompt"),  # raw bytes
    ],
)  # fmt: skip
def test_lone_surrogates_are_refused_naming_the_field(url, path, body, field):
    r = httpx.post(f"{url}{path}", content=body, headers=JSON)
    assert refused(r, field), r.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": ["default"]}},
         "override_settings.sd_model_checkpoint"),
        ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": {"a": 1}}},
         "override_settings.sd_model_checkpoint"),
        ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": 7}},
         "override_settings.sd_model_checkpoint"),
        ("/sdapi/v1/options", {"sd_model_checkpoint": {"a": 1}}, "sd_model_checkpoint"),
        ("/sdapi/v1/txt2img", {"sampler_name": ["Euler"]}, "sampler_name"),
        ("/sdapi/v1/txt2img", {"scheduler": "Wavy"}, "scheduler"),
        ("/sdapi/v1/img2img", {"init_images": ["a", "b"]}, "init_images"),
        ("/v1/images/generations", {"prompt": PROMPT, "strength": 0.5}, "strength"),
        ("/v1/images/generations", {"prompt": PROMPT, "model": ["default"]}, "model"),
    ],
)  # fmt: skip
def test_wrong_types_and_dropped_fields_are_refused(url, path, body, field):
    r = httpx.post(f"{url}{path}", json={"prompt": PROMPT, "steps": 2, **body})
    assert refused(r, field), r.text


def test_json_past_what_python_parses_is_a_4xx(url):
    for body in (b'{"prompt": ' + b"9" * 5000 + b"}", b"[" * 100_000):
        r = httpx.post(f"{url}/v1/images/generations", content=body, headers=JSON)
        assert refused(r, "body"), r.text


def test_bodies_past_the_limit_are_refused_before_they_are_read_whole(url):
    big = b'{"prompt": "' + b"a" * 2**21 + b'"}'  # 2 MiB: the JSON routes take 1 MiB
    r = httpx.post(f"{url}/v1/images/generations", content=big, headers=JSON)
    assert refused(r, "body", 413) and r.headers["connection"] == "close"

    def chunks():  # no Content-Length: counted as it comes
        for _ in range(40):
            yield b"a" * 2**16

    r = httpx.post(f"{url}/v1/images/generations", content=chunks(), headers=JSON)
    assert refused(r, "body", 413)
    files = {"image": ("a.png", b"\x89PNG" + b"\0" * (25 * 2**20), "image/png")}
    assert refused(httpx.post(f"{url}/v1/images/edits", files=files), "body", 413)


# --- uploads --------------------------------------------------------------------------------


def picture(mode: str, size=(32, 32)) -> Image.Image:
    image = Image.new("RGB", size)
    image.paste((230, 30, 30), (8, 8, 24, 24))
    return image.convert(mode)


@pytest.mark.parametrize(
    ("fmt", "mode"), [("TIFF", "LAB"), ("TIFF", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("PCX", "RGB"), ("ICO", "RGBA"), ("TGA", "RGB"), ("EPS", "RGB")],
)  # fmt: skip
def test_only_png_jpeg_and_webp_are_read(url, fmt, mode):
    files = {"image": ("a.png", encoded(picture("RGB")), "image/png"),
             "mask": ("m", encoded(picture(mode), fmt), "image/png")}  # fmt: skip
    r = httpx.post(f"{url}/v1/images/edits", files=files, data={"prompt": PROMPT, "steps": "2"})
    assert refused(r, "mask") and "not a PNG, JPEG or WebP" in r.text, r.text


@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "1"), ("PNG", "L"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "I;16"),
                      ("PNG", "RGBA"), ("JPEG", "CMYK"), ("JPEG", "L"),
                      ("WEBP", "RGBA")],
)  # fmt: skip
def test_every_mode_of_the_accepted_formats_is_an_image_and_a_mask(url, fmt, mode):
    files = {"image": ("a", encoded(picture(mode), fmt), "image/png"),
             "mask": ("m", encoded(picture(mode), fmt), "image/png")}  # fmt: skip
    r = httpx.post(f"{url}/v1/images/edits", files=files, data={"prompt": PROMPT, "steps": "2"})
    assert r.status_code == 200, r.text


def test_sixteen_bit_grey_is_scaled_not_clipped():
    from difusion.serve.codec import open_image

    grey = Image.new("I;16", (4, 4), 32768)  # half of 65535
    assert open_image(encoded(grey), "image").getpixel((0, 0)) == (127, 127, 127)


def test_a_second_image_is_refused_not_dropped(url):
    one = ("a.png", encoded(picture("RGB")), "image/png")
    for files in ([("image[]", one), ("image[]", one)], [("image", one), ("image[]", one)]):
        r = httpx.post(f"{url}/v1/images/edits", files=files, data={"prompt": PROMPT})
        assert r.status_code == 422 and "one image to edit, got 2" in r.text, r.text


def test_a_non_square_upload_is_centre_cropped(url, models):
    pipe = models["default"].pipe
    wide = Image.new("RGB", (96, 32), (30, 60, 230))
    wide.paste(picture("RGB"), (32, 0))  # the centre square is the usual start image
    body = {"prompt": "a blue square", "steps": "4", "seed": "3", "strength": "0.6"}
    r = httpx.post(f"{url}/v1/images/edits", files={"image": ("w.png", encoded(wide))}, data=body)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    want = pipe("a blue square", steps=4, seed=3, strength=0.6, image=picture("RGB"))[0]
    assert got.convert("RGB").tobytes() == want.tobytes()


def test_healthz_answers_while_uploads_are_being_decoded(app, url, monkeypatch):
    """Decoding runs in the codec pool: with every decode held open (an event the test
    releases), the loop still answers; a decode on the loop would hang it."""
    from difusion.serve import codec

    held, release, entered = threading.Semaphore(0), threading.Event(), []
    real = codec.open_image

    def slow_open(data, field):
        entered.append(field)
        held.release()
        release.wait(60)
        return real(data, field)

    monkeypatch.setattr(codec, "open_image", slow_open)
    one = encoded(picture("RGB"))
    results = []

    def edit() -> None:
        files = {"image": ("a.png", one), "mask": ("m.png", encoded(picture("L", (8, 8))))}
        results.append(httpx.post(f"{url}/v1/images/edits", files=files, data={"prompt": "x"}))

    clients = [threading.Thread(target=edit) for _ in range(4)]
    for c in clients:
        c.start()
    for _ in range(2):  # the pool's two threads are both inside a decode
        assert held.acquire(timeout=60)
    r = httpx.get(f"{url}/healthz", timeout=60)
    assert r.status_code == 200 and len(entered) == 2
    release.set()
    for c in clients:
        c.join()
    assert [x.status_code for x in results] == [422] * 4  # the mask is 8x8, the image 32x32


def test_healthz_stays_quick_while_large_uploads_are_decoded(url):
    """8 edits of a 4096x4096 PNG at once (their masks of another size: refused once both
    are decoded): /healthz within 200 ms, or, on a machine so loaded that one decode takes
    more than 0.8 s, within a quarter of one decode (a decode on the loop would hold
    /healthz for a whole decode, or several)."""
    from difusion.serve.codec import open_image

    big = encoded(Image.linear_gradient("L").resize((4096, 4096)).convert("RGB"))
    mask = encoded(Image.new("L", (4096, 4095)))
    start = time.monotonic()
    open_image(big, "image")
    decode = time.monotonic() - start
    uploaders = [httpx.Client(base_url=url, timeout=120) for _ in range(8)]  # made up front
    done, results, during = threading.Event(), [], []

    def edit(http: httpx.Client) -> None:
        files = {"image": ("a.png", big), "mask": ("m.png", mask)}
        results.append(http.post("/v1/images/edits", files=files, data={"prompt": "x"}))
        if len(results) == 8:
            done.set()

    clients = [threading.Thread(target=edit, args=(u,)) for u in uploaders]
    with httpx.Client(base_url=url) as http:
        http.get("/healthz")
        for c in clients:
            c.start()
        while not done.is_set():
            t = time.monotonic()
            assert http.get("/healthz").status_code == 200
            during.append(time.monotonic() - t)
            time.sleep(0.01)
    for c, u in zip(clients, uploaders, strict=True):
        c.join()
        u.close()
    assert all(refused(r, "mask") for r in results), results[0].text
    assert len(during) >= 3 and max(during) < max(0.2, decode / 4), (max(during), decode)
