"""What the routes share: the settings, the loaded models with their workers, the pool that
decodes uploads and encodes results, the images kept for `response_format=url`, the options
AUTOMATIC1111's clients set; `server(request)` finds it, `run_generation` queues a request
on it."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from fastapi import Request
from PIL import Image

from .errors import APIError
from .jobs import Job, Worker, wait_for
from .loras import take_lora_tags
from .models import Generation, ServedModel

T = TypeVar("T")


@dataclass
class ServeSettings:
    models: tuple[str, ...] = ("default",)  # "default", run folders, model or SD files
    api_key: str | None = None  # every API call then needs "Authorization: Bearer KEY"
    concurrency: int = 1  # generations at a time, per model
    queue_size: int = 8  # requests waiting per model before 429
    timeout: float = 300.0  # seconds a generation may run
    device: str = "cpu"
    dtype: str = "fp32"  # the U-Nets' weights: "fp32" or "bf16"
    lora_dir: str | None = None  # LoRA files a prompt's <lora:NAME:SCALE> may apply
    public_url: str | None = None  # where clients reach the server, for `url` answers
    codec_threads: int = 2  # uploads decoded and results encoded at a time
    kept_bytes: int = 256 * 2**20  # images kept for `response_format=url`, at most
    kept_seconds: float = 3600.0  # and for at most this long each


class ImageStore:
    """Results kept for `response_format=url`: the newest ones, `max_bytes` of them at most,
    each for `ttl` seconds, behind unguessable names (so that a chat front end can show them
    without the key). Expired ones are dropped on every put and get."""

    def __init__(self, max_bytes: int = 256 * 2**20, ttl: float = 3600) -> None:
        self.max_bytes, self.ttl, self.bytes = max_bytes, ttl, 0
        self.items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()  # oldest first
        self.lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_urlsafe(18)}.{fmt}"
        with self.lock:
            self.items[name] = (time.monotonic() + self.ttl, data, fmt)
            self.bytes += len(data)
            self._drop(self.max_bytes)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        with self.lock:
            self._drop(self.max_bytes)
            item = self.items.get(name)
        return None if item is None else (item[1], item[2])

    def _drop(self, max_bytes: int) -> None:
        """The oldest items, while they are expired or the whole is over `max_bytes`."""
        now = time.monotonic()
        while self.items:
            expires, data, _ = next(iter(self.items.values()))
            if expires >= now and self.bytes <= max_bytes:
                return
            self.items.popitem(last=False)
            self.bytes -= len(data)


class Server:
    """What the routes share: the models, their workers, the settings."""

    def __init__(self, settings: ServeSettings, models: dict[str, ServedModel]) -> None:
        if not models:
            raise ValueError("no model to serve")
        self.settings, self.models = settings, models
        self.workers = {
            name: Worker(m, settings.concurrency, settings.queue_size, settings.timeout)
            for name, m in models.items()
        }
        self.default = next(iter(models))
        self.store = ImageStore(settings.kept_bytes, settings.kept_seconds)
        self.codec = ThreadPoolExecutor(settings.codec_threads, thread_name_prefix="codec")
        self.options: dict = {"sd_model_checkpoint": self.default, "samples_format": "png"}

    def model(self, name: object, field: str = "model") -> ServedModel:
        if name in (None, ""):
            return self.models[self.default]
        if not isinstance(name, str) or name not in self.models:
            shown = repr(name) if isinstance(name, str) else f"a JSON {type(name).__name__}"
            raise APIError(
                422, f"unknown model {shown[:80]}; this server has {', '.join(self.models)}",
                field,
            )  # fmt: skip
        return self.models[name]

    def shut_down(self) -> None:
        """The first thing a stop does: every running and queued job ends now, its client
        answered 503, and no new one is taken."""
        for worker in self.workers.values():
            worker.shut_down()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.codec.shutdown(wait=False, cancel_futures=True)
        self.codec = ThreadPoolExecutor(self.settings.codec_threads, thread_name_prefix="codec")


def server(request: Request) -> Server:
    return request.app.state.server


async def in_pool(request: Request, fn: Callable[..., T], *args) -> T:
    """fn(*args) in the codec pool: decoding and encoding images never hold the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(server(request).codec, partial(then_release, fn, *args))


def then_release(fn: Callable[..., T], *args) -> T:
    """fn(*args), then the freed heap handed back to the system: glibc keeps what a pool
    thread freed in that thread's arena, and a few 4096x4096 uploads decoded by different
    threads would otherwise hold their peak for good."""
    try:
        return fn(*args)
    finally:
        malloc_trim()


def malloc_trim() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to hand back this way
        return None


_libc = _glibc()


def public_url(request: Request, path: str) -> str:
    """An absolute link to `path` on this server: `--public-url` when given, else the address
    and port the client's connection reached (the socket's, never the Host header)."""
    base = server(request).settings.public_url
    if base is None:
        host, port = request.scope.get("server") or ("127.0.0.1", 80)
        base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    return base.rstrip("/") + path


def checked(request: Request, model: ServedModel, g: Generation) -> Generation:
    """The request with its prompt's <lora:NAME:SCALE> tags taken out, checked against the
    model (every route that generates goes through here)."""
    return model.check(take_lora_tags(g, server(request).settings.lora_dir))


async def run_generation(
    request: Request, model: ServedModel, g: Generation, partial_ok: bool = False
) -> tuple[list[Image.Image], Generation, Job]:
    """Check the request against the model, queue it, wait for its images (the job stops if
    the client leaves), and note its timings for the log line. `partial_ok`: an interrupted
    job gives the images as far as it got (AUTOMATIC1111's way), not a 409."""
    g = checked(request, model, g)
    worker = server(request).workers[model.name]
    job = Job(g)
    future = worker.submit(job)
    try:
        images = await wait_for(worker, job, future, request.is_disconnected, partial_ok)
    finally:
        request.state.timing = f"{model.name}, {job.timings}"
    return images, g, job
