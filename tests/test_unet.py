"""The U-Net against diffusers' UNet2DModel / UNet2DConditionModel with the same weights."""

import json
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from difusion.nn.attention import LayoutMap
from difusion.nn.unet import UNet, UNetConfig

SMALL = UNetConfig(
    sample_size=16,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    attention_levels=(False, True, True),
    attention_head_dim=8,
    norm_groups=8,
)
SMALL_COND = replace(SMALL, in_channels=4, out_channels=4, context_dim=24)

# the shapes of the Stable Diffusion 1.5 and 2.1 U-Nets, as in their config.json
SD15 = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21 = {
    **SD15,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
}


def diffusers_unet(cfg: UNetConfig) -> torch.nn.Module:
    cls = UNet2DModel if cfg.context_dim is None else UNet2DConditionModel
    return cls(**cfg.to_diffusers_kwargs())


def random_pair(cfg: UNetConfig, seed: int = 0) -> tuple[UNet, torch.nn.Module]:
    """A diffusers model with every parameter random (norms included, so that a swapped key
    cannot hide behind weight 1 / bias 0) and ours with its weights."""
    torch.manual_seed(seed)
    ref = diffusers_unet(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(cfg: UNetConfig, batch: int = 3, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 999  # fractional timesteps
    return x, t


def context(cfg: UNetConfig, batch: int = 3, length: int = 7, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(batch, length, cfg.context_dim, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1:2, 1:] = False  # a single real token
    return ctx, mask


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"num_classes": 5},
        {"mid_attention": False, "layers_per_block": 2},
        {
            "attention_levels": (True, False, True),
            "num_heads": 4,
            "block_out_channels": (32, 32, 32),
        },
        {"freq_shift": 1, "flip_sin_to_cos": False, "norm_eps": 1e-6, "dropout": 0.1},
    ],
)
def test_matches_unet2dmodel(changes):
    cfg = replace(SMALL, **changes)
    ours, ref = random_pair(cfg)
    x, t = inputs(cfg)
    labels = torch.tensor([0, 4, 2]) if cfg.num_classes else None
    with torch.no_grad():
        want = ref(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
    assert want.abs().max() > 0.1
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"use_linear_projection": True, "transformer_layers": 2, "num_heads": 2},
        {"num_classes": 3, "mid_attention": False, "attention_levels": (True, True, False)},
    ],
)
def test_matches_unet2dconditionmodel(changes):
    cfg = replace(SMALL_COND, **changes)
    ours, ref = random_pair(cfg)
    x, t = inputs(cfg)
    ctx, _ = context(cfg)
    labels = torch.tensor([0, 1, 2]) if cfg.num_classes else None
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, class_labels=labels).sample
        got = ours(x, t, context=ctx, class_labels=labels)
    assert rel_err(got, want) < 1e-5


def test_guidance_input_matches_diffusers_lcm_unet():
    """A distilled student's guidance input: diffusers' `time_cond_proj_dim` and the LCM
    pipelines' w embedding (`get_guidance_scale_embedding(w - 1)`)."""
    from diffusers import LatentConsistencyModelPipeline

    cfg = replace(SMALL_COND, time_cond_proj_dim=32)
    ours, ref = random_pair(cfg)
    x, t = inputs(cfg)
    ctx, _ = context(cfg)
    w = torch.tensor([1.0, 2.5, 8.0])
    embed = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, 32)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, timestep_cond=embed).sample
        got = ours(x, t, context=ctx, guidance=w)
        other = ours(x, t, context=ctx, guidance=w + 1)
    assert rel_err(got, want) < 1e-5 and rel_err(other, want) > 1e-3
    assert UNetConfig.from_diffusers_config(cfg.to_diffusers_kwargs()) == cfg
    with pytest.raises(ValueError, match="guidance is required"):
        ours(x, t, context=ctx)
    with pytest.raises(ValueError, match="no guidance input"):
        replace(SMALL, time_cond_proj_dim=32).to_diffusers_kwargs()


@pytest.mark.parametrize(
    "cfg", [SMALL, SMALL_COND, replace(SMALL_COND, use_linear_projection=True)]
)
def test_channels_last_and_contiguous_layouts_agree(cfg):
    ours, ref = random_pair(cfg)
    x, t = inputs(cfg)
    kw = {"context": context(cfg)[0]} if cfg.context_dim else {}
    with torch.no_grad():
        want = ref(x, t, **({"encoder_hidden_states": kw["context"]} if kw else {})).sample
        for min_pixels in (0, None):  # always, never
            ours.channels_last_min_pixels = min_pixels
            got = ours(x, t, **kw)
            assert got.is_contiguous()
            assert rel_err(got, want) < 1e-5


def test_padding_mask_matches_encoder_attention_mask():
    ours, ref = random_pair(SMALL_COND)
    x, t = inputs(SMALL_COND)
    ctx, mask = context(SMALL_COND)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        got = ours(x, t, context=ctx, context_mask=mask)
        unmasked = ours(x, t, context=ctx)
    assert rel_err(got, want) < 1e-5
    assert rel_err(unmasked, want) > 1e-3  # the mask does change the result


def test_masked_tokens_are_ignored():
    ours, _ = random_pair(SMALL_COND)
    x, t = inputs(SMALL_COND)
    ctx, mask = context(SMALL_COND)
    junk = ctx + 10 * torch.randn_like(ctx)
    with torch.no_grad():
        a = ours(x, t, context=ctx, context_mask=mask)
        b = ours(x, t, context=torch.where(mask[..., None], ctx, junk), context_mask=mask)
        c = ours(x, t, context=torch.where(mask[..., None], junk, ctx), context_mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - c).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # real tokens do matter, in every row


def test_all_padding_row_attends_to_every_token():
    ours, ref = random_pair(SMALL_COND)
    x, t = inputs(SMALL_COND)
    ctx, mask = context(SMALL_COND)
    mask[2] = False
    # diffusers' bias of -10000 on every token shifts all scores alike: plain attention,
    # up to float32 rounding of the shifted scores; ours does that exactly
    unmasked_row = mask.clone()
    unmasked_row[2] = True
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, encoder_attention_mask=unmasked_row).sample
        got = ours(x, t, context=ctx, context_mask=mask)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


def test_odd_sizes_match_diffusers():
    # 10 -> 5 -> 3 on the way down; upsampling must return to the skip connections' sizes
    ours, ref = random_pair(SMALL_COND)
    x, t = inputs(SMALL_COND, batch=1, size=10)
    ctx, _ = context(SMALL_COND, batch=1)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, context=ctx)
    assert got.shape == x.shape
    assert rel_err(got, want) < 1e-5


def test_tiny_sd15_and_sd21_shapes_match_diffusers():
    for sd, heads in [(SD15, 8), (SD21, [2, 4, 4, 4])]:
        tiny = {**sd, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 16}
        tiny["attention_head_dim"] = heads
        torch.manual_seed(0)
        ref = UNet2DConditionModel(**tiny).eval()
        cfg = UNetConfig.from_diffusers_config(tiny)
        ours = UNet(cfg).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        assert set(ours.state_dict()) == set(ref.state_dict())
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        ctx = torch.randn(2, 5, 16)
        with torch.no_grad():
            assert (
                rel_err(ours(x, t, context=ctx), ref(x, t, encoder_hidden_states=ctx).sample) < 1e-5
            )


@pytest.mark.parametrize(
    "sd, ours",
    [
        (SD15, UNetConfig(in_channels=4, out_channels=4, sample_size=64,
                          block_out_channels=(320, 640, 1280, 1280),
                          attention_levels=(True, True, True, False), num_heads=8,
                          context_dim=768)),
        (SD21, UNetConfig(in_channels=4, out_channels=4, sample_size=96,
                          block_out_channels=(320, 640, 1280, 1280),
                          attention_levels=(True, True, True, False), attention_head_dim=64,
                          context_dim=1024, use_linear_projection=True)),
    ],
)  # fmt: skip
def test_full_size_sd_state_dict_layout(sd, ours):
    with torch.device("meta"):  # shapes only, no memory
        ref = UNet2DConditionModel(**sd)
        model = UNet(ours)
        from_config = UNet(UNetConfig.from_diffusers_config(sd))
    want = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == want
    assert {k: v.shape for k, v in from_config.state_dict().items()} == want


def test_shapes_batch_and_timesteps():
    cfg = replace(SMALL, num_classes=3)
    model = UNet(cfg).eval()
    labels = torch.tensor([2])
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.randn(batch, 3, 16, 16)
            out = model(x, torch.rand(batch) * 999, class_labels=labels.expand(batch))
            assert out.shape == x.shape and out.is_contiguous()
        x = torch.randn(1, 3, 16, 16)
        ref = model(x, torch.tensor([250.0]), class_labels=labels)
        for t in (250, 250.0, torch.tensor(250), torch.tensor(250.0), torch.tensor([250])):
            torch.testing.assert_close(model(x, t, class_labels=labels), ref)
        assert (model(x, 250.5, class_labels=labels) - ref).abs().max() > 0  # fractional t counts


def test_no_grad_path_equals_grad_path_and_every_parameter_learns():
    cfg = replace(SMALL_COND, num_classes=3)
    ours, _ = random_pair(cfg)
    x, t = inputs(cfg)
    ctx, mask = context(cfg)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        a = ours(x, t, context=ctx, context_mask=mask, class_labels=labels)
    b = ours(x, t, context=ctx, context_mask=mask, class_labels=labels)
    torch.testing.assert_close(a, b)
    b.square().mean().backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_dropout_only_in_training():
    model = UNet(replace(SMALL, dropout=0.5))
    x, t = inputs(SMALL)
    with torch.no_grad():
        assert (model(x, t) - model(x, t)).abs().max() > 1e-3
        model.eval()
        torch.testing.assert_close(model(x, t), model(x, t))


def test_input_validation():
    model = UNet(SMALL_COND)
    x, t = inputs(SMALL_COND)
    with pytest.raises(ValueError, match="context"):
        model(x, t)
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, context=context(SMALL_COND)[0], class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(block_out_channels=(32, 64), attention_levels=(True,))
    with pytest.raises(ValueError, match="head dimension"):
        UNetConfig(
            block_out_channels=(32, 64), attention_levels=(True, True), num_heads=2
        ).to_diffusers_kwargs()


def test_config_json_round_trip():
    for cfg in (SMALL, SMALL_COND, UNetConfig(num_classes=10, num_heads=4)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert UNetConfig.from_dict(d) == cfg
    for cfg in (SMALL, SMALL_COND):
        kw = cfg.to_diffusers_kwargs()
        assert UNetConfig.from_diffusers_config(kw) == cfg
        for bad in (
            {"resnet_time_scale_shift": "scale_shift"},
            {"up_block_types": ["UpBlock2D"] * 3},
        ):
            with pytest.raises(ValueError, match="unsupported"):
                UNetConfig.from_diffusers_config({**kw, **bad})
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({"channels": 3})
    assert UNetConfig().time_embed_dim == 4 * UNetConfig().block_out_channels[0]


def test_layout_map_starts_as_the_same_model_and_learns():
    plain, _ = random_pair(SMALL_COND)
    mapped = UNet(replace(SMALL_COND, layout_map=True)).eval()
    missing, unexpected = mapped.load_state_dict(plain.state_dict(), strict=False)
    projections = [n for n, _ in mapped.named_modules() if n.endswith(".layout_proj")]
    assert len(projections) == 7  # in every spatial transformer: down 2, mid 1, up 4
    assert not unexpected
    assert sorted(missing) == sorted(
        [f"{n}.{p}" for n in projections for p in ("weight", "bias")]
        + [f"layout_map.{k}" for k in mapped.layout_map.state_dict()]
    )
    x, t = inputs(SMALL_COND)
    ctx, mask = context(SMALL_COND)
    before = plain(x, t, context=ctx, context_mask=mask).detach()  # both with autograd: one kernel
    out = mapped(x, t, context=ctx, context_mask=mask)
    assert torch.equal(out, before)
    out.square().mean().backward()
    grads = [p.grad for n, p in mapped.named_parameters() if n.endswith("layout_proj.weight")]
    assert len(grads) == 7 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_layout_map_maps_the_prompt_onto_places():
    torch.manual_seed(0)
    layout = LayoutMap(8, heads=2, context_dim=6, out_channels=3, frequencies=4)
    places = layout.places(3, 3)
    assert places.shape == (9, 16)
    torch.testing.assert_close(places[4], layout.places(1, 1)[0])  # the centre, at any size
    assert (torch.cdist(places, places) + torch.eye(9)).min() > 1e-3  # every place its own
    rows = layout.places(2, 4).view(2, 4, 2, 2, 4)[..., 0, :, :]  # row-major: y features
    assert torch.equal(rows[:, :1].expand(-1, 4, -1, -1), rows)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        out = layout(3, 3, ctx, mask)
        assert out.shape == (2, 9, 8)
        assert (out[:, 0] - out[:, 8]).abs().max() > 1e-3  # corners differ
        assert (out[0] - out[1]).abs().max() > 1e-3  # so do prompts
        padded = ctx.clone()
        padded[1, 2:] = 100.0
        torch.testing.assert_close(layout(3, 3, padded, mask)[1], out[1])  # padding ignored
        torch.testing.assert_close(layout(3, 3, ctx[1:, :2], None)[0], out[1])
        image = layout.image(3, 3, ctx, mask)
        assert image.shape == (2, 3, 3, 3)
        torch.testing.assert_close(image[:, :, 0, 2], layout.to_image(out[:, 2]))


def test_layout_map_config():
    cfg = replace(SMALL_COND, layout_map=True)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="no layout map"):
        cfg.to_diffusers_kwargs()
    with pytest.raises(ValueError, match="context_dim"):
        replace(SMALL, layout_map=True)
