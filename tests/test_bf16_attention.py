"""The AVX512-BF16 attention kernel against PyTorch's attention, and when it is used."""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from difusion.nn import bf16_attention
from difusion.nn.attention import Attention

needs_kernel = pytest.mark.skipif(
    not bf16_attention.kernel(), reason="no AVX512-BF16 CPU or no C++ compiler here"
)


def inputs(B, H, Lq, Lk, d, masked, gen, logit_scale=1.0):
    # queries as the U-Net makes them: a [B, Lq, H, d] tensor seen as [B, H, Lq, d]
    q = (logit_scale * torch.randn(B, Lq, H, d, generator=gen)).bfloat16().transpose(1, 2)
    k, v = (torch.randn(B, H, Lk, d, generator=gen).bfloat16() for _ in range(2))
    mask = torch.rand(B, Lk, generator=gen) > 0.3 if masked else None
    return q, k, v, mask


@needs_kernel
@pytest.mark.parametrize(
    "B, H, Lq, Lk, d, masked, logit_scale",
    [
        (2, 8, 300, 300, 40, False, 1.0),  # SD 1.5's head dim, lengths off the tiles
        (1, 2, 70, 1100, 40, False, 4.0),  # three key blocks, peaked softmax: the rescaling
        (2, 4, 64, 77, 80, True, 1.0),  # cross-attention to padded prompts
        (3, 3, 9, 37, 6, True, 1.0),  # a head dim below one register
        (1, 2, 17, 33, 160, False, 1.0),  # SD 1.5's deepest head dim
    ],
)
def test_matches_pytorch_attention(B, H, Lq, Lk, d, masked, logit_scale):
    gen = torch.Generator().manual_seed(Lq * Lk + d)
    q, k, v, mask = inputs(B, H, Lq, Lk, d, masked, gen, logit_scale)
    m4 = None if mask is None else mask[:, None, None, :]
    with torch.inference_mode():
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m4)
        torch_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=m4)
        ours = bf16_attention.attention(q, k, v, mask)
    assert ours.shape == (B, H, Lq, d) and ours.dtype == torch.bfloat16
    err = (ours.float() - exact).abs()
    torch_err = (torch_bf16.float() - exact).abs()
    # bf16 rounding of the output bounds both; ours may not stray further than PyTorch's
    assert err.max() <= 1.5 * torch_err.max() + 1e-3
    assert err.mean() <= 1.5 * torch_err.mean() + 1e-4


@needs_kernel
def test_writes_heads_merged_and_zeros_a_query_with_nothing_to_attend():
    gen = torch.Generator().manual_seed(0)
    q, k, v, _ = inputs(2, 2, 5, 20, 8, False, gen)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    with torch.inference_mode():
        out = bf16_attention.attention(q, k, v, mask)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, d] underneath: merging is a view
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


@needs_kernel
def test_attention_layer_uses_it_for_inference_only(monkeypatch):
    calls = []
    kernel_attention = bf16_attention.attention
    monkeypatch.setattr(
        bf16_attention, "attention", lambda *a: calls.append(1) or kernel_attention(*a)
    )
    torch.manual_seed(0)
    layer = Attention(64, heads=4, context_dim=32).bfloat16()
    x, ctx = torch.randn(2, 50, 64).bfloat16(), torch.randn(2, 7, 32).bfloat16()
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.inference_mode():
        ours = layer(x, ctx, mask)
        assert len(calls) == 1
        with monkeypatch.context() as m:
            m.setattr(bf16_attention, "kernel", lambda: False)
            theirs = layer(x, ctx, mask)
        assert len(calls) == 1
    assert (ours.float() - theirs.float()).abs().max() < 0.05

    layer(x, ctx, mask).float().square().mean().backward()  # training: PyTorch's, with autograd
    assert len(calls) == 1 and layer.to_q.weight.grad is not None
    layer.float()
    with torch.inference_mode():
        layer(x.float(), ctx.float(), mask)  # float32: PyTorch's
    assert len(calls) == 1


@needs_kernel
@pytest.mark.parametrize("loaded", [True, False])
def test_compiled_layer_keeps_the_kernel_loaded_before_tracing(monkeypatch, loaded):
    from torch._inductor.utils import run_and_get_code

    from difusion.frozen import compile_frozen

    torch.manual_seed(0)
    layer = Attention(64, heads=4, context_dim=32).bfloat16().eval()
    x, ctx = torch.randn(2, 50, 64).bfloat16(), torch.randn(2, 7, 32).bfloat16()
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = layer(x, ctx, mask)
        compile_frozen(layer)  # loads the kernel: bf16 weights on a CPU
        monkeypatch.setattr(bf16_attention, "loaded", loaded)
        compiled, code = run_and_get_code(layer, x, ctx, mask)
    assert ("attention_bf16" in code[0]) is loaded
    assert ("scaled_dot_product" in code[0]) is not loaded
    assert (compiled.float() - eager.float()).abs().max() < 0.05


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("DIFUSION_BF16_ATTENTION", "0")
    assert bf16_attention.kernel.__wrapped__() is False


def test_failed_build_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(bf16_attention, "cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(bf16_attention.sys, "platform", "linux")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'difusion_bf16_attention'\ng++: not found")

    monkeypatch.setattr(ext, "load", no_compiler)
    assert bf16_attention.kernel.__wrapped__() is False
    err = capsys.readouterr().err
    assert "could not be built (Error building extension 'difusion_bf16_attention')" in err
    assert "using PyTorch's attention" in err and "g++" not in err


def test_stale_lock_of_a_killed_build_is_cleared(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(bf16_attention, "cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(bf16_attention.sys, "platform", "linux")
    folder = bf16_attention.build_dir()
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    old = time.time() - 2 * bf16_attention.STALE_LOCK_S
    os.utime(lock, (old, old))
    seen = []
    monkeypatch.setattr(ext, "load", lambda *a, **kw: seen.append(lock.exists()))
    assert bf16_attention.kernel.__wrapped__() is True
    assert seen == [False]
