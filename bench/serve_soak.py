"""A soak of `difusion serve` on loopback: honest clients and hostile ones at once, for a
bounded time, watching the server's memory and /healthz.

Honest clients ask for generations (a 429 is retried after its Retry-After); hostile ones
send bad bodies, wrong types, lone surrogates, oversized bodies, 4096x4096 uploads, other
image formats, and leave in the middle of generations (bench/serve_traffic.py). A poller
times /healthz four times a second; the server's resident memory is read every
`--sample-seconds`. The run passes when no answer was a 5xx, no honest request was lost,
memory stayed flat within 10% (the median of the run's last third against that of its
first third, the first tenth left out: uploads being decoded make spikes), and
/healthz's p99 is under 200 ms. Then it stops the server as an operator would, with SIGTERM
during a 1000-step generation streamed to a client, and times the exit (at most 2 s, the
client answered 503).

    .venv/bin/python bench/serve_soak.py                 # 10 minutes
    .venv/bin/python bench/serve_soak.py --minutes 1     # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx
from serve_traffic import (
    PROMPTS,
    honest_request,
    hostile_client,
    percentile,
    rss_mib,
    start_server,
)


async def honest_client(base: str, until: float, i: int, steps: int, results: list) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        r = 0
        while time.monotonic() < until:
            body = {"prompt": PROMPTS[(i + r) % len(PROMPTS)], "steps": steps, "seed": r}
            results.append(await honest_request(http, body, until + 60))
            r += 1


async def poll_health(base: str, until: float, latencies: list) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                ok = (await http.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.monotonic() - start if ok else float("inf"))
            await asyncio.sleep(0.25)


async def watch_memory(pid: int, until: float, every: float, samples: list) -> None:
    start = time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic() - start, rss_mib(pid)))
        await asyncio.sleep(every)


async def soak(base: str, pid: int, args) -> tuple[list, dict, list, list, float]:
    start = time.monotonic()
    until = start + args.minutes * 60
    honest, hostile, health, memory = [], {}, [], []
    await asyncio.gather(
        *(honest_client(base, until, i, args.steps, honest) for i in range(args.honest)),
        *(hostile_client(base, until, i, hostile) for i in range(args.hostile)),
        poll_health(base, until, health),
        watch_memory(pid, until, args.sample_seconds, memory),
    )
    return honest, hostile, health, memory, time.monotonic() - start


def stop_during_generation(server, base: str) -> tuple[float, str]:
    """SIGTERM once a 1000-step generation has made its first steps: the seconds until the
    process exits, and the stream's last event."""
    body = {"prompt": PROMPTS[0], "steps": 1000}
    with httpx.stream("POST", f"{base}/api/generate", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith('data: {"step"'):
                break
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
        server.wait(60)
    return time.monotonic() - start, rest[-1] if rest else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--honest", type=int, default=4, help="honest clients")
    p.add_argument("--hostile", type=int, default=4, help="hostile clients")
    p.add_argument("--steps", type=int, default=8, help="steps of an honest generation")
    p.add_argument("--sample-seconds", type=float, default=5.0, help="how often RSS is read")
    args = p.parse_args()

    server, base = start_server(Path("out/serve_soak.log"), "--queue-size", "8")
    try:
        honest, hostile, health, memory, wall = asyncio.run(soak(base, server.pid, args))
        alive = server.poll() is None and httpx.get(f"{base}/healthz").status_code == 200
        stop_s, last_event = stop_during_generation(server, base)
    finally:
        server.kill() if server.poll() is None else None

    ok = [r for r in honest if r[0] == 200]
    lost = [r for r in honest if r[0] != 200]
    fives = sum(n for k, n in hostile.items() if isinstance(k, int) and k >= 500)
    fives += sum(1 for r in honest if isinstance(r[0], int) and r[0] >= 500)
    # the trend, not the spikes of uploads being decoded: the median of the last third of
    # the run against the median of the first third after the first tenth
    warm = [m for t, m in memory if t >= args.minutes * 6]
    third = max(1, len(warm) // 3)
    base_rss, end_rss = statistics.median(warm[:third]), statistics.median(warm[-third:])
    growth = end_rss / base_rss - 1
    p99 = percentile(health, 99)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.minutes:g} min, {args.honest} honest and {args.hostile} hostile clients, "
          f"{args.steps} steps")  # fmt: skip
    print(f"honest: {len(ok)} requests with images, {len(lost)} lost {lost[:3]}; "
          f"{sum(r[1] for r in ok) / wall:.2f} images/s; latency p50 "
          f"{percentile([r[3] for r in ok], 50):.2f} s, p95 {percentile([r[3] for r in ok], 95):.2f} s")  # fmt: skip
    print(f"hostile answers: {dict(sorted(hostile.items(), key=str))}")
    print(f"5xx: {fives}; server up after: {alive}")
    print(f"/healthz: {len(health)} polls, p50 {percentile(health, 50) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms, max {max(health) * 1000:.1f} ms")  # fmt: skip
    print(
        "RSS MiB over time: "
        + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in memory[:: max(1, len(memory) // 12)])
    )
    print(f"RSS (median) early {base_rss:.0f} MiB, late {end_rss:.0f} MiB, highest "
          f"{max(warm):.0f} MiB: {growth:+.1%} ({'flat' if growth <= 0.10 else 'GROWING'} "
          "within 10%)")  # fmt: skip
    answered_503 = '"status": 503' in last_event
    print(f"SIGTERM during a 1000-step generation: exited after {stop_s:.2f} s; the client's "
          f"last event: {last_event[:120]}")  # fmt: skip
    if fives or lost or not alive or growth > 0.10 or p99 >= 0.2:
        sys.exit(1)
    if stop_s > 2.0 or not answered_503:
        sys.exit(1)


if __name__ == "__main__":
    main()
