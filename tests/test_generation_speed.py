"""Generation without waste: the prompt's keys, values and layout maps computed once per
sampling run, inference mode, bf16 weights."""

import sys
from dataclasses import replace

import pytest
import torch

from difusion import Pipeline
from difusion.denoiser import Denoiser, guided
from difusion.model import DiffusionModel, default_model_path
from difusion.nn.unet import UNet, UNetConfig

TEXT = UNetConfig(
    block_out_channels=(16, 32), attention_levels=(False, True), layers_per_block=1,
    attention_head_dim=8, norm_groups=8, context_dim=12, sample_size=16,
)  # fmt: skip
MAPPED = replace(TEXT, layout_map=True)
PROMPT = "a red circle to the left of a blue square"


def random_unet(cfg: UNetConfig) -> UNet:
    """Every weight random, the layout projections (zero at initialisation) included."""
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return unet


def text_inputs(cfg: UNetConfig, batch: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    context = torch.randn(batch, 5, cfg.context_dim, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1] = False  # all padding: attends to every token
    return x, context, mask


@pytest.mark.parametrize("cfg", [TEXT, MAPPED], ids=["text", "layout_map"])
def test_prepared_context_equals_raw_context(cfg):
    unet = random_unet(cfg)
    _, context, mask = text_inputs(cfg)
    with torch.no_grad():
        prepared = unet.prepare_context(context, mask)
        for size in (16, 12, 16):  # the layout maps of each grid size, kept for the next call
            x, _, _ = text_inputs(cfg, size=size)
            for t in (torch.tensor([10.0, 500.0, 999.0]), 250.5):
                raw = unet(x, t, context=context, context_mask=mask)
                assert torch.equal(unet(x, t, context=prepared), raw)
    if cfg.layout_map:  # 2 grid sizes (8x8, 6x6), 4 spatial transformers: down, mid, 2 up
        assert len(prepared.layout.maps) == 2 and len(prepared.layout.projected) == 2 * 4
        assert all(m.abs().sum() > 0 for m in prepared.layout.projected.values())


def test_prepared_context_refuses_what_does_not_fit():
    unet = random_unet(MAPPED)
    x, context, mask = text_inputs(MAPPED)
    prepared = unet.prepare_context(context, mask)
    with pytest.raises(ValueError, match="context_mask goes to prepare_context"):
        unet(x, 1.0, context=prepared, context_mask=mask)
    with pytest.raises(ValueError, match="prepared by another U-Net"):
        random_unet(MAPPED)(x, 1.0, context=prepared)
    with pytest.raises(ValueError, match="context has 3 rows for a batch of 2"):
        unet(x[:2], 1.0, context=prepared)
    with pytest.raises(ValueError, match="takes no context"):
        UNet(replace(TEXT, context_dim=None)).prepare_context(context)


@pytest.fixture(scope="module")
def default_model():
    return DiffusionModel.load(default_model_path())


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def test_guided_sampling_prepares_the_prompt_once(monkeypatch):
    """DiffusionModel.sample with guidance: the cross-attention keys and values and the layout
    maps once per run, not once per step, and the very same images."""
    model = DiffusionModel.load(default_model_path())  # a copy of its own, for the hooks
    unet = model.unet
    keys = count_calls(unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k)
    layout = count_calls(unet.layout_map)
    prompts = ["a red circle", "a blue square above a green triangle"]
    kw = dict(steps=4, sampler="dpmpp_2m", seed=3, guidance=2.0)
    cond, uncond = model.text_cond(prompts), model.text_cond([""] * 2)
    assert cond["context_mask"] is not None and not cond["context_mask"].all()  # padding
    x = model.sample(2, cond=cond, uncond=uncond, **kw)
    assert keys[0] == 1 and layout[0] == 2  # two grid sizes with attention: 16x16 and 8x8
    monkeypatch.setattr(Denoiser, "prepare", lambda self, cond: cond)  # the old path
    old = model.sample(2, cond=cond, uncond=uncond, **kw)
    assert keys[0] == 1 + 4 and layout[0] == 2 + 4 * 2
    assert torch.equal(x, old)


def test_guided_prepares_the_batched_branches(default_model):
    """One prepared context for both guidance branches, as `guided` batches them."""
    den = default_model.denoiser()
    cond, uncond = default_model.text_cond(["a red circle"]), default_model.text_cond([""])
    x, sigma = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 3.0
    with torch.no_grad():
        got = guided(den, cond, uncond, 2.0)(x, torch.tensor([sigma]))
        u, c = den(x, sigma, uncond), den(x, sigma, cond)
    torch.testing.assert_close(got, u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_sampling_in_inference_mode_keeps_the_text_cache_plain(default_model):
    pipe = Pipeline(default_model)
    x = pipe.sample("a cyan triangle", steps=2, n=1)
    assert torch.is_inference(x)  # no autograd bookkeeping while sampling
    cached = default_model.text_cond(["a cyan triangle"])["context"]
    assert not torch.is_inference(cached)  # a model that trains afterwards can still use it


needs_bf16 = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="no native bfloat16 on this CPU (needs AVX-512 bf16 or AMX): correct but slow",
)


@needs_bf16
def test_bf16_weights_close_to_fp32():
    fp32 = Pipeline.from_pretrained("default")
    bf16 = Pipeline.from_pretrained("default", dtype=torch.bfloat16)
    unet = bf16.model.unet
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}  # converted once
    assert bf16.dtype == torch.bfloat16
    assert {p.dtype for p in bf16.model.text_encoder.parameters()} == {torch.float32}
    kw = dict(n=2, steps=10, sampler="dpmpp_2m", seed=0)
    want = fp32.sample(PROMPT, **kw)
    got = bf16.sample(PROMPT, **kw)
    assert got.dtype == torch.float32
    # measured: 0.0020 mean |difference| in [-1, 1] pixel units here (16 images at 20 steps,
    # as bench/generation.py: 0.0018), a few pixels off at a shape's edge
    assert (got - want).abs().mean() < 0.02


@needs_bf16
def test_generate_and_serve_take_dtype(monkeypatch, capsys, tmp_path):
    from difusion.cli import main
    from difusion.serve.models import load_models

    out = tmp_path / "g.png"
    argv = ["difusion", "generate", "a red circle", "-n", "1", "--steps", "2", "-o", str(out),
            "--dtype", "bf16"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and out.is_file()
    for command in (["generate", "a red circle"], ["serve", "--port", "1"]):
        monkeypatch.setattr(sys, "argv", ["difusion", *command, "--dtype", "fp16"])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 1
        assert "--dtype must be fp32 or bf16, got 'fp16'" in capsys.readouterr().err
    served = load_models(["default"], dtype="bf16")["default"]
    assert served.pipe.dtype == torch.bfloat16


def test_compiled_pipeline_matches_eager():
    """Pipeline.compile (torch.compile, Inductor: tens of seconds of C++ compilation here,
    so the smallest model) samples what the eager model samples."""
    from torch._inductor.utils import run_and_get_code

    from difusion.model import ModelConfig

    unet = UNetConfig(
        in_channels=1, out_channels=1, sample_size=8, block_out_channels=(8,),
        layers_per_block=1, attention_levels=(False,), attention_head_dim=8, norm_groups=8,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DiffusionModel(ModelConfig(unet=unet, image_size=8, channels=1)).eval()
    eager = model.sample(2, steps=3, seed=0)
    pipe = Pipeline(model).compile()
    compiled, code = run_and_get_code(model.sample, 2, steps=3, seed=0)
    code = "".join(code)
    assert pipe.model.unet._compiled_call_impl is not None
    # frozen: the convolutions and linear layers are prepacked oneDNN calls, weights constants
    assert "mkldnn._convolution_pointwise" in code
    assert "mkldnn._linear_pointwise" in code and "_mkl_linear" not in code
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    # frozen weights: a change of them undoes the compilation rather than being ignored
    with torch.no_grad():
        model.unet.conv_in.weight.mul_(1.5)
    pipe.to(dtype=torch.float32)
    assert pipe.model.unet._compiled_call_impl is None
    assert not torch.allclose(model.sample(2, steps=3, seed=0), eager, atol=1e-3)
