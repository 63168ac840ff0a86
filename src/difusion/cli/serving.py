"""`difusion serve`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Device,
    UserError,
    WeightsDtype,
    _weights_dtype,
)


def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="'default', a run folder, a model file or a Stable Diffusion folder / file; "
            "repeat to serve several (the first is the default)."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DIFUSION_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every API call (the page: /?key=KEY).",
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Generations at a time, per model.")] = 1,
    queue_size: Annotated[
        int, typer.Option(help="Requests waiting per model; past that, 429 with Retry-After.")
    ] = 8,
    timeout: Annotated[
        float, typer.Option(help="Seconds a generation may run before it is cancelled.")
    ] = 300.0,
    public_url: Annotated[
        str | None,
        typer.Option(
            help="Where clients reach the server (e.g. https://images.example.org behind a "
            "proxy), for response_format=url links; default: the address they connected to."
        ),
    ] = None,
    device: Device = "auto",
    dtype: WeightsDtype = "fp32",
    lora_dir: Annotated[
        Path | None,
        typer.Option(
            help="A folder of LoRA files: listed at /sdapi/v1/loras, applied to one request by "
            "<lora:NAME:SCALE> in its prompt."
        ),
    ] = None,
) -> None:
    """Serve models over HTTP: OpenAI's images API, AUTOMATIC1111's, and a page at /."""
    import logging

    import uvicorn

    from ..runs import pick_device
    from ..serve import ServeSettings, create_app
    from ..serve.app import QuickStop

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, got {port}")
    if concurrency < 1 or queue_size < 0 or not timeout > 0:
        raise UserError("--concurrency and --timeout must be positive, --queue-size at least 0")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty")
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise UserError(f"--public-url must start with http:// or https://, got {public_url!r}")
    _weights_dtype(dtype)
    if lora_dir is not None and not lora_dir.is_dir():
        raise UserError(f"--lora-dir {lora_dir}: not a folder")
    _check_can_listen(host, port)  # before the minutes a large model may take to load
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        logging.warning("listening on %s without --api-key: anyone who reaches it can use it", host)
    settings = ServeSettings(
        models=tuple(model or ["default"]), api_key=api_key, concurrency=concurrency,
        queue_size=queue_size, timeout=timeout, device=str(pick_device(device)), dtype=dtype,
        lora_dir=str(lora_dir) if lora_dir else None,
        public_url=public_url,
    )  # fmt: skip
    application = create_app(settings)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    typer.echo(f"serving {', '.join(settings.models)}: open http://{shown}:{port}/", err=True)
    config = uvicorn.Config(
        application, host=host, port=port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=1.0,  # the jobs end at once: nothing should need longer
    )  # fmt: skip
    QuickStop(config).run()


def _check_can_listen(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.bind(infos[0][4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
