"""`difusion serve` as its clients see it: the official `openai` client, the `webuiapi`
client of AUTOMATIC1111's API, the stream of step previews, refusals, the key, the queue."""

import base64
import io
import itertools
import json
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from serve_util import running

from difusion import sizes
from difusion.serve import ServeSettings, create_app
from difusion.serve.models import load_models

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def models():
    return load_models(["default"])


@pytest.fixture(scope="module")
def pipe(models):
    return models["default"].pipe


@pytest.fixture(scope="module")
def url(models):
    with running(create_app(ServeSettings(), models)) as base:
        yield base


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64.partition(",")[2] or b64))).convert("RGB")


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def start_image() -> tuple[Image.Image, Image.Image]:
    """A red square on black, and a mask of its left half (white = redraw)."""
    image = Image.new("RGB", (32, 32))
    image.paste((230, 30, 30), (8, 8, 24, 24))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    return image, mask


# --- OpenAI ---------------------------------------------------------------------------------


def test_openai_client_generations_edits_and_models(url, pipe):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    options = {"steps": 4, "seed": 7, "guidance": 3.0, "negative_prompt": "a green square"}
    out = client.images.generate(
        prompt=PROMPT, model="default", n=2, size="32x32", response_format="b64_json",
        extra_body=options,
    )  # fmt: skip
    expected = pipe(PROMPT, n=2, steps=4, seed=7, guidance=3.0, negative_prompt="a green square")
    got = [decode(d.b64_json) for d in out.data]
    assert [same(a, b) for a, b in zip(got, expected, strict=True)] == [True, True]
    assert out.data[0].revised_prompt == PROMPT

    by_url = client.images.generate(prompt=PROMPT, n=2, response_format="url", extra_body=options)
    fetched = httpx.get(by_url.data[0].url)
    assert fetched.headers["content-type"] == "image/png"
    assert same(Image.open(io.BytesIO(fetched.content)).convert("RGB"), expected[0])

    image, mask = start_image()
    inpainted = client.images.edit(
        image=("in.png", png(image), "image/png"), mask=("mask.png", png(mask), "image/png"),
        prompt="a blue square", response_format="b64_json", extra_body={"steps": 4, "seed": 1},
    )  # fmt: skip
    want = pipe("a blue square", steps=4, seed=1, image=image, mask_image=mask)[0]
    assert same(decode(inpainted.data[0].b64_json), want)
    # the kept (black-masked) right half is the start image, untouched
    got = decode(inpainted.data[0].b64_json)
    assert got.crop((17, 0, 32, 32)).tobytes() == image.crop((17, 0, 32, 32)).tobytes()

    img2img = client.images.edit(
        image=("in.png", png(image), "image/png"), prompt="a blue square",
        extra_body={"steps": 8, "seed": 1, "strength": 0.5},
    )  # fmt: skip
    want = pipe("a blue square", steps=8, seed=1, image=image, strength=0.5)[0]
    assert same(decode(img2img.data[0].b64_json), want)

    assert [m.id for m in client.models.list()] == ["default"]


def test_openai_transparent_pixels_are_the_mask(url, pipe):
    """OpenAI's convention: without a mask, the image's transparent pixels are redrawn."""
    image, mask = start_image()
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))
    r = httpx.post(
        f"{url}/v1/images/edits",
        files={"image": ("in.png", png(rgba), "image/png")},
        data={"prompt": "a blue square", "steps": "4", "seed": "2"},
    )
    assert r.status_code == 200, r.text
    want = pipe("a blue square", steps=4, seed=2, image=image, mask_image=mask)[0]
    assert same(decode(r.json()["data"][0]["b64_json"]), want)


# --- AUTOMATIC1111 --------------------------------------------------------------------------


def test_webuiapi_client(url, pipe):
    import webuiapi

    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="DPM++ 2M", steps=5)
    out = api.txt2img(prompt=PROMPT, seed=3, cfg_scale=2.5, width=32, height=32, batch_size=2)
    expected = pipe(PROMPT, n=2, steps=5, seed=3, guidance=2.5)
    assert [same(a.convert("RGB"), b) for a, b in zip(out.images, expected, strict=True)] == [
        True,
        True,
    ]
    assert out.info["seed"] == 3 and out.info["sd_model_name"] == "default"
    assert "Steps: 5" in out.info["infotexts"][0]

    image, mask = start_image()
    out = api.img2img(
        images=[image], mask_image=mask, prompt="a blue square", seed=4, cfg_scale=2.0,
        width=32, height=32, denoising_strength=1.0,
    )  # fmt: skip
    want = pipe("a blue square", steps=5, seed=4, image=image, mask_image=mask, strength=1.0)
    assert same(out.image.convert("RGB"), want[0])

    assert api.util_get_model_names() == ["default"]
    api.util_set_model("default")
    assert api.util_get_current_model() == "default"
    assert "DPM++ 2M" in [s["name"] for s in api.get_samplers()]
    assert api.get_progress()["state"]["job_count"] == 0


def test_a1111_options_choose_among_served_models(url):
    r = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "sd-xl"})
    assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["detail"]
    assert "default" in r.json()["detail"]
    r = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": [], "x": 1})
    assert r.status_code == 422 and r.json()["detail"].startswith("sd_model_checkpoint:")
    # known options are kept, checked; others ignored (as the web UI ignores them)
    options = {"sd_model_checkpoint": "default", "x": 1, "CLIP_stop_at_last_layers": 2}
    assert httpx.post(f"{url}/sdapi/v1/options", json=options).status_code == 200
    kept = httpx.get(f"{url}/sdapi/v1/options").json()
    assert "x" not in kept and kept["CLIP_stop_at_last_layers"] == 2
    r = httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": "v" * 201})
    assert r.status_code == 422 and r.json()["detail"].startswith("sd_vae:")
    # a body past the route's limit is refused before it is parsed, and nothing is kept
    r = httpx.post(f"{url}/sdapi/v1/options", json={"sd_vae": "v" * 2**17})
    assert r.status_code == 413 and r.json()["detail"].startswith("body:")


# --- the stream -----------------------------------------------------------------------------


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, event = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            events.append((event, json.loads(line[6:])))
    return events


def test_stream_previews_in_order_then_images_equal_to_pipeline(url, pipe):
    body = {"prompt": PROMPT, "steps": 6, "seed": 11, "n": 3, "guidance": 2.0}
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
    names = [e for e, _ in events]
    assert names == ["queued", "start"] + ["progress"] * 6 + ["done"]
    progress = [d for e, d in events if e == "progress"]
    assert [d["step"] for d in progress] == [1, 2, 3, 4, 5, 6]
    assert all(d["total"] == 6 for d in progress)
    previews = [decode(d["preview"]) for d in progress]
    assert previews[0].size == (3 * 32, 32)  # the batch side by side, at the model's size
    assert len({p.tobytes() for p in previews}) >= 3  # the picture changes as noise goes
    done = events[-1][1]
    expected = pipe(PROMPT, n=3, steps=6, seed=11, guidance=2.0)
    got = [decode(im) for im in done["images"]]
    assert [same(a, b) for a, b in zip(got, expected, strict=True)] == [True] * 3
    # the last preview is the last x0 estimate: the final images side by side
    assert same(previews[-1].crop((0, 0, 32, 32)), expected[0])
    assert done["parameters"]["seed"] == 11 and events[1][1]["seed"] == 11


def test_random_seed_is_reported_and_reproduces(url, pipe):
    with httpx.stream("POST", f"{url}/api/generate", json={"prompt": PROMPT, "steps": 3}) as r:
        events = read_events(r)
    seed = events[-1][1]["parameters"]["seed"]
    assert same(decode(events[-1][1]["images"][0]), pipe(PROMPT, steps=3, seed=seed)[0])


# --- refusals -------------------------------------------------------------------------------

GENERATIONS = "/v1/images/generations"
TXT2IMG = "/sdapi/v1/txt2img"
STREAM = "/api/generate"
BAD_JSON = [
    (GENERATIONS, {"prompt": ""}, "prompt"),
    (GENERATIONS, {"prompt": "   "}, "prompt"),
    (GENERATIONS, {"prompt": "a red circle " * 100}, "prompt"),
    (GENERATIONS, {}, "prompt"),
    (GENERATIONS, {"prompt": "x", "steps": 0}, "steps"),
    (GENERATIONS, {"prompt": "x", "steps": 1001}, "steps"),
    (GENERATIONS, {"prompt": "x", "sampler": "plms"}, "sampler"),
    (GENERATIONS, {"prompt": "x", "size": "512x512"}, "size"),
    (GENERATIONS, {"prompt": "x", "size": "big"}, "size"),
    (GENERATIONS, {"prompt": "x", "n": 0}, "n"),
    (GENERATIONS, {"prompt": "x", "n": 9}, "n"),
    (GENERATIONS, {"prompt": "x", "guidance": 0}, "guidance"),
    (GENERATIONS, {"prompt": "x", "guidance": -5}, "guidance"),
    (GENERATIONS, {"prompt": "x", "guidance": 31}, "guidance"),
    (GENERATIONS, {"prompt": "x", "guidance": "nan"}, "guidance"),
    (GENERATIONS, {"prompt": "x", "guidance": "inf"}, "guidance"),
    (GENERATIONS, {"prompt": "x", "seed": -2}, "seed"),
    (GENERATIONS, {"prompt": "x", "model": "dall-e-3"}, "model"),
    (GENERATIONS, {"prompt": 5}, "prompt"),
    (GENERATIONS, {"prompt": "x", "steps": "many"}, "steps"),
    (GENERATIONS, {"prompt": "x", "n": [1]}, "n"),
    (GENERATIONS, {"prompt": "x", "steps": True}, "steps"),
    (GENERATIONS, {"prompt": "x", "seed": 1.5}, "seed"),
    (GENERATIONS, {"prompt": ["x"]}, "prompt"),
    (GENERATIONS, {"prompt": "x", "response_format": "gif"}, "response_format"),
    (GENERATIONS, ["a red circle"], "body"),
    (TXT2IMG, {"prompt": "x", "cfg_scale": 0}, "cfg_scale"),
    (TXT2IMG, {"prompt": "x", "width": 512, "height": 512}, "width"),
    (TXT2IMG, {"prompt": "x", "sampler_name": "PLMS++ 9Z"}, "sampler_name"),
    (TXT2IMG, {"prompt": "x", "batch_size": 9}, "batch_size"),
    (TXT2IMG, {"prompt": "x", "batch_size": 3, "n_iter": 3}, "n_iter"),
    (TXT2IMG, {"prompt": "x", "enable_hr": True}, "enable_hr"),
    (TXT2IMG, {"prompt": "x", "steps": -1}, "steps"),
    (STREAM, {"prompt": "x", "steps": 5000}, "steps"),
    (STREAM, {"prompt": "x", "colour": "red"}, "colour"),
    (STREAM, {"prompt": "x", "strength": 0.5}, "strength"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_JSON)
def test_bad_input_is_a_4xx_naming_the_field(url, path, body, field):
    r = httpx.post(f"{url}{path}", json=body)
    assert 400 <= r.status_code < 500, r.text
    detail, param = r.json()["detail"], r.json()["error"]["param"]
    assert f"{field}:" in detail and detail.startswith(f"{param}:"), detail


def test_bad_json_and_wrong_content_are_4xx(url):
    for content in (b"{bad json", b"", b"\xff\xfe"):
        r = httpx.post(
            f"{url}{GENERATIONS}", content=content, headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and r.json()["detail"].startswith("body:"), r.text
    r = httpx.post(f"{url}{GENERATIONS}", content=b"prompt=x")
    assert r.status_code == 422


# --- sizes: the pipeline's one rule -------------------------------------------------------


def pipeline_refusal(pipe, width: int, height: int, n: int = 1) -> str | None:
    try:
        pipe.check_size(height, width, n)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("size", ["32x32", "64x64", "16x16", "32x64", "256x256", "512x512"])
def test_server_and_pipeline_take_and_refuse_the_same_sizes(url, pipe, size):
    width, height = map(int, size.split("x"))
    refusal = pipeline_refusal(pipe, width, height)
    assert (refusal is None) == (size == "32x32")  # the shipped model makes its own size only
    by_openai = httpx.post(f"{url}{GENERATIONS}", json={"prompt": PROMPT, "size": size, "steps": 1})
    by_a1111 = httpx.post(
        f"{url}{TXT2IMG}", json={"prompt": PROMPT, "width": width, "height": height, "steps": 1}
    )
    if refusal is None:
        assert (by_openai.status_code, by_a1111.status_code) == (200, 200), by_openai.text
    else:
        assert by_openai.status_code == by_a1111.status_code == 422
        assert by_openai.json()["detail"] == f"size: {refusal}"
        assert by_a1111.json()["detail"] == f"width: {refusal}"


def test_offered_sizes_are_the_pipelines(url, pipe):
    (info,) = httpx.get(f"{url}/api/info").json()["models"]
    assert info["sizes"] == pipe.sizes() == ["32x32"] and info["default_size"] == "32x32"


def test_a_request_past_the_free_memory_is_a_422_with_the_pipelines_message(url, pipe, monkeypatch):
    monkeypatch.setattr(sizes, "available_memory", lambda device: 2**23)  # 8 MiB free
    refusal = pipeline_refusal(pipe, 32, 32, n=8)
    assert refusal is not None and "8 image(s) of 32x32 needs at least" in refusal
    assert pipeline_refusal(pipe, 32, 32, n=1) is None  # one image fits in 8 MiB, eight do not
    r = httpx.post(f"{url}{GENERATIONS}", json={"prompt": PROMPT, "n": 8, "steps": 1})
    assert r.status_code == 422 and r.json()["detail"] == f"size: {refusal}", r.text
    r = httpx.post(f"{url}{TXT2IMG}", json={"prompt": PROMPT, "batch_size": 8, "steps": 1})
    assert r.status_code == 422 and r.json()["detail"] == f"width: {refusal}", r.text


def upload_cases():
    image, mask = start_image()
    big = b"\x89PNG" + b"\0" * (10 * 2**20 + 10)
    return [
        ({"image": ("a.png", b"not an image", "image/png")}, "image", 422),
        ({"image": ("a.png", big, "image/png")}, "image", 413),
        (
            {
                "image": ("a.png", png(image), "image/png"),
                "mask": ("m.png", png(mask.resize((16, 16))), "image/png"),
            },
            "mask",
            422,
        ),  # fmt: skip
        (
            {
                "image": ("a.png", png(image), "image/png"),
                "mask": ("m.png", b"GIF89a junk", "image/gif"),
            },
            "mask",
            422,
        ),  # fmt: skip
        ({"image": ("a.png", png(Image.new("L", (20000, 20000))), "image/png")}, "image", 413),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_uploads(url, case):
    files, field, status = upload_cases()[case]
    r = httpx.post(f"{url}/v1/images/edits", files=files, data={"prompt": "x", "steps": "2"})
    assert r.status_code == status and r.json()["detail"].startswith(f"{field}:"), r.text


def test_bad_base64_uploads(url):
    image, mask = start_image()
    good = base64.b64encode(png(image)).decode()
    for body, field in [
        ({"init_images": ["@@@"]}, "init_images"),
        ({"init_images": [base64.b64encode(b"text").decode()]}, "init_images"),
        ({"init_images": []}, "init_images"),
        ({"init_images": [good], "mask": base64.b64encode(png(mask.crop((0, 0, 8, 8)))).decode()},
         "mask"),
        ({"init_images": [good], "denoising_strength": 1.5}, "denoising_strength"),
        ({"init_images": [good], "denoising_strength": 0.01}, "denoising_strength"),
    ]:  # fmt: skip
        body = {"prompt": "x", "steps": 4, "width": 32, "height": 32, **body}
        r = httpx.post(f"{url}/sdapi/v1/img2img", json=body)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"{field}:"), r.text


# --- the two faults of Pipeline itself ------------------------------------------------------


def test_prompt_past_the_window_is_cut_with_a_warning(pipe):
    long = "a red circle " + "and " * 28
    assert pipe.truncated(long) and not pipe.truncated("a red circle")
    with pytest.warns(UserWarning, match="cut to the text encoder's 32 tokens"):
        cut = pipe.sample(long, steps=2)
    # what the encoder sees is the first 32 tokens: the same as a prompt cut there by hand
    ids = pipe.model.text_encoder.tokenizer(long, truncation=True, max_length=32)["input_ids"]
    by_hand = pipe.model.text_encoder.tokenizer.decode(ids, skip_special_tokens=True)
    assert torch.equal(cut, pipe.sample(by_hand, steps=2))


@pytest.mark.parametrize("guidance", ["nan", "inf", "-inf", "0", "-5", "0.5", "31"])
def test_generate_cli_refuses_bad_guidance(monkeypatch, capsys, tmp_path, guidance):
    import sys

    from difusion.cli import main

    out = tmp_path / "g.png"
    argv = ["difusion", "generate", "a red circle", "--guidance", guidance, "-o", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count("\n") == 1 and "guidance" in err
    assert not out.exists()


# --- the key --------------------------------------------------------------------------------


def test_api_key(models):
    with running(create_app(ServeSettings(api_key="sekrit"), models)) as base:
        body = {"prompt": PROMPT, "steps": 2}
        assert httpx.post(f"{base}{GENERATIONS}", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        r = httpx.post(f"{base}{GENERATIONS}", json=body, headers=wrong)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        right = {"Authorization": "Bearer sekrit"}
        assert httpx.post(f"{base}{GENERATIONS}", json=body, headers=right).status_code == 200
        for path in ("/v1/models", "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/api/info"):
            assert httpx.get(f"{base}{path}").status_code == 401
            assert httpx.get(f"{base}{path}", headers=right).status_code == 200
        # AUTOMATIC1111's clients send HTTP Basic: the key is the password
        assert httpx.get(f"{base}/sdapi/v1/options", auth=("any", "sekrit")).status_code == 200
        assert httpx.get(f"{base}/sdapi/v1/options", auth=("any", "nope")).status_code == 401
        # the page, its files and the health check need no key; the page sends it
        for path in ("/", "/static/app.js", "/healthz"):
            assert httpx.get(f"{base}{path}").status_code == 200


# --- the queue ------------------------------------------------------------------------------


def wait_until(condition, seconds: float = 60.0) -> bool:
    """Polls `condition` until it holds; `seconds` only ends a test that would hang (bounds
    on time are asserted relative to a measured step)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def step_seconds(lines, count: int = 3) -> float:
    """The longest time between `count` progress events of a running stream: one step."""
    stamps = []
    for line in lines:
        if line.startswith('data: {"step"'):
            stamps.append(time.monotonic())
            if len(stamps) > count:
                break
    return max(b - a for a, b in itertools.pairwise(stamps))


def test_queue_full_is_429_and_a_client_that_leaves_cancels_its_job(models):
    from difusion.serve.jobs import POLL_SECONDS

    settings = ServeSettings(concurrency=1, queue_size=1)
    with running(create_app(settings, models)) as base:
        jobs = lambda: httpx.get(f"{base}/healthz").json()["jobs"]["default"]  # noqa: E731
        long = {"prompt": PROMPT, "steps": 1000, "n": 8}  # minutes on 2 cores
        with httpx.Client(timeout=60).stream("POST", f"{base}{STREAM}", json=long) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            step = step_seconds(lines)  # it runs

            left = threading.Event()

            def waiting_client() -> None:  # waits in the queue, then leaves (read timeout)
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(f"{base}{GENERATIONS}", json=long, timeout=1.5)
                left.set()

            waiter = threading.Thread(target=waiting_client)
            waiter.start()
            assert wait_until(lambda: jobs() == 2)
            full = httpx.post(f"{base}{GENERATIONS}", json={"prompt": PROMPT, "steps": 2})
            assert full.status_code == 429 and "queue is full" in full.json()["detail"]
            # the running job's pace so far: its remaining ~1000 steps, not one second
            assert int(full.headers["retry-after"]) >= min(300, 500 * step)
            waiter.join()
            assert left.is_set() and wait_until(lambda: jobs() == 1)  # the waiter's job is gone
        closed = time.monotonic()  # the streaming client leaves: its job stops at a step
        assert wait_until(lambda: jobs() == 0)
        assert time.monotonic() - closed < POLL_SECONDS + 20 * step
        quick = httpx.post(f"{base}{GENERATIONS}", json={"prompt": PROMPT, "steps": 2})
        assert quick.status_code == 200


def test_disconnect_cancels_a_running_job(models):
    from difusion.serve.jobs import POLL_SECONDS

    with running(create_app(ServeSettings(), models)) as base:
        long = {"prompt": PROMPT, "steps": 1000, "n": 8}
        with httpx.stream("POST", f"{base}{STREAM}", json=long, timeout=60) as r:
            step = step_seconds(r.iter_lines())  # the pace of this job on this machine
        busy = lambda: httpx.get(f"{base}/healthz").json()["jobs"]["default"]  # noqa: E731
        assert wait_until(lambda: busy() == 0)
        start = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/sdapi/v1/txt2img", json={**long, "batch_size": 8}, timeout=1.0)
        assert wait_until(lambda: busy() == 0)
        # the poll that notices, then a step or a few: not the 1000 steps of the job
        assert time.monotonic() - start < 1.0 + POLL_SECONDS + 20 * step < 1000 * step


def test_timeout_cancels_with_a_clear_error(models):
    with running(create_app(ServeSettings(timeout=0.5), models)) as base:
        long = {"prompt": PROMPT, "steps": 1000, "n": 8}
        r = httpx.post(f"{base}{GENERATIONS}", json=long, timeout=120)  # one step may be slow
        assert r.status_code == 504 and "limit of 0.5 s" in r.json()["detail"], r.text
        with httpx.stream("POST", f"{base}{STREAM}", json=long, timeout=120) as s:
            events = read_events(s)
        assert events[-1][0] == "error" and events[-1][1]["status"] == 504


# --- the command ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "--port must be from 1 to 65535"),
        (["--model", "/no/such/run"], "/no/such/run: no such checkpoint"),
        (["--api-key", " "], "--api-key is empty"),
        (["--queue-size", "-1"], "'--queue-size': must be 0 or more"),  # a usage error
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
    ],
)
def test_serve_cli_refusals(monkeypatch, capsys, args, message):
    import socket
    import sys

    from difusion.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        args = [a.replace("{busy}", port) for a in args]
        monkeypatch.setattr(sys, "argv", ["difusion", "serve", *args])
        with pytest.raises(SystemExit) as e:
            main()
    err = capsys.readouterr().err
    assert e.value.code in (1, 2) and err.count("\n") == 1, err
    assert message.replace("{busy}", port) in err


def test_serve_command_with_key_from_the_environment(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DIFUSION_API_KEY": "from-env"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "difusion.cli", "serve", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, 60), log.read_text()
        assert httpx.get(f"{base}/v1/models").status_code == 401
        key = {"Authorization": "Bearer from-env"}
        assert httpx.get(f"{base}/v1/models", headers=key).status_code == 200
    finally:
        server.terminate()
        server.wait(30)
    lines = log.read_text().splitlines()
    assert any(line.endswith(f"open http://localhost:{port}/") for line in lines)
    assert any("GET /v1/models 401" in line for line in lines)
    assert any("GET /v1/models 200" in line for line in lines)
