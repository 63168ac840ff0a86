"""Load on `difusion serve` over loopback: many concurrent clients, against Pipeline alone,
and beside hostile clients.

Starts `difusion serve` in a subprocess. First one client sends `--sequential` OpenAI image
requests one after another (the server's own cost, beside Pipeline's); then `--clients`
clients each send `--requests` at once (a client that gets 429 waits the Retry-After it was
given, then asks again), and the run checks that every request ends in images or 429, none
in a 5xx or a lost connection, and that the server is still up. With `--hostile N`, the
concurrent phase runs again with N hostile clients beside the honest ones (bad bodies,
oversized bodies, 4096x4096 uploads, clients that leave mid-generation: serve_traffic.py),
and the honest clients' throughput and latency are reported with and without them. Last,
Pipeline in this process draws the sequential requests' images, one request's worth at a
time. The clients run on the same machine as the server, and take their share of its cores.

    .venv/bin/python bench/serve_load.py                 # 50 clients x 2 requests, 20 steps
    .venv/bin/python bench/serve_load.py --hostile 8     # and again beside 8 hostile clients
    .venv/bin/python bench/serve_load.py --clients 10 --requests 1 --steps 4   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import torch
from serve_traffic import PROMPTS, honest_request, hostile_client, percentile, start_server


async def client(base: str, i: int, args, results: list, deadline: float) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout) as http:
        for r in range(args.requests):
            body = {"prompt": PROMPTS[(i + r) % len(PROMPTS)], "n": args.n, "steps": args.steps,
                    "seed": i * 1000 + r}  # fmt: skip
            results.append(await honest_request(http, body, deadline))


async def load(base: str, args, clients: int, hostile: int = 0) -> tuple[list, float, dict]:
    """`clients` honest clients to the end of their requests, with `hostile` hostile ones
    beside them while they run: the honest results, the wall time, the hostile answers."""
    results, tally = [], {}
    start = time.monotonic()
    deadline = start + args.max_seconds
    attackers = [asyncio.ensure_future(hostile_client(base, start + 10**6, i, tally))
                 for i in range(hostile)]  # fmt: skip
    await asyncio.gather(*(client(base, i, args, results, deadline) for i in range(clients)))
    wall = time.monotonic() - start
    for attacker in attackers:
        attacker.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    return results, wall, tally


def summary(results: list, wall: float) -> tuple[str, float, list]:
    """A line on the honest requests, their images/s, and those that ended badly."""
    ok = [r for r in results if r[0] == 200]
    bad = [r for r in results if r[0] not in (200, 429)]
    latency, total = [r[2] for r in ok], [r[3] for r in ok]
    rate = sum(r[1] for r in ok) / wall
    line = (
        f"{len(ok)} of {len(results)} requests with images, {len(bad)} otherwise {bad[:3]}; "
        f"{rate:.2f} images/s; latency of the try that got images p50 "
        f"{percentile(latency, 50):.2f} s, p95 {percentile(latency, 95):.2f} s; from the first "
        f"try p50 {percentile(total, 50):.2f} s, p95 {percentile(total, 95):.2f} s"
    )
    return line, rate, bad


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
    p.add_argument("--hostile", type=int, default=0,
                   help="run the clients again beside this many hostile ones")  # fmt: skip
    args = p.parse_args()

    server, base = start_server(Path("out/serve_load.log"), "--queue-size", str(args.queue_size))
    try:
        sequential = argparse.Namespace(**{**vars(args), "requests": args.sequential})
        lone, lone_wall, _ = asyncio.run(load(base, sequential, 1))
        results, wall, _ = asyncio.run(load(base, args, args.clients))
        attacked = (
            asyncio.run(load(base, args, args.clients, args.hostile)) if args.hostile else None
        )
        alive = httpx.get(f"{base}/healthz").status_code == 200 and server.poll() is None
    finally:
        server.terminate()
        server.wait(30)

    from difusion import Pipeline

    pipe = Pipeline.from_pretrained("default")
    pipe(PROMPTS[0], n=args.n, steps=args.steps, seed=0)  # warm-up
    start = time.monotonic()
    for k in range(args.sequential):
        pipe(PROMPTS[k % len(PROMPTS)], n=args.n, steps=args.steps, seed=k)
    alone = time.monotonic() - start

    line, served_rate, bad = summary(results, wall)
    lone_rate = sum(r[1] for r in lone if r[0] == 200) / lone_wall
    alone_rate = args.sequential * args.n / alone
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{args.clients} clients x {args.requests} requests of {args.n} image(s), "
          f"{args.steps} steps, server queue {args.queue_size}; server up after: {alive}")  # fmt: skip
    print(f"honest clients alone: {line}")
    print(f"one client, {args.sequential} requests in turn: {lone_rate:.2f} images/s; "
          f"Pipeline alone, the same requests: {alone_rate:.2f} images/s")  # fmt: skip
    print(f"server / Pipeline: one client {lone_rate / alone_rate:.3f}, "
          f"{args.clients} clients {served_rate / alone_rate:.3f}")  # fmt: skip
    failed = bool(bad) or any(r[0] != 200 for r in lone) or not alive
    if attacked is not None:
        results_h, wall_h, tally = attacked
        line_h, rate_h, bad_h = summary(results_h, wall_h)
        fives = sum(n for k, n in tally.items() if isinstance(k, int) and k >= 500)
        print(f"beside {args.hostile} hostile clients: {line_h}; honest throughput "
              f"{rate_h / served_rate:.2f}x of the run without them")  # fmt: skip
        print(f"hostile answers: {dict(sorted(tally.items(), key=str))}; 5xx: {fives}")
        failed = failed or bool(bad_h) or bool(fives) or "reset" in tally
    if failed or len(results) != args.clients * args.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()
