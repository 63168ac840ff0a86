"""The CPU attention kernel (bf16 and f32) against PyTorch's attention, and when it is used."""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from difusion.nn import cpu_attention
from difusion.nn.attention import Attention

needs_kernel = pytest.mark.skipif(
    not cpu_attention.kernel(), reason="no AVX512-BF16 CPU or no C++ compiler here"
)


def inputs(B, H, Lq, Lk, d, masked, gen, logit_scale=1.0, dtype=torch.bfloat16):
    # queries as the U-Net makes them: a [B, Lq, H, d] tensor seen as [B, H, Lq, d]
    q = (logit_scale * torch.randn(B, Lq, H, d, generator=gen)).to(dtype).transpose(1, 2)
    k, v = (torch.randn(B, H, Lk, d, generator=gen).to(dtype) for _ in range(2))
    mask = torch.rand(B, Lk, generator=gen) > 0.3 if masked else None
    return q, k, v, mask


CASES = [
    (2, 8, 300, 300, 40, False, 1.0),  # SD 1.5's head dim, lengths off the tiles
    (1, 2, 70, 1100, 40, False, 4.0),  # several key blocks, peaked softmax: the rescaling
    (2, 4, 64, 77, 80, True, 1.0),  # cross-attention to padded prompts
    (3, 3, 9, 37, 6, True, 1.0),  # a head dim below one register
    (1, 2, 17, 33, 160, False, 1.0),  # SD 1.5's deepest head dim
]
# ours may not stray further from the exact result than PyTorch's attention at that dtype:
# (times PyTorch's max error, + a floor for the max, + a floor for the mean); in bf16 the
# output's rounding bounds both
TOLERANCE = {torch.bfloat16: (1.5, 1e-3, 1e-4), torch.float32: (3.0, 1e-6, 1e-7)}


@needs_kernel
@pytest.mark.parametrize(
    "dtype, B, H, Lq, Lk, d, masked, logit_scale",
    [(dtype, *case) for dtype in TOLERANCE for case in CASES]
    + [(torch.float32, 1, 2, 17, 33, 161, False, 1.0)],  # float32 takes an odd head dim
)
def test_matches_pytorch_attention(dtype, B, H, Lq, Lk, d, masked, logit_scale):
    gen = torch.Generator().manual_seed(Lq * Lk + d)
    q, k, v, mask = inputs(B, H, Lq, Lk, d, masked, gen, logit_scale, dtype)
    m4 = None if mask is None else mask[:, None, None, :]
    with torch.inference_mode():
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m4)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=m4)
        ours = cpu_attention.attention(q, k, v, mask)
    assert ours.shape == (B, H, Lq, d) and ours.dtype == dtype
    err = (ours.double() - exact).abs()
    torch_err = (theirs.double() - exact).abs()
    times, max_floor, mean_floor = TOLERANCE[dtype]
    assert err.max() <= times * torch_err.max() + max_floor
    assert err.mean() <= 1.5 * torch_err.mean() + mean_floor


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_writes_heads_merged_and_zeros_a_query_with_nothing_to_attend(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v, _ = inputs(2, 2, 5, 20, 8, False, gen, dtype=dtype)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    with torch.inference_mode():
        out = cpu_attention.attention(q, k, v, mask)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, d] underneath: merging is a view
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


@needs_kernel
def test_attention_layer_uses_it_for_inference_only(monkeypatch):
    calls = []
    kernel_attention = cpu_attention.attention
    monkeypatch.setattr(
        cpu_attention, "attention", lambda *a: calls.append(1) or kernel_attention(*a)
    )
    torch.manual_seed(0)
    layer = Attention(64, heads=4, context_dim=32).bfloat16()
    x, ctx = torch.randn(2, 50, 64).bfloat16(), torch.randn(2, 7, 32).bfloat16()
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.inference_mode():
        ours = layer(x, ctx, mask)
        assert len(calls) == 1
        with monkeypatch.context() as m:
            m.setattr(cpu_attention, "kernel", lambda: False)
            theirs = layer(x, ctx, mask)
        assert len(calls) == 1
    assert (ours.float() - theirs.float()).abs().max() < 0.05

    layer(x, ctx, mask).float().square().mean().backward()  # training: PyTorch's, with autograd
    assert len(calls) == 1 and layer.to_q.weight.grad is not None
    layer.float()
    with torch.inference_mode():
        ours = layer(x.float(), ctx.float(), mask)  # float32: the kernel too
        assert len(calls) == 2
        with monkeypatch.context() as m:
            m.setattr(cpu_attention, "kernel", lambda: False)
            theirs = layer(x.float(), ctx.float(), mask)
        assert (ours - theirs).abs().max() < 1e-5
        layer.double()
        layer(x.double(), ctx.double(), mask)  # float64: PyTorch's
    assert len(calls) == 2


@needs_kernel
@pytest.mark.parametrize(
    "loaded, dtype, tol",
    [(True, torch.bfloat16, 0.05), (False, torch.bfloat16, 0.05), (True, torch.float32, 1e-5)],
)
def test_compiled_layer_keeps_the_kernel_loaded_before_tracing(monkeypatch, loaded, dtype, tol):
    from torch._inductor.utils import run_and_get_code

    from difusion.frozen import compile_frozen

    torch.manual_seed(0)
    layer = Attention(64, heads=4, context_dim=32).to(dtype).eval()
    x, ctx = torch.randn(2, 50, 64).to(dtype), torch.randn(2, 7, 32).to(dtype)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x, ctx, mask)
        compile_frozen(layer)  # loads the kernel: bf16 or f32 weights on a CPU
        monkeypatch.setattr(cpu_attention, "loaded", loaded)
        compiled, code = run_and_get_code(layer, x, ctx, mask)
    assert ("difusion.cpu_attention" in code[0]) is loaded
    assert ("scaled_dot_product" in code[0]) is not loaded
    assert (compiled.float() - eager.float()).abs().max() < tol


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("DIFUSION_ATTENTION_KERNEL", "0")
    assert cpu_attention.kernel.__wrapped__() is False


def test_failed_build_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(cpu_attention.sys, "platform", "linux")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'difusion_cpu_attention'\ng++: not found")

    monkeypatch.setattr(ext, "load", no_compiler)
    assert cpu_attention.kernel.__wrapped__() is False
    err = capsys.readouterr().err
    assert "could not be built (Error building extension 'difusion_cpu_attention')" in err
    assert "using PyTorch's attention" in err and "g++" not in err


def test_stale_lock_of_a_killed_build_is_cleared(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(cpu_attention.sys, "platform", "linux")
    folder = cpu_attention.build_dir()
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    old = time.time() - 2 * cpu_attention.STALE_LOCK_S
    os.utime(lock, (old, old))
    seen = []
    monkeypatch.setattr(ext, "load", lambda *a, **kw: seen.append(lock.exists()))
    assert cpu_attention.kernel.__wrapped__() is True
    assert seen == [False]
