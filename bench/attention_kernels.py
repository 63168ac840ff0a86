"""The float32 attention of SD 1.5's U-Net, one call each: our attention kernel
(`nn/cpu_attention.py`, what our U-Net runs eager and compiled on a CPU with AVX512-BF16) and
PyTorch's `scaled_dot_product_attention` (its CPU flash attention, what it runs elsewhere)
against OpenVINO's MatMul-Softmax-MatMul, which its CPU plugin fuses into one attention
kernel, on the same queries, keys and values.

The frozen profile (`openvino_peer.py --profile`) leaves attention as the one kind of kernel
where OpenVINO's f32 step is clearly faster; this times it at full size, where attention's
share grows with the square of the tokens. Shapes are batch 2, 8 heads, (queries, keys, head
dim), and how many times one U-Net step runs each.

    OMP_NUM_THREADS=2 .venv/bin/python bench/attention_kernels.py [--reps 5]
"""

import functools

import numpy as np
import torch
import torch.nn.functional as F
from harness import KernelCalls, kernel_bench
from openvino import Model
from openvino import opset13 as ops
from openvino_peer import compile_cpu

from difusion.nn import cpu_attention

BATCH, HEADS = 2, 8
SHAPES = {  # (queries, keys, head dim): per step; 5 transformer blocks a level, 1 in the middle
    (4096, 4096, 40): 5,
    (1024, 1024, 80): 5,
    (256, 256, 160): 5,
    (64, 64, 160): 1,
    (4096, 77, 40): 5,  # cross-attention to the text
    (1024, 77, 80): 5,
    (256, 77, 160): 5,
    (64, 77, 160): 1,
}


def tokens(n: int, d: int) -> torch.Tensor:
    """[batch, heads, n, d] as our attention makes it: a transposed view of [batch, n, heads * d]."""
    return torch.randn(BATCH, n, HEADS, d).transpose(1, 2)


def openvino_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    params = [ops.parameter(list(t.shape), np.float32) for t in (q, k, v)]
    scale = ops.constant(np.float32(q.shape[-1] ** -0.5))
    scores = ops.multiply(ops.matmul(params[0], params[1], False, True), scale)
    out = ops.matmul(ops.softmax(scores, -1), params[2], False, False)
    request = compile_cpu(Model([out], params), "f32").create_infer_request()
    inputs = {i: t.contiguous().numpy() for i, t in enumerate((q, k, v))}
    return lambda: torch.from_numpy(request.infer(inputs, share_inputs=True)[0])


def kernels(n: int, m: int, d: int) -> tuple[KernelCalls, torch.Tensor]:
    q, k, v = tokens(n, d), tokens(m, d), tokens(m, d)
    fns = {
        "ours": functools.partial(cpu_attention.attention, q, k, v),
        "PyTorch SDPA": functools.partial(F.scaled_dot_product_attention, q, k, v),
        "OpenVINO": openvino_attention(q, k, v),
    }
    return fns, F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()


def main() -> None:
    if not cpu_attention.kernel():
        raise SystemExit("our attention kernel needs a CPU with AVX512-BF16 and a C++ compiler")
    kernel_bench(__doc__, SHAPES, kernels, "queries x keys x head dim", "attention", reps=5)


if __name__ == "__main__":
    main()
