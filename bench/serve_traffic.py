"""What the serve benchmarks share: `difusion serve` in a subprocess on a free loopback
port, the server's memory, percentiles, an honest client and a hostile one."""

from __future__ import annotations

import asyncio
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

PROMPTS = ["a red circle above a blue square", "a green triangle", "a yellow square",
           "a cyan circle to the left of a magenta triangle"]  # fmt: skip
GENERATIONS = "/v1/images/generations"


def start_server(log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """`difusion serve` on loopback, up and answering /healthz."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "difusion.cli", "serve", "--port", str(port), "--device", "cpu",
           *options]  # fmt: skip
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server did not start; see {log}")


def rss_mib(pid: int) -> float:
    """The process's resident memory (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def honest_request(http: httpx.AsyncClient, body: dict, deadline: float) -> tuple:
    """One generation, retried after each 429's Retry-After until `deadline`:
    (status or "lost", images, seconds of the try that ended it, seconds from the first)."""
    first = time.monotonic()
    while True:
        attempt = time.monotonic()
        try:
            resp = await http.post(GENERATIONS, json=body)
        except httpx.HTTPError as e:
            return ("lost", type(e).__name__, 0.0, 0.0)
        if resp.status_code == 429 and time.monotonic() < deadline:
            await asyncio.sleep(min(float(resp.headers.get("retry-after", 1)), 10))
            continue
        done = time.monotonic()
        images = len(resp.json().get("data", [])) if resp.status_code == 200 else 0
        return (resp.status_code, images, done - attempt, done - first)


def big_png() -> bytes:
    """A 4096x4096 PNG: the largest upload the server takes, costly to decode."""
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((4096, 4096)).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def lab_tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("LAB", (32, 32)).save(buf, "TIFF")
    return buf.getvalue()


async def hostile_client(base: str, until: float, seed: int, tally: dict) -> None:
    """Bad bodies, wrong types, lone surrogates, oversized bodies, large uploads, other image
    formats and clients that leave mid-generation, at random until `until`; `tally` counts
    answers by status ("reset" where a connection that should have lived did not)."""
    rng, png, tiff = random.Random(seed), big_png(), lab_tiff()
    json_type = {"content-type": "application/json"}
    attacks = {
        "bad json": lambda h: h.post(GENERATIONS, content=b"{bad", headers=json_type),
        "surrogate": lambda h: h.post(
            GENERATIONS, content=b'{"prompt": "a\\ud800"}', headers=json_type
        ),  # fmt: skip
        "types": lambda h: h.post(
            "/sdapi/v1/txt2img",
            json={"prompt": ["x"], "override_settings": {"sd_model_checkpoint": [1]}},
        ),  # fmt: skip
        "size": lambda h: h.post(GENERATIONS, json={"prompt": "x", "size": "３２x" + "9" * 4000}),
        "options": lambda h: h.post("/sdapi/v1/options", json={f"k{rng.random()}": "v" * 60000}),
        "oversized": lambda h: h.post(
            GENERATIONS, content=b"[" + b"1," * 2**20 + b"1]", headers=json_type
        ),  # fmt: skip
        "large upload": lambda h: h.post(
            "/v1/images/edits",
            data={"prompt": "x"},
            files={"image": ("a.png", png), "mask": ("m.tiff", tiff)},
        ),  # fmt: skip
        "random bytes": lambda h: h.post(
            "/v1/images/edits",
            content=rng.randbytes(2000),
            headers={"content-type": "multipart/form-data; boundary=x"},
        ),  # fmt: skip
        "leaves": lambda h: h.post(
            GENERATIONS, json={"prompt": "x", "steps": 1000, "n": 8}, timeout=rng.uniform(0.05, 1.0)
        ),  # fmt: skip
    }
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        while time.monotonic() < until:
            name = rng.choice(list(attacks))
            try:
                resp = await attacks[name](http)
                key = resp.status_code
            except httpx.TimeoutException:
                key = "left" if name == "leaves" else "timeout"
            except httpx.HTTPError:  # a 413 may close the connection before the body is sent
                key = "closed at the limit" if name == "oversized" else "reset"
            tally[key] = tally.get(key, 0) + 1
            await asyncio.sleep(rng.uniform(0, 0.2))
