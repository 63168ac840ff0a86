"""`difusion serve` in front of clients that do not mean well: every fault found by trying
it as one answers a 4xx naming the field (never a 5xx or a reset connection), uploads are
decoded off the event loop, memory stays bounded, and the answers give nothing away."""

import base64
import io
import logging
import socket
import threading
import time

import httpx
import pytest
from PIL import Image
from serve_util import running

from difusion.serve import ServeSettings, create_app
from difusion.serve.models import load_models
from difusion.serve.server import ImageStore

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
    more than 0.8 s, within a quarter of one decode."""
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
    # 9 polls in 10 (a spike of the test's own threads aside; a decode on the loop would
    # hold most polls for a whole decode)
    p90 = sorted(during)[int(0.9 * len(during))]
    assert len(during) >= 10 and p90 < max(0.2, decode / 4), (p90, max(during), decode)


# --- faults no check foresaw ------------------------------------------------------------------


def test_an_unforeseen_fault_is_a_500_on_a_connection_that_survives(url, monkeypatch, caplog):
    import http.client

    from difusion.serve.server import Server

    def broken(self, name, field="model"):
        raise RuntimeError("a fault no check foresaw")

    monkeypatch.setattr(Server, "model", broken)
    caplog.set_level(logging.INFO, logger="difusion.serve")
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/images/generations", body=b'{"prompt": "x"}', headers=JSON)
    first = conn.getresponse()
    assert first.status == 500 and b"its log has why" in first.read()
    where = conn.sock.getsockname()
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200 and conn.sock.getsockname() == where  # kept alive
    conn.close()
    assert logged(caplog, "POST /v1/images/generations 500 ")


def logged(caplog, prefix: str) -> str:
    """The request's log line (written once its answer is sent: waited for)."""
    for _ in range(600):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line starts with {prefix!r}")


def test_a_stream_that_fails_after_its_start_ends_with_an_error_event(url, models, monkeypatch):
    def broken(g, on_step):
        on_step(1, 2, None)
        raise RuntimeError("a fault no check foresaw")

    monkeypatch.setattr(models["default"], "generate", broken)
    monkeypatch.setattr(models["default"], "preview", lambda x0: Image.new("RGB", (1, 1)))
    with httpx.stream("POST", f"{url}/api/generate", json={"prompt": PROMPT, "steps": 2}) as r:
        events = [line for line in r.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "event: error" and "event: start" in events


def test_a_newline_in_the_path_cannot_forge_a_log_line(url, caplog):
    caplog.set_level(logging.INFO, logger="difusion.serve")
    httpx.get(f"{url}/x%0a2026-01-01 GET /admin 200 0.001s")
    line = logged(caplog, "GET /x")
    assert "\n" not in line and line.startswith("GET /x%0A2026-01-01%20GET%20/admin%20200%20")
    assert " 404 " in line


# --- what the answers give away -----------------------------------------------------------


def test_links_use_the_address_connected_to_not_the_host_header(url):
    body = {"prompt": PROMPT, "steps": 2, "response_format": "url"}
    r = httpx.post(f"{url}/v1/images/generations", json=body, headers={"Host": "evil.example"})
    link = r.json()["data"][0]["url"]
    assert link.startswith(f"{url}/images/") and httpx.get(link).status_code == 200


def test_public_url_setting_makes_the_links(models):
    settings = ServeSettings(public_url="https://images.example.org/")
    with running(create_app(settings, models)) as base:
        body = {"prompt": PROMPT, "steps": 2, "response_format": "url"}
        link = httpx.post(f"{base}/v1/images/generations", json=body).json()["data"][0]["url"]
        assert link.startswith("https://images.example.org/images/")


def test_head_security_headers_and_a_docs_page_with_nothing_from_elsewhere(url):
    for path in ("/", "/healthz"):
        assert httpx.head(f"{url}{path}").status_code == 200
    for r in (httpx.get(f"{url}/"), httpx.post(f"{url}/v1/images/generations", json={})):
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200 and "/v1/images/generations" in docs.text
    assert "<script" not in docs.text and "cdn" not in docs.text
    assert httpx.get(f"{url}/redoc").status_code == 404


def test_a_non_ascii_key_through_bearer_and_basic_and_a_healthz_that_says_only_ok(models):
    key = "clé-ключ-鍵"
    with running(create_app(ServeSettings(api_key=key), models)) as base:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{base}/healthz", headers={"Authorization": b"Bearer nope"}).json() == {
            "status": "ok"
        }
        bearer = {"Authorization": b"Bearer " + key.encode()}
        assert httpx.get(f"{base}/v1/models", headers=bearer).status_code == 200
        assert httpx.get(f"{base}/healthz", headers=bearer).json()["jobs"] == {"default": 0}
        assert httpx.get(f"{base}/v1/models", auth=("u", key)).status_code == 200
        wrong = {"Authorization": b"Bearer " + key[:-1].encode()}
        assert httpx.get(f"{base}/v1/models", headers=wrong).status_code == 401


def test_kept_images_are_capped_by_bytes_and_expired_ones_dropped():
    store = ImageStore(max_bytes=250, ttl=3600)
    names = [store.put(bytes(100), "png") for _ in range(3)]
    assert store.get(names[0]) is None and store.get(names[2]) == (bytes(100), "png")
    assert store.bytes == 200 and len(store.items) == 2
    expired = ImageStore(max_bytes=10**6, ttl=-1)  # every item is past its time at once
    name = expired.put(bytes(100), "png")
    assert expired.get(name) is None and expired.bytes == 0 and not expired.items


def test_keep_alive_survives_every_refusal(url):
    """A refusal of any kind answers on the same connection (the body limit's 413 alone
    closes it: the rest of the body is never read)."""
    with httpx.Client(base_url=url) as http:
        for body in ({"prompt": PROMPT, "size": "٣x٣"}, {"prompt": 5}, ["x"]):
            assert http.post("/v1/images/generations", json=body).status_code == 422
        assert http.post("/v1/images/generations", content=b"\xff", headers=JSON).status_code == 422
        assert http.get("/images/none.png").status_code == 404
        pool = http._transport._pool
        assert len(pool.connections) == 1 and pool.connections[0].is_idle()


# --- a quick stop ----------------------------------------------------------------------------


def start_server(log_path) -> tuple:
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "difusion.cli", "serve", "--port", str(port),
             "--device", "cpu", "--queue-size", "2"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def wait_up(process, base: str) -> None:
    for _ in range(1200):
        assert process.poll() is None, "the server ended"
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError("the server did not start")


def test_sigterm_cancels_running_and_queued_jobs_and_exits_at_once(tmp_path):
    """SIGTERM during a 1000-step generation, with one more queued: the stream's client gets
    an error event of 503, the queued one a 503, and the process ends about as soon as one
    stopped with nothing to do (measured beside it), plus a few steps."""
    import signal

    idle, idle_base = start_server(tmp_path / "idle.log")
    busy, base = start_server(tmp_path / "busy.log")
    try:
        wait_up(idle, idle_base)
        wait_up(busy, base)
        start = time.monotonic()
        idle.send_signal(signal.SIGTERM)
        idle.wait(60)
        idle_stop = time.monotonic() - start

        long = {"prompt": PROMPT, "steps": 1000, "n": 8}
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(
            httpx.post(f"{base}/v1/images/generations", json=long, timeout=120)))  # fmt: skip
        with httpx.stream("POST", f"{base}/api/generate", json=long, timeout=120) as stream:
            lines = stream.iter_lines()
            stamps = []
            for line in lines:
                if line.startswith('data: {"step"'):
                    stamps.append(time.monotonic())
                    if len(stamps) == 3:
                        break
            step = max(stamps[2] - stamps[1], stamps[1] - stamps[0])
            waiter.start()
            while httpx.get(f"{base}/healthz").json()["jobs"]["default"] < 2:
                time.sleep(0.05)
            start = time.monotonic()
            busy.send_signal(signal.SIGTERM)
            rest = list(lines)
        busy.wait(60)
        stop = time.monotonic() - start
        waiter.join(60)
    finally:
        for p in (idle, busy):
            p.kill() if p.poll() is None else None
    error = [line for line in rest if line.startswith("data: ")][-1]
    assert rest[-3] == "event: error" or "event: error" in rest, rest[-5:]
    assert '"status": 503' in error and "shutting down" in error
    assert queued[0].status_code == 503, queued[0].text
    assert stop < 2 * idle_stop + 10 * step, (stop, idle_stop, step)
