"""The float32 attention of SD 1.5's U-Net, one call each: PyTorch's
`scaled_dot_product_attention` (its CPU flash attention, what our U-Net runs eager and
compiled) against OpenVINO's MatMul-Softmax-MatMul, which its CPU plugin fuses into one
attention kernel, on the same queries, keys and values.

The frozen profile (`openvino_peer.py --profile`) leaves attention as the one kind of kernel
where OpenVINO's f32 step is clearly faster; this times it at full size, where attention's
share grows with the square of the tokens. Shapes are batch 2, 8 heads, (queries, keys, head
dim), and how many times one U-Net step runs each.

    OMP_NUM_THREADS=2 .venv/bin/python bench/attention_kernels.py [--reps 5]
"""

import argparse
import functools
import time

import numpy as np
import openvino as ov
import torch
import torch.nn.functional as F
from openvino import opset13 as ops

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
    config = {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
    }
    request = ov.Core().compile_model(ov.Model([out], params), "CPU", config).create_infer_request()
    inputs = {i: t.contiguous().numpy() for i, t in enumerate((q, k, v))}
    return lambda: torch.from_numpy(request.infer(inputs, share_inputs=True)[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    totals: dict[str, float] = {}
    print(f"{torch.get_num_threads()} threads; ms per call, best of {args.reps}")
    print(
        "| queries x keys x head dim | per step | PyTorch SDPA | OpenVINO |\n| --- | --- | --- | --- |"
    )
    for (n, m, d), count in SHAPES.items():
        q, k, v = tokens(n, d), tokens(m, d), tokens(m, d)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
        fns = {
            "PyTorch SDPA": functools.partial(F.scaled_dot_product_attention, q, k, v),
            "OpenVINO": openvino_attention(q, k, v),
        }
        for name, fn in fns.items():
            err = ((fn() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, f"{name} on {(n, m, d)}: error {err:.1e}"
        best = {name: float("inf") for name in fns}
        for _ in range(args.reps):
            for name, fn in fns.items():  # interleaved, so drift falls on both alike
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        times = " | ".join(f"{1e3 * t:.1f}" for t in best.values())
        print(f"| {n} x {m} x {d} | {count} | {times} |")
        for name, t in best.items():
            totals[name] = totals.get(name, 0.0) + count * t
    print("| one step's attention, s | | " + " | ".join(f"{t:.3f}" for t in totals.values()) + " |")


if __name__ == "__main__":
    main()
