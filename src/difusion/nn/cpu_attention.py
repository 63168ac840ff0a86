"""Attention for inference on CPUs with AVX512-BF16, in bfloat16 and float32
(csrc/cpu_attention.cpp).

PyTorch's CPU attention reaches about a quarter of such a CPU's bf16 matmul rate at Stable
Diffusion's head dim of 40; in bf16 this kernel runs both of attention's products at the
rate of the machine's dot-product instruction (bench/sd_unet.py measures the step). In
float32 it runs them as FMA register tiles with the queries along the lanes, 1.3x PyTorch's
at SD 1.5's 4096 tokens (bench/attention_kernels.py). It is built once per machine with the
C++ compiler PyTorch's extensions use (`make install` builds it; otherwise the first
generation does) into ~/.cache/difusion.
Without a compiler, on other CPUs, with `DIFUSION_ATTENTION_KERNEL=0` or under autograd,
attention is PyTorch's `scaled_dot_product_attention`. torch.compile keeps the kernel as an
opaque operator (`difusion::cpu_attention`) when it was loaded before the compilation
traced the model: `load_for` does that.

`main()` builds it and says whether it is used here (`make install` calls it).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from ..errors import first_line

SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]
STALE_LOCK_S = 600  # a build killed midway leaves torch's lock file, which would block forever
loaded = False  # what torch.compile's tracing reads: it must not build or load anything


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= set(flags)


def enabled() -> bool:
    return os.environ.get("DIFUSION_ATTENTION_KERNEL", "1") != "0"


def build_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "difusion" / f"cpu_attention-torch{torch.__version__}"


@functools.cache
def kernel() -> bool:
    """Build (once per machine) and load the kernel; False where it cannot be had."""
    if not (enabled() and sys.platform == "linux" and cpu_has_avx512_bf16()):
        return False
    from torch.utils.cpp_extension import load

    try:
        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        if not any(folder.glob("*.so")):
            print(
                "difusion: building the attention kernel for this CPU (once, about a minute)",
                file=sys.stderr,
                flush=True,
            )
        load(
            "difusion_cpu_attention",
            [str(SOURCE)],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
        )
    except Exception as e:  # no compiler, a failed build: PyTorch's attention serves instead
        print(
            f"difusion: the attention kernel could not be built ({first_line(e)}); "
            "using PyTorch's attention",
            file=sys.stderr,
            flush=True,
        )
        return False
    global loaded
    loaded = True
    return True


DTYPES = (torch.bfloat16, torch.float32)


def load_for(module: torch.nn.Module) -> bool:
    """Load the kernel if `module` computes in bf16 or f32 on a CPU, before torch.compile
    traces it."""
    p = next(module.parameters(), None)
    return p is not None and p.dtype in DTYPES and p.device.type == "cpu" and kernel()


def applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `attention` takes these (bf16 or f32 CPU tensors, inference; bf16 needs an
    even head dim)."""
    return (
        q.dtype == k.dtype == v.dtype
        and q.dtype in DTYPES
        and q.device.type == "cpu"
        and (q.dtype == torch.float32 or q.shape[-1] % 2 == 0)
        and not (
            torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        )
        and (loaded if torch.compiler.is_compiling() else kernel())
    )


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v of q [B, H, N, d], k and v [B, H, L, d], mask [B, L] (True =
    attend; a query with no key to attend to gets zeros).  Returns [B, H, N, d] as a view of
    [B, N, H, d], so that merging the heads copies nothing."""
    return cpu_attention(q, k, v, mask)


@torch.library.custom_op("difusion::cpu_attention", mutates_args=())
def cpu_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    B, H, N, d = q.shape
    out = torch.empty(B, N, H, d, dtype=q.dtype).transpose(1, 2)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    op = (
        torch.ops.difusion.bf16_attention
        if q.dtype == torch.bfloat16
        else torch.ops.difusion.f32_attention
    )
    op(q, k, v, out, mask, d**-0.5)
    return out


@cpu_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d).transpose(1, 2)


def main() -> int:
    if not enabled():
        print("attention kernel: off (DIFUSION_ATTENTION_KERNEL=0)")
    elif not cpu_has_avx512_bf16():
        print("attention kernel: this CPU lacks AVX512-BF16; PyTorch's attention is used")
    elif kernel():
        print(f"attention kernel: built in {build_dir()}")
    else:
        return 1
    return 0
