"""Run every benchmark once, one after the other, and write bench/results.md.

    make bench                      # OMP_NUM_THREADS from the Makefile; ~15-20 min on 2 cores
    OMP_NUM_THREADS=2 .venv/bin/python bench/report.py
    make bench BENCH_ARGS="--quick --out /tmp/results.md"    # a smoke run, ~3 min

Each script runs as a subprocess with `--json` (and `--quick` when asked), in the order of
SCRIPTS, then OPTIONAL where the file exists; its output goes by as it runs. results.md gets
the machine (CPU, threads, load, versions), a summary of the ratios the project tracks, each
beside the fraction of the measured matmul rate (bench/flops.py) that it reaches, and one
section per run: its table, notes and the command that reproduces it. A script that fails
gets its exit status and the end of its output instead; the others still run. `--json`
keeps every script's results in one file.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
from harness import ROOT, markdown_table, parser

from difusion.machine import cpu_model

BENCH = Path(__file__).resolve().parent
SCRIPTS = [  # (script, arguments)
    ("flops.py", []),
    ("unet.py", []),
    ("unet.py", ["--cond"]),
    ("sd_unet.py", []),
    ("sd_unet.py", ["--precision", "bf16"]),
    ("sd_unet.py", ["--precision", "bf16-weights"]),
    ("train_loop.py", []),
    ("pipeline.py", []),
    ("openvino_peer.py", []),
    ("sampler_overhead.py", []),
]
OPTIONAL = [("loader.py", []), ("generation.py", [])]  # run when present


def run_script(script: str, args: list[str], json_path: Path, quick: bool) -> dict:
    """Run one script, echoing its output: its JSON, and if it fails, why and the end of its
    output."""
    cmd = [sys.executable, str(BENCH / script), *args, "--json", str(json_path)]
    cmd += ["--quick"] if quick else []
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    tail: deque[str] = deque(maxlen=30)
    t0 = time.monotonic()
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
    res = {"script": script, "title": f"{script} {' '.join(args)}".strip()}
    if json_path.is_file():  # a script may fail after writing its results (a failed check)
        res = json.loads(json_path.read_text())
    res["seconds"] = time.monotonic() - t0
    if proc.returncode or "table" not in res:
        res["failed"] = f"exit status {proc.returncode}" if proc.returncode else "no results"
        res["output"] = "".join(tail)
    return res


def records(results: list[dict]) -> list[dict]:
    """The records of the scripts that succeeded."""
    return [r for res in results if "failed" not in res for r in res.get("records", [])]


def git_version() -> str:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "--", "src") else "")


def machine(load_start: float, load_end: float) -> str:
    blas = "mkl" if torch.backends.mkl.is_available() else "other"
    onednn = torch.backends.mkldnn.is_available()
    rows = [
        ["CPU", cpu_model()],
        ["cores online", os.cpu_count()],
        ["threads", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                    f"torch.get_num_threads() = {torch.get_num_threads()}"],
        ["load average (1 min)", f"{load_start:.2f} at the start, {load_end:.2f} at the end"],
        ["Python", platform.python_version()],
        ["torch", f"{torch.__version__} (BLAS: {blas}, oneDNN: {'yes' if onednn else 'no'})"],
        ["diffusers", importlib.metadata.version("diffusers")],
        ["difusion", git_version()],
    ]  # fmt: skip
    return markdown_table(["", ""], rows)


def matmul_rates(results: list[dict]) -> dict[str, float]:
    """GFLOP/s by precision, as bench/flops.py measured it."""
    rates = (r for r in records(results) if r.get("kind") == "matmul_rate")
    return {r["precision"]: r["gflops_per_s"] for r in rates}


def rates_line(results: list[dict]) -> str:
    rates = matmul_rates(results)
    if not rates:
        return "not measured: bench/flops.py failed"
    return ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())


def versus(r: dict) -> list[tuple[str, str, float, float]]:
    """The summary's rows for an ours-vs-peer record (diffusers or OpenVINO): name, output
    difference, our seconds and the other side's; none for a kind the summary does not
    track. Against OpenVINO, eager and compiled, each against OpenVINO's fastest conversion."""
    kind = r.get("kind")
    if kind == "unet_train_step":
        name = f"training step, ours / diffusers' {r['model']} (batch {r['batch']})"
        return [(name, f"{r['rel_err']:.0e} (max rel.)", r["ours_s"], r["diffusers_s"])]
    if kind == "pipeline":
        name = f"Pipeline / diffusers ({r['batch']} images, {r['steps']} steps)"
        diff = f"{r['max_abs_diff']:.0e} max, {r['mean_abs_diff']:.0e} mean (abs.)"
        return [(name, diff, r["ours_s"], r["diffusers_s"])]
    if kind == "sd15_unet_step":
        name = f"SD 1.5 U-Net step, ours / diffusers (4x{r['size']}x{r['size']})"
        return [(name, f"{r['rel_err']:.0e} (rel. norm)", r["ours_s"], r["diffusers_s"])]
    if kind == "openvino_unet_step":
        best = min(r["variants"].values(), key=lambda v: v["seconds"])
        return [
            (f"SD 1.5 U-Net step, ours{how} / OpenVINO (4x{r['size']}x{r['size']})",
             f"{r[err]:.0e} / {best['rel_err']:.0e} (rel. to diffusers fp32)", r[s], best["seconds"])
            for how, s, err in (("", "ours_s", "ours_rel_err"),
                                (" compiled", "ours_compiled_s", "ours_compiled_rel_err"))
        ]  # fmt: skip
    if kind == "openvino_pipeline":
        return [
            (f"{how}Pipeline / its U-Net in OpenVINO ({r['batch']} images, {r['steps']} steps)",
             f"{r[diff]:.0e} / {r['openvino_from_fp32']:.0e} mean (abs., to fp32)", r[s],
             r["openvino_s"])
            for how, s, diff in (("", "ours_s", "ours_from_fp32"),
                                 ("compiled ", "ours_compiled_s", "ours_compiled_from_fp32"))
        ]  # fmt: skip
    return []


def summary(results: list[dict]) -> str:
    """The tracked ratios (of throughput: above 1, the first named is faster), each beside
    the fraction of the measured matmul rate that each side reaches."""
    rates = matmul_rates(results)

    def pct(flops_per_s: float, precision: str) -> str:
        rate = rates.get(precision)
        return f"{100 * flops_per_s / (rate * 1e9):.0f}%" if rate else "n/a"

    rows = []
    for r in records(results):
        kind, prec = r.get("kind"), r.get("precision", "")
        weights = kind in ("pipeline", "openvino_pipeline") or r.get("weights") == "bf16"
        shown = {"bf16": "bf16 weights" if weights else "bf16 autocast"}.get(prec, prec)
        if kind == "train_loop":
            flops = r["flops"] / r["batch"]  # per image
            loop, bare = r["loop_images_per_s"], r["bare_images_per_s"]
            name = "training loop / bare step (images/s)"
            rows.append([name, shown, f"{loop / bare:.2f}", pct(flops * loop, prec),
                         pct(flops * bare, prec), ""])  # fmt: skip
        for name, diff, ours, theirs in versus(r):
            rows.append([name, shown, f"{theirs / ours:.2f}", pct(r["flops"] / ours, prec),
                         pct(r["flops"] / theirs, prec), diff])  # fmt: skip
    headers = ["ratio", "precision", "value", "ours: % of matmul rate",
               "other side: % of matmul rate", "output difference"]  # fmt: skip
    return markdown_table(headers, rows)


def section(res: dict) -> str:
    parts = [f"## {res['title']}\n"]
    if "table" in res:
        parts += [f"{res['table']}\n", *(f"{n}\n" for n in res.get("notes", []))]
        parts.append(f"Reproduce: `{res['command']}` ({res['seconds']:.0f} s)\n")
    if "failed" in res:
        parts.append(f"Failed ({res['failed']}); the end of its output:\n")
        parts.append(f"```\n{res['output']}```\n")
    return "\n".join(parts)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, default=BENCH / "results.md")
    args = p.parse_args()
    runs = SCRIPTS + [(s, a) for s, a in OPTIONAL if (BENCH / s).is_file()]
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_script(script, a, Path(tmp) / f"{i:02d}.json", args.quick)
            for i, (script, a) in enumerate(runs)
        ]
    minutes = (time.monotonic() - t0) / 60
    quick = " with `--quick` (smoke sizes: the numbers mean nothing)" if args.quick else ""
    parts = [
        "# difusion benchmarks\n",
        f"One run of `bench/report.py`{quick}, started {started:%Y-%m-%d %H:%M} UTC, "
        f"{minutes:.0f} minutes. Each comparison below ran alone, one after the other, on "
        "this machine; other work on it at the time slows every number (see the load).\n",
        "## Machine\n",
        machine(load_start, os.getloadavg()[0]) + "\n",
        "## Summary\n",
        "Ratios of throughput (images or steps per second): above 1, the first named is "
        "faster. % of matmul rate: the FLOPs a second each side reaches (matmuls, convolutions "
        "and attention; bench/flops.py counts them) over the machine's measured matmul rate at "
        f"that precision ({rates_line(results)}; bf16 autocast against the bf16 rate). Above "
        "100%: the model's kernels outran the one square matmul measured.\n",
        summary(results) + "\n",
        *(section(res) for res in results),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(parts))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"started": f"{started:%Y-%m-%dT%H:%M}Z", "results": results}, indent=1)
            + "\n"
        )
    failed = [res["title"] for res in results if "failed" in res]
    print(f"\nwrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
