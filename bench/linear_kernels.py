"""The fp32 linear layers of SD 1.5's U-Net, one kernel each: what Inductor's freezing packs
them into (MKL's packed sgemm), oneDNN's packed inner product (what it uses for bf16), eager
`F.linear`, and OpenVINO's MatMul on the same weights.

The frozen profile (`openvino_peer.py --profile`) puts the whole remaining f32 gap to OpenVINO
in the linear layers; this times them one shape at a time, interleaved, to find the kernel
that closes it. Shapes are (rows, in, out) at batch 2, 64x64 latents, and how many times one
U-Net step runs each.

    OMP_NUM_THREADS=2 .venv/bin/python bench/linear_kernels.py [--reps 20]
"""

import numpy as np
import torch
import torch.nn.functional as F
from harness import KernelCalls, kernel_bench
from openvino import Model
from openvino import opset13 as ops
from openvino_peer import compile_cpu

# (rows, in, out): how many per U-Net step, at batch 2 (77 text tokens, 4096 latent pixels)
SHAPES = {
    # 5 transformer blocks at 64x64, 5 at 32x32, 5 at 16x16 (2 down, 3 up) and 1 at 8x8 (mid);
    # each has 6 C -> C projections (self q, k, v, out; cross q, out), GEGLU in, feed-forward out
    (8192, 320, 320): 5 * 6,
    (8192, 320, 2560): 5,
    (8192, 1280, 320): 5,
    (2048, 640, 640): 5 * 6,
    (2048, 640, 5120): 5,
    (2048, 2560, 640): 5,
    (512, 1280, 1280): 5 * 6,
    (512, 1280, 10240): 5,
    (512, 5120, 1280): 5,
    (128, 1280, 1280): 6,
    (128, 1280, 10240): 1,
    (128, 5120, 1280): 1,
    (154, 768, 320): 5 * 2,  # cross-attention k, v on the text
    (154, 768, 640): 5 * 2,
    (154, 768, 1280): 6 * 2,
}


def kernels(rows: int, k: int, n: int) -> tuple[KernelCalls, torch.Tensor]:
    x, w, b = torch.randn(rows, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    mkl_packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    onednn_packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    p = ops.parameter(list(x.shape), np.float32)
    mm = ops.matmul(p, ops.constant(w.numpy()), False, True)
    model = Model([ops.add(mm, ops.constant(b.numpy()))], [p])
    request = compile_cpu(model, "f32").create_infer_request()
    xn = x.numpy()
    fns = {
        "eager F.linear": lambda: F.linear(x, w, b),
        "MKL packed (Inductor)": lambda: torch.ops.mkl._mkl_linear(x, mkl_packed, w, b, rows),
        "oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(
            x, onednn_packed, b, "none", [], ""
        ),
        "OpenVINO MatMul": lambda: torch.from_numpy(request.infer({0: xn}, share_inputs=True)[0]),
    }
    return fns, F.linear(x.double(), w.double(), b.double()).float()


def main() -> None:
    kernel_bench(__doc__, SHAPES, kernels, "rows x in x out", "linear layers", reps=20)


if __name__ == "__main__":
    main()
