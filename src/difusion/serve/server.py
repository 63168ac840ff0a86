"""What the routes share: the settings, the loaded models with their workers, the images
kept for `response_format=url`; `server(request)` finds it, `run_generation` queues a
request on it."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import Request
from PIL import Image

from .errors import APIError
from .jobs import Job, Worker, wait_for
from .loras import take_lora_tags
from .models import Generation, ServedModel


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


class ImageStore:
    """Results kept for `response_format=url`: the newest `size`, each for `ttl` seconds,
    behind unguessable names (so that a chat front end can show them without the key)."""

    def __init__(self, size: int = 256, ttl: float = 3600) -> None:
        self.size, self.ttl = size, ttl
        self.items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_urlsafe(18)}.{fmt}"
        with self.lock:
            self.items[name] = (time.monotonic() + self.ttl, data, fmt)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        with self.lock:
            item = self.items.get(name)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1], item[2]


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
        self.store = ImageStore()
        self.options: dict = {"sd_model_checkpoint": self.default, "samples_format": "png"}

    def model(self, name: str | None, field: str = "model") -> ServedModel:
        if name in (None, ""):
            return self.models[self.default]
        if name not in self.models:
            raise APIError(
                422, f"unknown model {name!r}; this server has {', '.join(self.models)}", field
            )
        return self.models[name]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


def server(request: Request) -> Server:
    return request.app.state.server


async def run_generation(
    request: Request, model: ServedModel, g: Generation
) -> tuple[list[Image.Image], Generation, Job]:
    """Check the request against the model, queue it, wait for its images (the job stops if
    the client leaves), and note its timings for the log line."""
    g = model.check(take_lora_tags(g, server(request).settings.lora_dir))
    worker = server(request).workers[model.name]
    job = Job(g)
    future = worker.submit(job)
    try:
        images = await wait_for(worker, job, future, request.is_disconnected)
    finally:
        request.state.timing = f"{model.name}, {job.timings}"
    return images, g, job
