"""The served web page, end to end in Debian's chromium against an in-process server.

DIFUSION_SCREENSHOT_DIR=docs pytest tests/test_serve_page.py saves a screenshot of the page in
English (serve.png) and in Spanish (serve_es.png).
"""

import io
import os
import re
from pathlib import Path

import pytest
from PIL import Image
from serve_util import running

from difusion.serve import ServeSettings, create_app

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="pip install -e '.[dev]' (make install)"
)

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PROMPT = "a red circle above a blue square"
TIMEOUT = 30_000  # ms

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium: apt-get install chromium"
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    with running(create_app(ServeSettings(models=("default",)))) as base_url:
        yield base_url


@pytest.fixture
def page(browser):
    yield from new_page(browser, "en-US")


@pytest.fixture
def page_es(browser):
    yield from new_page(browser, "es-ES")


def new_page(browser, locale):
    # Playwright polls wait_for_function with eval, which the page's CSP forbids; the page
    # itself needs no exception (tests/test_serve_hostile.py checks the header)
    context = browser.new_context(
        viewport={"width": 1000, "height": 800}, bypass_csp=True, locale=locale
    )
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def open_page(page, url):
    page.goto(url)
    page.wait_for_function("!document.querySelector('#generate').disabled")


def generate(page, prompt, steps, n=1, timeout=TIMEOUT):
    """Fill the form, press generate and wait for the batch in the gallery."""
    before = page.locator(".result").count()
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#n", str(n))
    page.click("#generate")
    page.wait_for_function(
        "n => document.querySelectorAll('.result img').length >= n"
        " && [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth)",
        arg=before + n,
        timeout=timeout,
    )
    page.wait_for_function("!document.querySelector('#generate').disabled")


def test_generate_shows_progress_and_result(page, server):
    open_page(page, server)
    assert page.locator("#model").is_hidden()  # one model
    assert page.locator("#sampler option").count() >= 2
    # every src the live preview takes, also those set between two polls
    page.evaluate(
        """() => {
        window.previews = new Set();
        const img = document.querySelector('#preview');
        new MutationObserver(records => {
            for (const r of records) if (r.oldValue) previews.add(r.oldValue);
            previews.add(img.src);
        }).observe(img, {attributes: true, attributeFilter: ['src'], attributeOldValue: true});
    }"""
    )
    page.click("#dice")
    seed = page.input_value("#seed")
    assert 0 <= int(seed) < 2**31
    generate(page, PROMPT, steps=12)

    previews = page.evaluate("[...previews]")
    assert len(previews) >= 3 and all(p.startswith("data:image/png") for p in previews)
    assert page.text_content("#progress").startswith("done")
    assert page.locator("#error").is_hidden()
    result = page.locator(".result").first
    assert result.locator("img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 32]
    params = result.locator(".params").text_content()
    assert f"seed {seed}" in params and PROMPT in params and "12 steps" in params
    link = result.locator("a.download")
    assert link.get_attribute("download") == f"difusion-{seed}-0.png"
    assert link.get_attribute("href").startswith("data:image/png;base64,")
    assert page.locator("#preview").evaluate("i => getComputedStyle(i).imageRendering") == (
        "pixelated"
    )

    screenshot(page, "serve.png", "a green triangle left of a yellow circle", PROMPT)


def screenshot(page, name, first, second):
    """With DIFUSION_SCREENSHOT_DIR set: two more batches, then the page into that folder."""
    if folder := os.environ.get("DIFUSION_SCREENSHOT_DIR"):
        page.fill("#seed", "")
        generate(page, first, steps=20, n=2)
        generate(page, second, steps=20, n=4)
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=Path(folder) / name)


def png(color, size=32):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return {"name": "in.png", "mimeType": "image/png", "buffer": buf.getvalue()}


def test_image_and_mask_upload(page, server):
    open_page(page, server)
    assert page.locator("#upload").is_visible()  # the shipped model takes an image
    assert page.is_disabled("#strength") and page.is_disabled("#mask")
    page.set_input_files("#image", png("red"))
    assert page.is_enabled("#strength") and page.is_enabled("#mask")
    page.set_input_files("#mask", png("white"))
    page.fill("#strength", "0.5")
    generate(page, PROMPT, steps=8)
    assert page.evaluate("document.querySelector('#bar').max") == 4  # half the steps run
    page.click("#clear-upload")
    assert page.is_disabled("#strength") and page.input_value("#image") == ""


def test_form_follows_the_chosen_model(page, server):
    """Kinds the shipped model is not: a label model and an unconditional one (info faked)."""
    text = page.request.get(f"{server}/api/info").json()["models"][0]
    label = {**text, "name": "digits", "kind": "label", "classes": ["0", "1", "7"],
             "takes_image": False, "sizes": ["16x16"], "default_size": "16x16"}  # fmt: skip
    uncond = {**label, "name": "noise", "kind": "unconditional", "classes": None}
    info = {"default_model": "default", "auth": False, "models": [text, label, uncond]}
    page.route("**/api/info", lambda route: route.fulfill(json=info))
    open_page(page, server)
    assert page.locator("#model").is_visible()
    page.select_option("#model", "digits")
    assert page.locator("#upload").is_hidden() and page.is_disabled("#negative")
    page.select_option("#classes", "7")
    assert page.input_value("#prompt") == "7"
    page.click("#lang [data-lang=es]")  # the model's hints follow a switch
    assert page.get_attribute("#prompt", "placeholder") == "el nombre de una clase, p. ej. 0, 1, 7"
    assert page.text_content("#classes option >> nth=0") == "elige una clase…"
    page.select_option("#model", "noise")
    assert page.text_content("#prompt-note") == (
        "Este modelo es incondicional: no tiene en cuenta el texto."
    )
    page.click("#lang [data-lang=en]")
    assert page.is_disabled("#prompt") and page.locator("#prompt-note").is_visible()
    assert (
        page.text_content("#prompt-note") == "This model is unconditional: it ignores the prompt."
    )
    assert page.locator("#class-field").is_hidden()
    page.select_option("#model", "default")
    assert page.is_enabled("#prompt") and page.locator("#upload").is_visible()


def test_refusal_shows_the_error_box(page, server):
    open_page(page, server)
    assert page.locator("#error").is_hidden()
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "5000")
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    assert "steps" in page.text_content("#error")
    page.wait_for_function("!document.querySelector('#generate').disabled")
    # the next accepted request hides it again
    generate(page, PROMPT, steps=3)
    assert page.locator("#error").is_hidden()


def test_error_event_shows_the_error_box(page):
    with running(create_app(ServeSettings(models=("default",), timeout=1.0))) as base_url:
        open_page(page, base_url)
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "1000")
        page.click("#generate")
        page.wait_for_selector("#error", state="visible")
        assert "limit" in page.text_content("#error")  # the server's 504 detail
        page.wait_for_function("!document.querySelector('#generate').disabled")
        assert page.text_content("#progress") == "failed"
        assert page.locator(".result").count() == 0


def test_cancel_stops_the_stream(page, server):
    open_page(page, server)
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "1000")
    page.fill("#n", "8")  # a minute's work on a CPU
    page.click("#generate")
    page.wait_for_function("/^step [1-9]/.test(document.querySelector('#progress').textContent)")
    assert page.is_disabled("#generate")
    page.click("#cancel")
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert page.text_content("#progress") == "cancelled"
    assert page.locator(".result").count() == 0
    assert page.locator("#error").is_hidden()
    generate(page, PROMPT, steps=3, timeout=10_000)  # the server stopped that job


def test_phone_screen_has_no_sideways_scroll(browser, server):
    context = browser.new_context(
        viewport={"width": 375, "height": 740}, is_mobile=True, bypass_csp=True
    )
    page = context.new_page()
    open_page(page, server)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.locator("#generate").bounding_box()["width"] > 100
    context.close()


def test_api_key(browser):
    app = create_app(ServeSettings(models=("default",), api_key="sekrit"))
    with running(app) as base_url:
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        open_page(page, f"{base_url}/?key=sekrit")
        assert "sekrit" not in page.url  # taken out of the address bar
        assert page.locator("#key").is_hidden()
        generate(page, PROMPT, steps=3)
        assert re.search(r"seed \d+", page.locator(".result .params").first.text_content())

        page = context.new_page()  # a new tab: sessionStorage starts empty
        page.set_default_timeout(TIMEOUT)
        page.goto(base_url)
        page.wait_for_selector("#key", state="visible")
        assert page.is_disabled("#generate")
        page.fill("#key", "wrong")
        page.click("#key-save")
        page.wait_for_function("document.querySelector('#auth-detail').textContent !== ''")
        assert page.locator("#key").is_visible() and page.is_disabled("#generate")
        page.fill("#key", "sekrit")
        page.click("#key-save")
        page.wait_for_selector("#key", state="hidden")
        generate(page, PROMPT, steps=3)
        context.close()

        context = browser.new_context(locale="es-ES", bypass_csp=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        page.goto(base_url)
        page.wait_for_selector("#key", state="visible")
        assert page.text_content("label[for=key]") == "Esta página necesita una clave de API"
        assert page.text_content("#key-save") == "Usar clave"
        assert page.get_attribute("#key", "placeholder") == "clave de API"
        context.close()


def visible_texts(page):
    return {
        "lang": page.get_attribute("html", "lang"),
        "generate": page.text_content("#generate"),
        "cancel": page.text_content("#cancel"),
        "steps": page.text_content("[data-text=steps]"),
        "sampler": page.text_content("[data-text=sampler]"),
        "negative": page.text_content("[data-text=negative]"),
        "hint": page.get_attribute("#prompt", "placeholder"),
        "seed": page.get_attribute("#seed", "placeholder"),
        "progress": page.text_content("#progress"),
        "legend": page.text_content("#upload legend"),
    }


ENGLISH = {
    "lang": "en",
    "generate": "Generate",
    "cancel": "Cancel",
    "steps": "Steps",
    "sampler": "Sampler",
    "negative": "Negative prompt",
    "hint": f"describe the image, e.g. {PROMPT}",
    "seed": "random",
    "progress": "images appear here",
    "legend": "Start from an image (optional)",
}
SPANISH = {
    "lang": "es",
    "generate": "Generar",
    "cancel": "Cancelar",
    "steps": "Pasos",
    "sampler": "Muestreador",
    "negative": "Texto negativo",
    "hint": f"describe la imagen en inglés, p. ej. {PROMPT}",
    "seed": "aleatoria",
    "progress": "las imágenes aparecerán aquí",
    "legend": "Partir de una imagen (opcional)",
}


def test_page_follows_the_browser_language(page, page_es, server):
    open_page(page, server)
    assert visible_texts(page) == ENGLISH
    assert page.get_attribute("#lang [data-lang=en]", "aria-pressed") == "true"
    open_page(page_es, server)
    assert visible_texts(page_es) == SPANISH
    assert page_es.get_attribute("#lang [data-lang=es]", "aria-pressed") == "true"
    assert page_es.get_attribute("#dice", "aria-label") == "semilla aleatoria"


def test_language_switch_is_remembered(page, server):
    open_page(page, server)
    page.click("#lang [data-lang=es]")
    assert visible_texts(page) == SPANISH
    page.reload()
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert visible_texts(page) == SPANISH  # an English browser, Spanish as chosen
    page.click("#lang [data-lang=en]")
    page.reload()
    page.wait_for_function("!document.querySelector('#generate').disabled")
    assert visible_texts(page) == ENGLISH


def test_generate_in_spanish(page_es, server):
    page = page_es
    open_page(page, server)
    page.click("#dice")
    seed = page.input_value("#seed")
    generate(page, PROMPT, steps=6)
    assert page.text_content("#progress").startswith("terminado en ")
    params = page.locator(".result .params").first.text_content()
    assert f"semilla {seed}" in params and "6 pasos" in params and PROMPT in params
    assert page.text_content(".result a.download") == "descargar"
    # a switch redraws what is already shown: the result's caption and the progress line
    page.click("#lang [data-lang=en]")
    params = page.locator(".result .params").first.text_content()
    assert f"seed {seed}" in params and "6 steps" in params
    assert page.text_content("#progress").startswith("done in ")
    page.click("#lang [data-lang=es]")
    screenshot(page, "serve_es.png", "a green triangle left of a yellow circle", PROMPT)


# --- LoRAs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    """A server with a key and a --lora-dir of one LoRA file made for the shipped model."""
    from test_lora import shipped_model_lora

    folder = tmp_path_factory.mktemp("loras")
    shipped_model_lora(folder / "dots.safetensors")
    settings = ServeSettings(models=("default",), lora_dir=str(folder), api_key="sekrit")
    with running(create_app(settings)) as base_url:
        yield base_url


def loras_listed(page):
    """Waits until the page has the server's list of LoRAs (or knows it has none)."""
    page.wait_for_function(
        "document.querySelector('#lora-field').getAttribute('aria-busy') === 'false'"
    )


def test_lora_control_puts_the_tag_into_the_prompt(page, lora_server):
    prompts = []
    page.on(
        "request",
        lambda r: r.url.endswith("/api/generate") and prompts.append(r.post_data_json["prompt"]),
    )
    open_page(page, f"{lora_server}/?key=sekrit")  # the list is behind the key too
    loras_listed(page)
    assert page.locator("#lora-field").is_visible()
    assert page.locator("#lora option").all_text_contents() == ["none", "dots"]
    assert page.text_content("[data-text=lora]") == "LoRA"
    assert page.text_content("[data-text=loraScale]") == "LoRA scale"
    scale = page.locator("#lora-scale")
    assert [scale.get_attribute(a) for a in ("min", "max", "step")] == ["-2", "2", "0.05"]
    assert scale.input_value() == "1"

    page.select_option("#lora", "dots")
    page.fill("#lora-scale", "0.5")
    generate(page, PROMPT, steps=2)
    assert prompts == [f"{PROMPT} <lora:dots:0.5>"]
    assert page.locator("#error").is_hidden()  # the server found and applied it
    assert f"“{PROMPT}”" in page.locator(".result .params").first.text_content()

    page.select_option("#lora", "")
    generate(page, PROMPT, steps=2)
    assert prompts[-1] == PROMPT

    page.click("#lang [data-lang=es]")
    assert page.text_content("[data-text=loraScale]") == "Escala de la LoRA"
    assert page.locator("#lora option").all_text_contents() == ["ninguna", "dots"]


def test_no_lora_control_without_loras(page, server, lora_server):
    open_page(page, server)  # no --lora-dir: an empty list
    loras_listed(page)
    assert page.locator("#lora-field").is_hidden()

    for answer in (lambda route: route.fulfill(status=500), lambda route: route.abort()):
        page.route("**/sdapi/v1/loras", answer)
        open_page(page, f"{lora_server}/?key=sekrit")
        loras_listed(page)
        assert page.locator("#lora-field").is_hidden()
        page.unroute("**/sdapi/v1/loras")
