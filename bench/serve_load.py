"""Load on `difusion serve` over loopback: many concurrent clients, against Pipeline alone.

Starts `difusion serve` in a subprocess. First one client sends `--sequential` OpenAI image
requests one after another (the server's own cost, beside Pipeline's); then `--clients`
clients each send `--requests` at once (a client that gets 429 waits the Retry-After it was
given, then asks again), and the run checks that every request ends in images or 429, none
in a 5xx or a lost connection, and that the server is still up. Last, Pipeline in this
process draws the sequential requests' images, one request's worth at a time. The clients
run on the same machine as the server, and take their share of its cores.

    .venv/bin/python bench/serve_load.py                 # 50 clients x 2 requests, 20 steps
    .venv/bin/python bench/serve_load.py --clients 10 --requests 1 --steps 4   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

PROMPTS = ["a red circle above a blue square", "a green triangle", "a yellow square",
           "a cyan circle to the left of a magenta triangle"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(base: str, i: int, args, results: list, deadline: float) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout) as http:
        for r in range(args.requests):
            body = {"prompt": PROMPTS[(i + r) % len(PROMPTS)], "n": args.n, "steps": args.steps,
                    "seed": i * 1000 + r}  # fmt: skip
            first, refusals = time.monotonic(), 0
            while True:
                attempt = time.monotonic()
                try:
                    resp = await http.post("/v1/images/generations", json=body)
                    status = resp.status_code
                except httpx.HTTPError as e:
                    results.append(("lost", type(e).__name__, 0, 0, refusals))
                    break
                if status == 429 and time.monotonic() < deadline:
                    refusals += 1
                    await asyncio.sleep(min(float(resp.headers.get("retry-after", 1)), 10))
                    continue
                done = time.monotonic()
                images = len(resp.json().get("data", [])) if status == 200 else 0
                results.append((status, images, done - attempt, done - first, refusals))
                break


async def load(base: str, args, clients: int) -> tuple[list, float]:
    results: list = []
    start = time.monotonic()
    deadline = start + args.max_seconds
    await asyncio.gather(*(client(base, i, args, results, deadline) for i in range(clients)))
    return results, time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sequential", type=int, default=20, help="requests of the lone client")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--queue-size", type=int, default=8, help="the server's --queue-size")
    p.add_argument("--timeout", type=float, default=600, help="client read timeout, s")
    p.add_argument("--max-seconds", type=float, default=600, help="stop retrying 429s after this")
    args = p.parse_args()

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = Path("out/serve_load.log")
    log.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "difusion.cli", "serve", "--port", str(port),
           "--queue-size", str(args.queue_size), "--device", "cpu"]  # fmt: skip
    with log.open("w") as log_file:
        server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        lone, lone_wall = asyncio.run(
            load(base, argparse.Namespace(**{**vars(args), "requests": args.sequential}), 1)
        )
        results, wall = asyncio.run(load(base, args, args.clients))
        alive = httpx.get(f"{base}/healthz").status_code == 200 and server.poll() is None
    finally:
        server.terminate()
        server.wait(30)

    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    bad = [r for r in results if r[0] not in (200, 429)]
    images = sum(r[1] for r in ok)
    latency = [r[2] for r in ok]
    total = [r[3] for r in ok]
    retries = sum(r[4] for r in results)

    from difusion import Pipeline

    pipe = Pipeline.from_pretrained("default")
    pipe(PROMPTS[0], n=args.n, steps=args.steps, seed=0)  # warm-up
    start = time.monotonic()
    for k in range(args.sequential):
        pipe(PROMPTS[k % len(PROMPTS)], n=args.n, steps=args.steps, seed=k)
    alone = time.monotonic() - start

    lone_rate = sum(r[1] for r in lone if r[0] == 200) / lone_wall
    served_rate, alone_rate = images / wall, args.sequential * args.n / alone
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{args.clients} clients x {args.requests} requests of {args.n} image(s), "
          f"{args.steps} steps, server queue {args.queue_size}")  # fmt: skip
    print(f"requests: {len(results)} of {args.clients * args.requests} ended; {len(ok)} with "
          f"images, {len(refused)} finally refused (429), {len(bad)} otherwise {bad[:3]}; "
          f"{retries} 429s answered by a retry; server up after: {alive}")  # fmt: skip
    print(f"latency of the request that got images: p50 {percentile(latency, 50):.2f} s, "
          f"p95 {percentile(latency, 95):.2f} s; from the first try: p50 "
          f"{percentile(total, 50):.2f} s, p95 {percentile(total, 95):.2f} s")  # fmt: skip
    print(f"under load: {images} images in {wall:.1f} s = {served_rate:.2f} images/s")
    print(f"one client, {args.sequential} requests in turn: {lone_rate:.2f} images/s; "
          f"Pipeline alone, the same requests: {alone_rate:.2f} images/s")  # fmt: skip
    print(f"server / Pipeline: one client {lone_rate / alone_rate:.3f}, "
          f"{args.clients} clients {served_rate / alone_rate:.3f}")  # fmt: skip
    lone_bad = [r for r in lone if r[0] != 200]
    if bad or lone_bad or not alive or len(results) != args.clients * args.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()
