"""What the benchmark scripts share: their two options, interleaved timing, and one way to
report (a markdown table, the command that made it, and with `--json PATH` the same as JSON
for `bench/report.py`).

A script's JSON: {"script", "title", "command", "threads", "table", "notes", "records"};
`records` are its measurements as flat dicts. Those `bench/report.py` puts in its summary
name their `kind` and hold seconds and FLOPs, so that the report can set each beside the
machine's measured matmul rate (see `bench/flops.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from difusion.nn.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark script takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: small sizes, few reps")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    return p


def command(argv: Sequence[str] | None = None) -> str:
    """The command line that reproduces this run (without --json), from the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    script_arg = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else str(script)
    args, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            args.append(a)
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + shlex.join([".venv/bin/python", script_arg, *args])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of the fastest of `reps` n x n by n x n matmuls, after one warm-up: other
    work on the machine only ever slows a matmul down."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b)) for _ in range(reps)) / 1e9


def median_times(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    reps: int,
    summary: Callable[[list[float]], float] = statistics.median,
) -> dict[str, float]:
    """Median (or `summary`, e.g. min) seconds of each function over `reps` calls after
    `warmup`, the functions interleaved so that load from elsewhere on the machine hits them
    alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            dt = timed(fn)
            if i >= warmup:
                times[name].append(dt)
    return {name: summary(ts) for name, ts in times.items()}


KernelCalls = dict[str, Callable[[], torch.Tensor]]


def kernel_table(
    shapes: dict[tuple[int, ...], int],
    kernels: Callable[..., tuple[KernelCalls, torch.Tensor]],
    reps: int,
    shape_header: str,
    what: str,
) -> str:
    """One row per shape (with how many times a U-Net step runs it): `kernels(*shape)` gives
    the calls and their float64 reference; each call is checked against it (relative error
    under 1e-5) before it is timed, then the best of `reps` interleaved calls, in ms. The last
    row is each kernel's time over one step, in s."""
    rows, totals = [], {}
    for shape, count in shapes.items():
        fns, ref = kernels(*shape)
        for name, fn in fns.items():
            err = ((fn() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, f"{name} on {shape}: error {err:.1e}"
        best = median_times(fns, 0, reps, summary=min)
        rows.append(
            [" x ".join(map(str, shape)), count, *(f"{1e3 * t:.2f}" for t in best.values())]
        )
        for name, t in best.items():
            totals[name] = totals.get(name, 0.0) + count * t
    rows.append([f"one step's {what}, s", "", *(f"{t:.3f}" for t in totals.values())])
    return markdown_table([shape_header, "per step", *fns], rows)


def kernel_bench(
    doc: str | None,
    shapes: dict[tuple[int, ...], int],
    kernels: Callable[..., tuple[KernelCalls, torch.Tensor]],
    shape_header: str,
    what: str,
    reps: int,
) -> None:
    """A kernel script's main: its --reps (default `reps`), then `kernel_table` printed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=reps, help="timed calls a kernel (the best)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; ms per call, best of {args.reps}")
    print(kernel_table(shapes, kernels, args.reps, shape_header, what))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(
    args: argparse.Namespace,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    records: list[dict],
    notes: Sequence[str] = (),
) -> None:
    """Print the table, its notes and the command; with --json, write them and `records`."""
    table = markdown_table(headers, rows)
    cmd = command()
    print(f"\n{title}\n\n{table}\n")
    for note in notes:
        print(note)
    print(f"command: {cmd}", flush=True)
    if args.json is not None:
        out = {
            "script": Path(sys.argv[0]).name,
            "title": title,
            "command": cmd,
            "threads": torch.get_num_threads(),
            "table": table,
            "notes": list(notes),
            "records": records,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention `fn` runs (2 a multiply-add). On the
    CPU, attention's fused kernel is not counted: run `fn` on the meta device to count it."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unet_flops(
    cfg: UNetConfig,
    batch: int,
    size: int | tuple[int, int],
    context_len: int | None = None,
    train: bool = False,
) -> int:
    """FLOPs of one U-Net forward (with `train`: forward and backward) at this batch and
    size, counted on the meta device. `context_len` tokens for text-conditioned U-Nets."""
    h, w = (size, size) if isinstance(size, int) else size
    with torch.device("meta"):
        net = UNet(cfg)
        kw = {}
        if cfg.context_dim is not None:
            kw["context"] = torch.randn(batch, context_len or 1, cfg.context_dim)
        if cfg.num_classes is not None:
            kw["class_labels"] = torch.zeros(batch, dtype=torch.long)
        if cfg.time_cond_proj_dim is not None:
            kw["guidance"] = torch.ones(batch)
        x = torch.randn(batch, cfg.in_channels, h, w)
        t = torch.zeros(batch)
    net.requires_grad_(train)

    def run() -> None:
        out = net(x, t, **kw)
        if train:
            out.float().square().mean().backward()

    return count_flops(run)
