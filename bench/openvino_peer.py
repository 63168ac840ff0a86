"""OpenVINO as a peer: the same U-Net converted from diffusers, against ours, on the CPU.

    OMP_NUM_THREADS=2 .venv/bin/python bench/openvino_peer.py           # SD 1.5's U-Net, 4x64x64
    OMP_NUM_THREADS=2 .venv/bin/python bench/openvino_peer.py --size 32  # quicker: 4x32x32
    OMP_NUM_THREADS=2 .venv/bin/python bench/openvino_peer.py --quick    # a tiny U-Net, smoke run
    OMP_NUM_THREADS=2 .venv/bin/python bench/openvino_peer.py --profile --size 32  # where it goes

(Not `openvino.py`: a script of that name would shadow the package it imports.)

The U-Net step: diffusers' UNet2DConditionModel with SD 1.5's config and bench/sd_unet.py's
weights and inputs (batch 2, a 77x768 context, t = 981) is converted with
`openvino.convert_model` and compiled for the CPU with as many threads as torch uses and the
latency hint, at f32 and at bf16 (`INFERENCE_PRECISION_HINT`). OpenVINO's bf16 rounds the
timestep to bf16 before the sinusoid (981 becomes 980, and the sinusoid's fast frequencies
turn by radians), so a third variant is converted with the sinusoid as its input: computed
in float32 outside the graph, as our U-Net keeps it in float32 under bf16 (diffusers casts
it to the weights' dtype after the sinusoid, as this variant does inside the graph).
Before anything is timed, each conversion is checked against diffusers' fp32 output at f32
(relative error |y - y_ref| / |y_ref| below 1e-3), and a conversion that fails is refused.

Each implementation runs in its own process, so that its peak memory (getrusage's maxrss,
from start to its last step; OpenVINO's processes read the converted model from disk, as a
deployment would, so conversion is not in their peak) is its own; the parent interleaves
their steps, one step of each in turn, so that load from elsewhere hits them alike. fp32 (ours
in float32 against OpenVINO f32) and bf16 (ours with bf16 weights against OpenVINO's two bf16
variants) run one after the other, each group's processes side by side.

The Pipeline: the shipped model's `Pipeline.sample` (20 steps of DPM-Solver++(2M), its
weights without the layout map, which diffusers' U-Net cannot hold; bench/twins.py) against
the same sampling loop with that U-Net converted to OpenVINO through diffusers'
(`OpenVINOUNet`, the sinusoid fed in as above), interleaved in one process, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openvino as ov
import torch
from harness import DTYPES, markdown_table, median_times, parser, report, unet_flops
from sd_unet import SD15_UNET, build, rss_mib, step_inputs
from torch import nn

from difusion.frozen import compile_frozen
from difusion.nn.unet import UNetConfig, timestep_embedding

TINY_UNET = {  # SD 1.5's U-Net shrunk for smoke runs and tests: every kind of block, 2 levels
    **SD15_UNET,
    "block_out_channels": [32, 64],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TIMESTEP = 981.0
CHECK_TOLERANCE = 1e-3  # a correct conversion at f32 is within ~1e-5 of diffusers' fp32
VARIANTS = {  # name: (conversion, OpenVINO precision)
    "OpenVINO f32": ("timestep", "f32"),
    "OpenVINO bf16": ("timestep", "bf16"),
    "OpenVINO bf16, sinusoid fed in f32": ("sinusoid", "bf16"),
}
OURS = {  # name: (weights' dtype, compiled: torch.compile with Inductor's freezing)
    "ours fp32": (torch.float32, False),
    "ours fp32, compiled": (torch.float32, True),
    "ours bf16 weights": (torch.bfloat16, False),
    "ours bf16 weights, compiled": (torch.bfloat16, True),
}
DIFFUSERS = {"diffusers fp32": torch.float32, "diffusers bf16 weights": torch.bfloat16}
GROUPS = {  # each group's processes live side by side: its memory must fit the machine
    "fp32": ["ours fp32", "ours fp32, compiled", "OpenVINO f32"],
    "bf16": ["ours bf16 weights", "ours bf16 weights, compiled", "OpenVINO bf16",
             "OpenVINO bf16, sinusoid fed in f32"],
    "diffusers": list(DIFFUSERS),
}  # fmt: skip


class Traceable(nn.Module):
    """diffusers' U-Net as a function of tensors only, for `convert_model`: (latents,
    timestep [B] or, with `sinusoid`, its sinusoid [B, C0], context[, context mask]) ->
    prediction."""

    def __init__(self, unet: nn.Module, sinusoid: bool) -> None:
        super().__init__()
        self.unet, self.sinusoid = unet, sinusoid

    def forward(self, x, t, context, mask=None) -> torch.Tensor:
        if not self.sinusoid:
            return self.unet(x, t, context, encoder_attention_mask=mask, return_dict=False)[0]
        # the sinusoid comes in where diffusers would compute it, for this call only
        self.unet.get_time_embed = lambda sample, timestep: timestep.to(sample.dtype)
        try:
            return self.unet(x, t, context, encoder_attention_mask=mask, return_dict=False)[0]
        finally:
            del self.unet.get_time_embed


def sinusoid(t: torch.Tensor, config: dict) -> torch.Tensor:
    """The timestep's sinusoidal embedding in float32, as diffusers' `time_proj` makes it."""
    c0 = config["block_out_channels"][0]
    return timestep_embedding(t, c0, config["flip_sin_to_cos"], config["freq_shift"])


def convert(
    unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, conversion: str,
    config: dict, mask: torch.Tensor | None = None,
) -> ov.Model:  # fmt: skip
    """diffusers' `unet` as an OpenVINO model, its timestep input the timestep itself
    ("timestep") or its sinusoid ("sinusoid"); with `mask`, a context-mask input too."""
    time_input = sinusoid(t, config) if conversion == "sinusoid" else t
    example = (x, time_input, context) + (() if mask is None else (mask,))
    with torch.no_grad():
        return ov.convert_model(Traceable(unet, conversion == "sinusoid"), example_input=example)


def compile_cpu(model: ov.Model | str, precision: str, profile: bool = False) -> ov.CompiledModel:
    """`model` compiled for the CPU as the comparison runs it: torch's thread count, the
    latency hint, `precision` ("f32" or "bf16") for inference."""
    config = {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
        "PERF_COUNT": profile,
    }
    return ov.Core().compile_model(model, "CPU", config)


def openvino_step(
    compiled: ov.CompiledModel, conversion: str, config: dict, x, t, context
) -> Callable[[], torch.Tensor]:
    """One denoising step of `compiled` on these inputs (the sinusoid made each step)."""
    request = compiled.create_infer_request()

    def step() -> torch.Tensor:
        time_input = sinusoid(t, config) if conversion == "sinusoid" else t
        request.infer([x.numpy(), time_input.numpy(), context.numpy()])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return step


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def check(y: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """The relative error of `y` against diffusers' fp32 output `ref`; refuses (ValueError)
    a conversion whose f32 output is further than CHECK_TOLERANCE from it."""
    if y.shape != ref.shape:
        raise ValueError(f"{what}: output shape {tuple(y.shape)}, diffusers' {tuple(ref.shape)}")
    err = relative_error(y, ref)
    if not err <= CHECK_TOLERANCE:  # also NaN
        raise ValueError(
            f"{what}: f32 output differs from diffusers' fp32 by {err:.1e} (relative, more "
            f"than {CHECK_TOLERANCE:.0e}): the conversion is wrong, not timing it"
        )
    return err


def convert_checked(config: dict, size: int, out: Path) -> dict[str, float]:
    """Convert diffusers' U-Net both ways, check each at f32 against diffusers' fp32 output
    (saved as out/reference.pt) and save it as out/CONVERSION.xml with f32 weights; the f32
    errors by conversion."""
    x, context = step_inputs(size, config)
    t = torch.full((2,), TIMESTEP)
    unet = build("diffusers", config)
    with torch.no_grad():
        ref = Traceable(unet, sinusoid=False)(x, t, context)
    torch.save(ref, out / "reference.pt")
    errors = {}
    for conversion in ("timestep", "sinusoid"):
        model = convert(unet, x, t, context, conversion, config)
        step = openvino_step(compile_cpu(model, "f32"), conversion, config, x, t, context)
        errors[conversion] = check(step(), ref, f"OpenVINO ({conversion} input)")
        ov.save_model(model, out / f"{conversion}.xml", compress_to_fp16=False)
    return errors


def worker(impl: str, config: dict, size: int, out: Path) -> None:
    """One implementation in this process: build it, then run a step at each line on stdin
    ("step"), answering its seconds on stdout; at "done", write its error against diffusers'
    fp32 and its memory to out/IMPL.json."""
    x, context = step_inputs(size, config)
    t = torch.full((2,), TIMESTEP)
    if impl in OURS:
        dtype, frozen = OURS[impl]
        model = build("ours", config).to(dtype)
        x, context = x.to(dtype), context.to(dtype)
        if frozen:  # compiled with frozen weights, as Pipeline.compile does on a CPU
            compile_frozen(model)

        def step() -> torch.Tensor:
            with torch.no_grad():
                return model(x, t, context=context)
    elif impl in DIFFUSERS:
        model = build("diffusers", config).to(DIFFUSERS[impl])
        x, context = x.to(DIFFUSERS[impl]), context.to(DIFFUSERS[impl])

        def step() -> torch.Tensor:
            with torch.no_grad():
                return model(x, t, context, return_dict=False)[0]
    else:
        conversion, precision = VARIANTS[impl]
        compiled = compile_cpu(str(out / f"{conversion}.xml"), precision)
        step = openvino_step(compiled, conversion, config, x, t, context)
    loaded = rss_mib()
    t0 = time.perf_counter()
    y = step()  # the warm-up step (and the compilation)
    first = time.perf_counter() - t0
    err = relative_error(y, torch.load(out / "reference.pt", weights_only=True))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        step()
        print(f"seconds {time.perf_counter() - t0}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"rel_err": err, "loaded_mib": loaded, "peak_mib": peak, "first_step_s": first}
    (out / f"{impl}.json").write_text(json.dumps(result))


def answer(proc: subprocess.Popen, word: str) -> str:
    """The next line of `proc`'s output that starts with `word` (libraries print too)."""
    for line in proc.stdout:
        if line.startswith(word):
            return line[len(word) :].strip()
    raise RuntimeError(f"a worker ended before answering {word!r} (exit {proc.wait()})")


def run_group(impls: list[str], args, out: Path) -> dict[str, dict]:
    """Start one worker per implementation, interleave their timed steps, collect results."""
    procs = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--worker", impl, "--size", str(args.size)]
        cmd += ["--out", str(out)] + (["--quick"] if args.quick else [])
        procs[impl] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
        )
        answer(procs[impl], "ready")  # one at a time: builds and warm-ups do not overlap
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(args.reps):
        for impl, proc in procs.items():
            proc.stdin.write("step\n")
            proc.stdin.flush()
            times[impl].append(float(answer(proc, "seconds")))
    results = {}
    for impl, proc in procs.items():
        proc.stdin.write("done\n")
        proc.stdin.close()
        if proc.wait():
            raise RuntimeError(f"{impl}: worker failed (exit {proc.returncode})")
        results[impl] = json.loads((out / f"{impl}.json").read_text())
        results[impl]["seconds"] = statistics.median(times[impl])
    return results


class OpenVINOUNet(nn.Module):
    """A U-Net converted to OpenVINO (through diffusers', `convert(..., "sinusoid", mask=)`)
    as our sampling loop calls a U-Net: (x, t, context, context_mask) -> prediction."""

    def __init__(self, compiled: ov.CompiledModel, config: dict) -> None:
        super().__init__()
        self.request = compiled.create_infer_request()
        self.config = config

    def forward(self, x, t, context, context_mask=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])
        mask = torch.ones(context.shape[:2]) if context_mask is None else context_mask.float()
        inputs = [x.float(), sinusoid(t, self.config), context.float(), mask]
        self.request.infer([a.contiguous().numpy() for a in inputs])
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def pipeline_table(args) -> tuple[str, list[dict]]:
    """The shipped model's Pipeline against the same sampling loop on its U-Net in OpenVINO,
    fp32 and bf16: a markdown table and its records."""
    from twins import diffusers_twin, without_layout_map

    from difusion import Pipeline
    from difusion.alignment import prompt_set
    from difusion.model import DiffusionModel

    prompts = prompt_set(args.batch // 2, args.batch - args.batch // 2, seed=0)
    latents = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = Pipeline(without_layout_map(Pipeline.from_pretrained("default").model))
    config = ours.model.config.unet.to_diffusers_kwargs()
    cond, uncond = ours.conditions(prompts)
    x, context = latents.repeat(2, 1, 1, 1), torch.cat([uncond["context"], cond["context"]])
    mask, t = torch.ones(context.shape[:2]), torch.full((x.shape[0],), TIMESTEP)
    twin = diffusers_twin(ours.model.unet).eval()
    with torch.no_grad():
        ref = Traceable(twin, sinusoid=False)(x, t, context, mask)
    model = convert(twin, x, t, context, "sinusoid", config, mask)
    check(OpenVINOUNet(compile_cpu(model, "f32"), config)(x, t, context), ref, "OpenVINO twin")
    kw = dict(steps=args.steps, sampler="dpmpp_2m", latents=latents)
    reference = ours.sample(prompts, **kw)
    flops = args.steps * unet_flops(ours.model.config.unet, 2 * args.batch, 32, context.shape[1])
    rows, records = [], []
    for precision, ov_precision in (("fp32", "f32"), ("bf16", "bf16")):
        mine = Pipeline(without_layout_map(ours.model)).to(dtype=DTYPES[precision])
        built = copy.deepcopy(mine.model)
        fast = Pipeline(built).to(dtype=DTYPES[precision]).compile()
        unet = OpenVINOUNet(compile_cpu(model, ov_precision), config)
        theirs = Pipeline(DiffusionModel(ours.model.config, unet, ours.model.text_encoder))
        runs = {"ours": lambda p=mine: p.sample(prompts, **kw),
                "compiled": lambda p=fast: p.sample(prompts, **kw),
                "openvino": lambda p=theirs: p.sample(prompts, **kw)}  # fmt: skip
        t0 = time.perf_counter()
        diff = {k: (run() - reference).abs().mean().item() for k, run in runs.items()}
        first = time.perf_counter() - t0  # with the compilation
        times = median_times(runs, args.warmup, args.reps)
        o, c, v = times["ours"], times["compiled"], times["openvino"]
        records.append({"kind": "openvino_pipeline", "precision": precision, "batch": args.batch,
                        "steps": args.steps, "ours_s": o, "ours_compiled_s": c, "openvino_s": v,
                        "flops": flops, "ours_from_fp32": diff["ours"],
                        "ours_compiled_from_fp32": diff["compiled"],
                        "openvino_from_fp32": diff["openvino"], "first_runs_s": first})  # fmt: skip
        rows.append([precision, f"{args.batch / o:.2f}", f"{args.batch / c:.2f}",
                     f"{args.batch / v:.2f}", f"{v / c:.2f}",
                     f"{diff['ours']:.1e} / {diff['compiled']:.1e} / {diff['openvino']:.1e}"])  # fmt: skip
    headers = ["precision", "Pipeline images/s", "compiled Pipeline images/s",
               "OpenVINO U-Net images/s", "OpenVINO/compiled (time)",
               "ours / compiled / OpenVINO vs ours fp32: mean abs diff"]  # fmt: skip
    return markdown_table(headers, rows), records


# what each kernel is, in both profiles: torch's op names and OpenVINO's node types. OpenVINO
# fuses each attention (MatMul, Softmax, MatMul) into one "Subgraph" node (its snippets; 32 in
# SD 1.5: 16 transformer blocks, self and cross), GroupNorm and LayerNorm into MVN nodes.
PROFILE_KINDS = {  # a kernel counts for the first kind whose names it holds
    "fused element-wise (Inductor)": ("cpp_fused",),
    "convolution": ("convolution", "Convolution"),
    "norms": ("group_norm", "layer_norm", "GroupNorm", "MVN"),
    "attention": ("scaled_dot_product", "flash_attention", "cpu_attention", "bf16_attention",
                  "f32_attention", "softmax", "bmm",
                  "ScaledDotProductAttention", "Softmax", "Subgraph"),
    "matmul": ("addmm", "aten::mm", "aten::linear", "aten::matmul", "_linear", "MatMul",
               "FullyConnected"),
    "reorders and copies": ("copy_", "_to_copy", "contiguous", "clone", "Reorder", "Transpose",
                            "Reshape", "Concat", "Interpolate", "Gather"),
}  # fmt: skip


def kind_of(name: str) -> str:
    return next((k for k, keys in PROFILE_KINDS.items() if any(n in name for n in keys)), "other")


def profile(args) -> None:
    """One step of ours, eager and compiled (torch.profiler), and of OpenVINO (its performance
    counters) at f32, each kernel's own time summed by kind; OpenVINO's slowest node types
    listed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    config = TINY_UNET if args.quick else SD15_UNET
    x, context = step_inputs(args.size, config, args.batch)
    t = torch.full((args.batch,), TIMESTEP)
    torch._inductor.config.cpp.enable_kernel_profile = True  # the fused kernels, by name
    ours = build("ours", config)
    profiles, kinds, ours_s = {}, {}, {}
    for variant in ("ours", "ours, compiled"):
        if variant == "ours, compiled":
            compile_frozen(ours)
        with torch.no_grad():
            ours(x, t, context=context)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                ours(x, t, context=context)
                ours_s[variant] = time.perf_counter() - t0
        kinds[variant] = by_kind = {}
        for e in prof.key_averages():
            kind = kind_of(e.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total / 1e6
        profiles[variant] = prof
    del ours
    model = convert(build("diffusers", config), x, t, context, "timestep", config)
    request = compile_cpu(model, "f32", profile=True).create_infer_request()
    request.infer([x.numpy(), t.numpy(), context.numpy()])
    t0 = time.perf_counter()
    request.infer([x.numpy(), t.numpy(), context.numpy()])
    ov_s = time.perf_counter() - t0
    theirs: dict[str, float] = {}
    by_type: dict[str, list[float]] = {}
    for info in request.get_profiling_info():
        secs = info.real_time.total_seconds()
        theirs[kind_of(info.node_type)] = theirs.get(kind_of(info.node_type), 0.0) + secs
        key = f"{info.node_type} ({info.exec_type})"
        by_type[key] = [by_type.get(key, [0, 0])[0] + secs, by_type.get(key, [0, 0])[1] + 1]
    rows = [[k, *(f"{kinds[v].get(k, 0):.3f}" for v in kinds), f"{theirs.get(k, 0):.3f}"]
            for k in [*PROFILE_KINDS, "other"]]  # fmt: skip
    rows.append(["step (wall clock)", *(f"{s:.3f}" for s in ours_s.values()), f"{ov_s:.3f}"])
    print(
        f"\nf32, batch {args.batch}, 4x{args.size}x{args.size}, {torch.get_num_threads()} threads"
    )
    print(markdown_table(["kernels (own time, s)", *kinds, "OpenVINO f32"], rows))
    for variant, prof in profiles.items():
        print(
            f"\n{variant}\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        )
    top = sorted(by_type.items(), key=lambda kv: -kv[1][0])[:15]
    print("\n" + markdown_table(["OpenVINO node type (kernel)", "s", "nodes"],
                                [[k, f"{s:.3f}", n] for k, (s, n) in top]))  # fmt: skip


def unet_table(args, out: Path) -> tuple[list[str], list[list], list[dict], list[str]]:
    """The U-Net step of every implementation, each group's processes interleaved."""
    config = TINY_UNET if args.quick else SD15_UNET
    cmd = [sys.executable, __file__, "--worker", "convert", "--size", str(args.size)]
    subprocess.run(cmd + ["--out", str(out)] + (["--quick"] if args.quick else []), check=True)
    checked = json.loads((out / "convert.json").read_text())
    res = {}
    for impls in GROUPS.values():
        res.update(run_group(impls, args, out))
    flops = unet_flops(UNetConfig.from_diffusers_config(config), 2, args.size, 77)
    rows = [[impl, f"{r['seconds']:.2f}", f"{r['first_step_s']:.1f}", f"{r['rel_err']:.1e}",
             f"{r['loaded_mib']:,.0f} MiB", f"{r['peak_mib']:,.0f} MiB"]
            for impl, r in res.items()]  # fmt: skip
    records = []
    for precision, diffusers in zip(("fp32", "bf16"), DIFFUSERS, strict=True):
        impls = GROUPS[precision]
        (eager, compiled), theirs = (
            [k for k in impls if k in OURS],
            [k for k in impls if k not in OURS],
        )
        rec = {"kind": "openvino_unet_step", "precision": precision, "weights": precision,
               "batch": 2, "size": args.size, "flops": flops, "ours_s": res[eager]["seconds"],
               "ours_rel_err": res[eager]["rel_err"], "ours_peak_mib": res[eager]["peak_mib"],
               "ours_compiled_s": res[compiled]["seconds"],
               "ours_compiled_rel_err": res[compiled]["rel_err"],
               "ours_compiled_peak_mib": res[compiled]["peak_mib"],
               "ours_compile_s": res[compiled]["first_step_s"] - res[eager]["first_step_s"],
               "openvino_s": res[theirs[0]]["seconds"],
               "openvino_rel_err": res[theirs[0]]["rel_err"],
               "openvino_peak_mib": res[theirs[0]]["peak_mib"],
               "diffusers_s": res[diffusers]["seconds"],
               "diffusers_rel_err": res[diffusers]["rel_err"],
               "variants": {k: res[k] for k in theirs}}  # fmt: skip
        records.append(rec)
    notes = [
        "conversions checked at f32 before timing: relative error against diffusers' fp32 "
        + ", ".join(f"{k} input {v:.1e}" for k, v in checked.items()),
        f"median of {args.reps} steps after one warm-up, each implementation in its own "
        "process, the processes of a precision (and diffusers' two) interleaved step by "
        "step; peak RSS: getrusage's "
        "maxrss of that process (OpenVINO's read the converted model from disk: conversion "
        f"not included); {flops / 1e9:.1f} GFLOP a step; the first step of a compiled U-Net "
        "includes its compilation (Inductor, freezing: Pipeline.compile on a CPU)",
    ]
    headers = ["", "s/step", "first step (s)", "error vs diffusers fp32", "RSS loaded", "peak RSS"]
    return headers, rows, records, notes


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=2, help="timed steps / generations after warm-up")
    p.add_argument("--size", type=int, help="latent size (default 64: 512x512; profile 32)")
    p.add_argument("--batch", type=int, help="images of the Pipeline (16); profile: batch (1)")
    p.add_argument("--steps", type=int, default=20, help="the Pipeline's sampling steps")
    p.add_argument("--profile", action="store_true", help="profile one f32 step of each")
    p.add_argument("--no-pipeline", action="store_true", help="the U-Net step only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.warmup = 1
    if args.size is None:
        args.size = 16 if args.quick else 32 if args.profile else 64
    if args.batch is None:
        args.batch = 1 if args.profile else 2 if args.quick else 16
    if args.quick:
        args.reps, args.steps = 1, 3
    config = TINY_UNET if args.quick else SD15_UNET
    if args.worker == "convert":
        errors = convert_checked(config, args.size, args.out)
        (args.out / "convert.json").write_text(json.dumps(errors))
        return
    if args.worker:
        worker(args.worker, config, args.size, args.out)
        return
    if args.profile:
        profile(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        headers, rows, records, notes = unet_table(args, Path(tmp))
    if not args.no_pipeline:
        pipe, pipe_records = pipeline_table(args)
        records += pipe_records
        notes.append(
            f"The shipped model's Pipeline ({args.batch} images, {args.steps} steps of "
            f"DPM-Solver++(2M), its weights without the layout map) against the same loop with "
            f"its U-Net in OpenVINO, median of {args.reps} after {args.warmup}, interleaved; "
            "images in [-1, 1], their distance from ours in fp32:\n\n" + pipe
        )
    shown = "tiny U-Net (--quick)" if args.quick else "SD 1.5 U-Net, 860M parameters"
    title = (
        f"OpenVINO {ov.__version__.split('-')[0]} vs ours, same weights: {shown}, batch 2, "
        f"4x{args.size}x{args.size}, context 77x{config['cross_attention_dim']}, t = "
        f"{TIMESTEP:g}, {torch.get_num_threads()} threads"
    )
    report(args, title, headers, rows, records, notes)


if __name__ == "__main__":
    main()
