"""The KL autoencoder against diffusers' AutoencoderKL with the same weights."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import load_file

from difusion.nn.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, vae_loss

SMALL = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_groups=32, sample_size=32)
# Stable Diffusion's layout (4 levels, 2 resnets per encoder level) with tiny channels
SD_LIKE = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_groups=8)

# Stable Diffusion 1.5's vae/config.json
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def random_pair(cfg: VAEConfig, seed: int = 0) -> tuple[AutoencoderKL, torch.nn.Module]:
    """A diffusers model with every parameter random (norms included, so that a swapped key
    cannot hide behind weight 1 / bias 0) and ours with its weights."""
    torch.manual_seed(seed)
    ref = DiffusersAutoencoderKL(**cfg.to_diffusers_kwargs()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def mean_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean()).item()


@pytest.fixture(scope="module")
def small_pair():
    return random_pair(SMALL)


@torch.no_grad()
def test_matches_diffusers(small_pair):
    ours, ref = small_pair
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    assert post.mean.shape == (2, 4, 16, 16)
    assert rel_err(post.mean, ref_post.mean) < 1e-4
    assert rel_err(post.logvar, ref_post.logvar) < 1e-4
    assert rel_err(post.std, ref_post.std) < 1e-4

    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(2))
    assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-4

    recon, _ = ours(x, sample_posterior=False)
    assert recon.shape == x.shape
    assert rel_err(recon, ref(x).sample) < 1e-4

    # the same generator draws the same posterior sample as diffusers'
    s = post.sample(torch.Generator().manual_seed(3))
    assert rel_err(s, ref_post.sample(torch.Generator().manual_seed(3))) < 1e-4


@torch.no_grad()
def test_scaled_latents_round_trip(small_pair):
    ours, _ = small_pair
    cfg = ours.config
    x = torch.randn(1, 3, 32, 32)
    z = ours.encode(x).mode()
    scaled = ours.encode_latents(x, sample_posterior=False)
    assert torch.allclose(scaled, z * cfg.scaling_factor)
    assert torch.allclose(ours.decode_latents(scaled), ours.decode(z), atol=1e-5)

    shifted = AutoencoderKL(VAEConfig(**{**cfg.to_dict(), "shift_factor": 0.5})).eval()
    shifted.load_state_dict(ours.state_dict())
    assert torch.allclose(
        shifted.encode_latents(x, sample_posterior=False), (z - 0.5) * cfg.scaling_factor
    )
    assert torch.allclose(shifted.decode_latents(scaled), ours.decode(z + 0.5), atol=1e-5)


@torch.no_grad()
def test_slicing_is_exact(small_pair):
    ours, _ = small_pair
    x = torch.randn(3, 3, 32, 32)
    z = torch.randn(3, 4, 16, 16)
    plain_mean, plain_dec = ours.encode(x).mean, ours.decode(z)
    ours.slicing = True
    try:
        assert torch.allclose(ours.encode(x).mean, plain_mean, atol=1e-5)
        assert torch.allclose(ours.decode(z), plain_dec, atol=1e-5)
    finally:
        ours.slicing = False


def test_tiled_blending_is_exact_for_a_local_decoder(monkeypatch):
    """With a decoder whose output at a pixel depends on that latent pixel only, the blend
    of overlapping tiles must reproduce the untiled output exactly (weights sum to 1)."""
    model = AutoencoderKL(SMALL)
    f = SMALL.downscale
    monkeypatch.setattr(
        model, "decode", lambda z: upsample_nearest(z[:, :3] * 2 + z[:, 3:4], f), raising=True
    )
    z = torch.randn(2, 4, 27, 19)
    full = model.decode(z)
    for tile, overlap in [(8, 2), (8, 4), (10, 3), (16, 0), (32, 8)]:
        tiled = model.tiled_decode(z, tile=tile, overlap=overlap)
        assert tiled.shape == full.shape
        assert torch.allclose(tiled, full, atol=1e-5), (tile, overlap)
    with pytest.raises(ValueError):
        model.tiled_decode(z, tile=8, overlap=8)


def upsample_nearest(z: torch.Tensor, f: int) -> torch.Tensor:
    return F.interpolate(z, scale_factor=f, mode="nearest")


@torch.no_grad()
def test_tiled_decode_close_to_plain(small_pair):
    """Tiled decoding is not exact: each tile's GroupNorm statistics, the mid-block attention
    and the zero padding at tile borders see the tile only. With random weights and 16-pixel
    latent tiles (about the decoder's receptive field) the mean relative error is ~20%, for
    ours and for diffusers' tiling alike; a trained VAE at SD's 64-pixel tiles does far better.
    The test holds ours to diffusers' own tiling error at the same tile size and overlap."""
    ours, ref = small_pair
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(4))
    plain = ours.decode(z)
    tiled = ours.tiled_decode(z, tile=16, overlap=8)
    assert tiled.shape == plain.shape
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size = 16, 16 * SMALL.downscale
    ref.tile_overlap_factor = 0.5
    try:
        ref_tiled = ref.decode(z).sample
    finally:
        ref.disable_tiling()
    err, ref_err = mean_rel_err(tiled, plain), mean_rel_err(ref_tiled, plain)
    assert err < 0.3
    assert err <= 1.1 * ref_err
    # still the same picture: strongly correlated with the plain decode
    assert torch.corrcoef(torch.stack([tiled.flatten(), plain.flatten()]))[0, 1] > 0.95
    # a tile covering the whole latent is the plain decode; decode_latents tiles on request
    assert torch.allclose(ours.tiled_decode(z, tile=24, overlap=4), plain, atol=1e-5)
    scaled = z * SMALL.scaling_factor
    assert torch.allclose(
        ours.decode_latents(scaled, tile=16), ours.tiled_decode(z, 16, 4), atol=1e-5
    )


@pytest.mark.parametrize("cfg", [SMALL, SD_LIKE], ids=["small", "sd_like"])
def test_state_dict_keys_match_diffusers(cfg):
    ref = DiffusersAutoencoderKL(**cfg.to_diffusers_kwargs())
    ours = AutoencoderKL(cfg)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes
    assert "encoder.down_blocks.0.downsamplers.0.conv.weight" in ref_shapes
    last = cfg.layers_per_block  # the decoder's levels have one resnet more
    assert f"decoder.up_blocks.0.resnets.{last}.conv2.weight" in ref_shapes
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in ref_shapes


def test_sd15_config_and_shapes():
    """Stable Diffusion 1.5's VAE config, built on the meta device (no memory, no weights)."""
    cfg = VAEConfig.from_diffusers_config(SD15_VAE)
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.layers_per_block == 2
    assert cfg.scaling_factor == 0.18215 and cfg.downscale == 8 and cfg.sample_size == 512
    with torch.device("meta"):
        ref = DiffusersAutoencoderKL(**{k: v for k, v in SD15_VAE.items() if k[0] != "_"})
        ours = AutoencoderKL(cfg)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_shapes
    assert len(ref_shapes) == 248


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        VAEConfig(
            block_out_channels=(8, 16, 16),
            norm_groups=4,
            latent_channels=16,
            mid_attention=False,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            sample_size=16,
        ),
    ],
    ids=["small", "flux_like"],
)
def test_diffusers_config_round_trip(cfg, tmp_path):
    torch.manual_seed(0)
    DiffusersAutoencoderKL(**cfg.to_diffusers_kwargs()).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    back = VAEConfig.from_diffusers_config(d)
    assert back == cfg
    # and the saved weights load into ours
    AutoencoderKL(back).load_state_dict(
        load_file(tmp_path / "diffusion_pytorch_model.safetensors"), strict=True
    )
    # our own JSON round trip
    assert VAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_errors():
    with pytest.raises(ValueError, match="layout"):
        VAEConfig.from_diffusers_config({**SD15_VAE, "down_block_types": ["DownBlock2D"] * 4})
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_diffusers_config({**SD15_VAE, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_diffusers_config({**SD15_VAE, "norm_type": "spatial"})
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({"channels": 3})
    # bookkeeping keys are fine
    VAEConfig.from_diffusers_config({**SD15_VAE, "force_upcast": False, "_name_or_path": "x"})


def test_diagonal_gaussian():
    # a standard normal posterior has zero KL to the prior
    g = DiagonalGaussian(torch.zeros(3, 8, 4, 4))
    assert torch.equal(g.kl(), torch.zeros(3))
    assert torch.equal(g.mode(), torch.zeros(3, 4, 4, 4))
    assert torch.equal(g.std, torch.ones(3, 4, 4, 4))

    # closed form: KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - log s^2) / 2 per element
    mean, logvar = torch.full((2, 4, 3, 3), 0.5), torch.full((2, 4, 3, 3), -1.0)
    g = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    per_elem = (0.25 + torch.exp(torch.tensor(-1.0)) - 1 + 1) / 2
    assert torch.allclose(g.kl(), per_elem * 36)

    # logvar is clamped as in LDM; samples have the right moments and follow the generator
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), 100.0)).logvar.item() == 20.0
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), -100.0)).logvar.item() == -30.0
    big = DiagonalGaussian(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 200, 200))
    s = big.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 2.0) < 0.02
    assert abs(s.std().item() - torch.exp(torch.tensor(-0.5)).item()) < 0.02
    assert torch.equal(s, big.sample(torch.Generator().manual_seed(0)))


def test_vae_loss_parts():
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_groups=4))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, parts = vae_loss(model, x, kl_weight=1e-3, generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"rec", "kl", "loss"}
    assert torch.allclose(loss, parts["rec"] + 1e-3 * parts["kl"] / (3 * 16 * 16))
    assert not parts["rec"].requires_grad and loss.requires_grad
    l2, parts2 = vae_loss(model, x, reconstruction="l2", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(parts2["kl"], parts["kl"])
    with pytest.raises(ValueError):
        vae_loss(model, x, reconstruction="perceptual")


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = AutoencoderKL(VAEConfig(block_out_channels=(16, 32), norm_groups=8))
    # smooth images (noise would not compress into the latent)
    x = F.interpolate(torch.rand(4, 3, 2, 2) * 2 - 1, size=16, mode="bilinear")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss, _ = vae_loss(model, x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
