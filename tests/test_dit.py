"""The diffusion transformer: equal to diffusers' DiT and PixArt on tiny random models, and a
backbone that trains, resumes, distils and serves like the U-Net."""

import pytest
import torch
from run_util import assert_same_training_state

from difusion import Pipeline
from difusion.data import DigitsDataset, ShapesDataset
from difusion.model import DiffusionModel
from difusion.nn.dit import DiT, DiTConfig, sincos_positions
from difusion.train import TrainConfig, train

diffusers = pytest.importorskip("diffusers")


TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
            num_layers=2, sample_size=8, patch_size=2)  # fmt: skip
T = torch.tensor([3.0, 500.0, 999.0])


def randomized_pair(cls, **kw) -> tuple[torch.nn.Module, DiT]:
    """A tiny diffusers model of `cls` with every parameter drawn afresh (the zero-initialised
    gates too), and ours with its weights; both in eval mode."""
    torch.manual_seed(0)
    ref = cls(**TINY, **kw).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = DiT(DiTConfig.from_diffusers_config(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item())


def test_dit_equals_diffusers_dit_transformer():
    ref, ours = randomized_pair(diffusers.DiTTransformer2DModel, num_embeds_ada_norm=5)
    assert ours.config.num_classes == 6  # the five classes and the null one
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 4, 5])
    with torch.no_grad():
        assert_close(ours(x, T, class_labels=labels), ref(x, T, labels).sample)


@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_pixart_layout_equals_diffusers_pixart_transformer(size):
    """Text tokens through cross-attention with a padding mask; at another size than the
    trained one the positions are stretched as diffusers stretches them."""
    ref, ours = randomized_pair(
        diffusers.PixArtTransformer2DModel, cross_attention_dim=16, caption_channels=12
    )
    x, context = torch.randn(3, 3, *size), torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    no_sizes = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        want = ref(x, context, T, no_sizes, encoder_attention_mask=mask.float()).sample
        assert_close(ours(x, T, context=context, context_mask=mask), want)


def test_positions_are_diffusers_sincos():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for grid in ((4, 4), (4, 6)):
        want = get_2d_sincos_pos_embed(32, grid, base_size=4, output_type="pt")
        assert torch.allclose(sincos_positions(32, *grid, base_size=4), want.float(), atol=1e-6)


@pytest.mark.parametrize("context_dim", [None, 12])
def test_adaln_zero_starts_every_block_as_the_identity(context_dim):
    cfg = DiTConfig(in_channels=1, out_channels=1, sample_size=8, patch_size=4, num_layers=2,
                    num_attention_heads=2, attention_head_dim=8, context_dim=context_dim)  # fmt: skip
    dit = DiT(cfg)
    tokens = torch.randn(2, 4, cfg.dim)
    block = dit.transformer_blocks[0]
    if context_dim is None:
        modulation = (torch.randn(2, 256), None, None)
        args = ()
    else:
        modulation = dit.adaln_single(torch.randn(2, 256), None)[0]
        args = (dit.caption_projection(torch.randn(2, 3, context_dim)), None)
    assert torch.equal(block(tokens, modulation, *args), tokens)
    kw = {} if context_dim is None else {"context": torch.randn(2, 3, context_dim)}
    assert torch.equal(dit(torch.randn(2, 1, 8, 8), torch.tensor([5.0, 700.0]), **kw),
                       torch.zeros(2, 1, 8, 8))  # fmt: skip
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DiTConfig(sample_size=10, patch_size=4)


def tiny_dit(tmp_path, name, **kw) -> TrainConfig:
    base = dict(
        data="digits", out=str(tmp_path / name), size=8, steps=6, batch_size=4,
        backbone="dit", channels=32, head_dim=16, depth=2, patch_size=2, log_every=1,
        checkpoint_every=3, sample_every=1000, warmup=2, dropout=0.1,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def digits8():
    return DigitsDataset(size=8)


@pytest.mark.parametrize("objective", ["ddpm", "edm", "flow"])
def test_dit_trains_with_every_objective(tmp_path, digits8, objective):
    losses = []
    cfg = tiny_dit(tmp_path, "run", steps=30, lr=2e-3, batch_size=16, dropout=0.0,
                   objective=objective, cond="label")  # fmt: skip
    out = train(cfg, dataset=digits8, progress=False, on_step=lambda s, loss: losses.append(loss))
    assert sum(losses[-10:]) / 10 < 0.85 * sum(losses[:5]) / 5, losses
    model = DiffusionModel.load(out / "model.safetensors")
    assert model.config.backbone == "dit" and isinstance(model.unet, DiT)
    assert model.config.dit.num_classes == 11 and model.config.dit.patch_size == 2
    cond, uncond = model.label_cond([3, 7])
    x = model.sample(2, steps=3, cond=cond, uncond=uncond, guidance=2.0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


def test_dit_run_resumes_exactly(tmp_path, digits8):
    kw = dict(objective="flow", cond="label")
    full = train(tiny_dit(tmp_path, "full", **kw), dataset=digits8, progress=False)
    train(tiny_dit(tmp_path, "half", steps=3, **kw), dataset=digits8, progress=False)
    resumed = train(tiny_dit(tmp_path, "half", **kw), resume=True, dataset=digits8,
                    progress=False)  # fmt: skip
    assert_same_training_state(full, resumed)


def test_dit_distils_and_serves(tmp_path, digits8):
    """A DiT teacher's student starts as the teacher at any guidance scale; both load into
    a Pipeline like U-Net models."""
    from difusion.distill import DistillConfig, distill

    teacher = train(tiny_dit(tmp_path, "teacher", steps=4, objective="edm", cond="label"),
                    dataset=digits8, progress=False)  # fmt: skip
    dcfg = DistillConfig(teacher=str(teacher), out=str(tmp_path / "student"), data="digits",
                         steps=1, lr=0.0, batch_size=8, sample_every=10**6,
                         checkpoint_every=10**6)  # fmt: skip
    student_dir = distill(dcfg, dataset=digits8, progress=False)
    t = DiffusionModel.load(teacher / "model.safetensors")
    s = DiffusionModel.load(student_dir / "model.safetensors")
    assert s.config.backbone == "dit" and s.config.dit.time_cond_proj_dim is not None
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 5, 9])
    sigma = torch.tensor([3.0, 1.0, 0.5, 0.2])
    with torch.no_grad():
        want = t.denoiser()(x, sigma, {"class_labels": labels})
        cond = {"class_labels": labels, "guidance": torch.full((4,), 2.5)}
        assert torch.equal(s.denoiser()(x, sigma, cond), want)
    for run in (teacher, student_dir):
        pipe = Pipeline.from_pretrained(run)
        images = pipe("7", n=2, steps=2, seed=0)
        assert len(images) == 2 and images[0].size == (8, 8)


def test_text_dit_generates_from_prompts(tmp_path):
    cfg = TrainConfig(
        data="shapes", out=str(tmp_path / "text"), size=16, steps=2, batch_size=4, channels=32,
        head_dim=16, depth=2, patch_size=4, backbone="dit", objective="flow", cond="text",
        text_encoder="scratch", sample_every=1000,
    )  # fmt: skip
    run = train(cfg, dataset=ShapesDataset(size=16, length=64), progress=False)
    pipe = Pipeline.from_pretrained(run)
    assert pipe.model.config.dit.context_dim is not None
    a = pipe("a red circle", n=1, steps=3, seed=0)[0]
    b = pipe("a red circle", n=1, steps=3, seed=0)[0]
    assert a.size == (16, 16) and a.tobytes() == b.tobytes()
