"""Stable Diffusion in our modules, checked against diffusers on tiny random pipelines.

A tiny SD 1.x-style pipeline (and a v-prediction SD 2.x-style one) is built with diffusers and
saved twice: as a diffusers folder and as one original (LDM-layout) checkpoint, whose key
renaming is written here (and checked against diffusers' own LDM -> diffusers converters).
Both load into difusion; the U-Net, the VAE, the prompt embeddings, the DDIM timesteps and the
final images must equal diffusers' for the same latents.
"""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from difusion import Pipeline
from difusion.checkpoints import CheckpointError
from difusion.schedule import NoiseSchedule, ScheduleConfig
from difusion.sd import clip_tokenizer, is_sd_checkpoint, open_clip_bpe

diffusers = pytest.importorskip("diffusers", reason="pip install -e '.[dev]' (make install)")

WORDS = ["a", "red", "blue", "circle", "square", "above", "photo", "of", "cat"]
PROMPTS = ["a red circle above a blue square", "a photo of a cat"]
STEPS = 4
GUIDANCE = 7.5
TOL = 1e-4
# Stable Diffusion 1.5's scheduler_config.json
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _perturb(module: torch.nn.Module) -> None:
    """Random norm weights and biases too, so that no mis-mapped 1 or 0 goes unnoticed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _tokenizer(folder):
    """A tiny CLIP BPE: single letters, the WORDS whole, "!" (OpenCLIP's padding), specials last."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["!", "!</w>", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    merges = list(dict.fromkeys(merges))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def build(root, v2: bool):
    """A tiny random diffusers StableDiffusionPipeline (DDIM), saved in `root`/folder."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tokenizer(root / "bpe")
    if v2:
        tok = type(tok).from_pretrained(str(root / "bpe"), model_max_length=77, pad_token="!")
    torch.manual_seed(0)
    chans = (64, 64, 128) if v2 else (32, 32, 64)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=chans,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        # SD 1.x: 8 heads everywhere; SD 2.x: 64-d heads, linear projections
        attention_head_dim=tuple(c // 64 for c in chans) if v2 else 8,
        use_linear_projection=v2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        sample_size=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu" if v2 else "quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    for m in (unet, vae, text):
        _perturb(m)
        m.eval()
    if v2:
        sched = DDIMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": "v_prediction"})
    else:
        # what SD 1.5 ships (clip_sample, which PNDM ignores, included); DDIM runs from its config
        sched = PNDMScheduler.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "folder")
    pipe.scheduler = DDIMScheduler.from_config(sched.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- diffusers -> original LDM layout (the inverse of what difusion.sd reads) --------------------

RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]


def _res(rest):
    for a, b in RESNET:
        if rest.startswith(a + "."):
            return b + rest[len(a) :]
    raise KeyError(rest)


def ldm_unet(state, cfg):
    L1 = cfg["layers_per_block"] + 1
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for k, v in state.items():
        head, _, tail = k.rpartition(".")
        if head in fixed:
            new = f"{fixed[head]}.{tail}"
        elif m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(\w+)", k):
            new = f"input_blocks.{(int(m[1]) + 1) * L1}.0.op.{m[2]}"
        elif m := re.fullmatch(r"down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", k):
            i = 1 + int(m[1]) * L1 + int(m[3])
            new = f"input_blocks.{i}." + (f"0.{_res(m[4])}" if m[2] == "resnets" else f"1.{m[4]}")
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", k):
            new = f"middle_block.{2 * int(m[1])}.{_res(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(\w+)", k):
            b = int(m[1])
            new = f"output_blocks.{b * L1 + L1 - 1}.{2 if up_attn[b] else 1}.conv.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.(.+)", k):
            i = int(m[1]) * L1 + int(m[3])
            new = f"output_blocks.{i}." + (f"0.{_res(m[4])}" if m[2] == "resnets" else f"1.{m[4]}")
        else:
            raise KeyError(k)
        out[new] = v
    return out


def ldm_vae(state, n_levels):
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in state.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        if m := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if v.dim() == 2:
                v = v[:, :, None, None]  # LDM: 1x1 convolutions
        new = re.sub(r"encoder\.down_blocks\.(\d)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(
            r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", new
        )

        def up(m, what):
            return f"decoder.up.{n_levels - 1 - int(m[1])}.{what}"

        new = re.sub(r"decoder\.up_blocks\.(\d)\.resnets", lambda m: up(m, "block"), new)
        new = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0", lambda m: up(m, "upsample"), new)
        out[new] = v
    return out


def openclip_text(state, extra_layer: dict):
    """transformers CLIP -> OpenCLIP's text tower, with one more (unused) last layer, as SD 2.x
    files have (SD 2.x reads the penultimate layer)."""
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    width = out["token_embedding.weight"].shape[1]
    out["text_projection"] = torch.randn(width, width)
    out["logit_scale"] = torch.tensor(4.6)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj"}
    names |= {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {**state, **extra_layer}
    n = 1 + max(int(k.split(".")[2]) for k in layers if k.startswith("encoder.layers."))
    for i in range(n):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [layers[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in names.items():
                out[f"transformer.resblocks.{i}.{b}.{kind}"] = layers[f"{p}{a}.{kind}"]
    return out


def write_single_file(pipe, path, v2: bool):
    """The tiny pipeline as one original SD checkpoint; checked against diffusers' converters."""
    from diffusers.loaders import single_file_utils as sfu

    unet_sd, vae_sd = pipe.unet.state_dict(), pipe.vae.state_dict()
    text_sd = pipe.text_encoder.state_dict()
    u = ldm_unet(unet_sd, pipe.unet.config)
    v = ldm_vae(vae_sd, len(pipe.vae.config.block_out_channels))
    state = {f"model.diffusion_model.{k}": t for k, t in u.items()}
    state |= {f"first_stage_model.{k}": t for k, t in v.items()}
    # the converters diffusers uses to read such files give back the original tensors
    back = sfu.convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))
    assert back.keys() == unet_sd.keys()
    assert all(torch.equal(back[k], unet_sd[k]) for k in back)
    back = sfu.convert_ldm_vae_checkpoint(state, dict(pipe.vae.config))
    assert back.keys() == vae_sd.keys()
    assert all(torch.equal(back[k], vae_sd[k].reshape(back[k].shape)) for k in back)
    if v2:
        g = torch.Generator().manual_seed(3)
        extra = {
            k.replace("layers.1.", "layers.2."): torch.randn(t.shape, generator=g)
            for k, t in text_sd.items()
            if k.startswith("encoder.layers.1.")
        }
        o = openclip_text(text_sd, extra)
        state |= {f"cond_stage_model.model.{k}": t for k, t in o.items()}
        back = sfu.convert_open_clip_checkpoint(pipe.text_encoder, state)
        back = {k.removeprefix("text_model."): t for k, t in back.items()}
        back = {k: t for k, t in back.items() if not k.startswith("encoder.layers.2.")}
        assert all(torch.equal(back[k], text_sd[k]) for k in text_sd)
    else:  # SD 1.x files keep transformers' names (of transformers 4, with text_model.)
        state |= {f"cond_stage_model.transformer.text_model.{k}": t for k, t in text_sd.items()}
    state["alphas_cumprod"] = pipe.scheduler.alphas_cumprod.clone()
    save_file({k: t.contiguous() for k, t in state.items()}, str(path))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd1")
    pipe = build(root, v2=False)
    write_single_file(pipe, root / "sd1.safetensors", v2=False)
    return root, pipe


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    pipe = build(root, v2=True)
    write_single_file(pipe, root / "sd2.safetensors", v2=True)
    return root, pipe


def _latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference(pipe, latents, **kw):
    """diffusers' latents and images ([0, 1]) for PROMPTS with these initial latents."""
    args = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, **kw)
    lat = pipe(PROMPTS, output_type="latent", **args).images
    img = pipe(PROMPTS, output_type="pt", **args).images
    return lat, img


def _check_conformance(ours, pipe, height=32, width=48):
    """U-Net, VAE, prompt embeddings, timesteps and final images against diffusers."""
    g = torch.Generator().manual_seed(5)
    h, w = height // 2, width // 2
    x = torch.randn(2, 4, h, w, generator=g)
    ctx = torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([981.0, 1.0])
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        assert rel_err(ours.model.unet(x, t, context=ctx), ref) < TOL
        ref = pipe.vae.decode(x).sample
        assert rel_err(ours.vae.decode(x), ref) < TOL
        emb, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    tokens, _ = ours.model.text_encoder.encode(PROMPTS)
    assert rel_err(tokens, emb) < TOL
    assert rel_err(ours.model.text_encoder.encode(["", ""])[0], neg) < TOL

    # "leading" spacing + steps_offset 1 gives diffusers' DDIM timesteps; the last step of
    # set_alpha_to_one=False ends at abar_0, i.e. at sigma_min
    pipe.scheduler.set_timesteps(STEPS)
    sched = ours.model.schedule
    cfg = ours.model.config
    sigmas = sched.sample_sigmas(STEPS, cfg.spacing, cfg.steps_offset, sched.sigma_min)
    ts = sched.sigma_to_t(sigmas[:-1])
    assert torch.allclose(ts, pipe.scheduler.timesteps.double(), atol=1e-3)
    abar0 = float(pipe.scheduler.final_alpha_cumprod)
    assert float(sigmas[-1]) == pytest.approx(((1 - abar0) / abar0) ** 0.5, rel=1e-6)

    latents = _latents((2, 4, h, w))
    ref_lat, ref_img = _reference(pipe, latents, height=height, width=width)
    kw = dict(steps=STEPS, sampler="ddim", guidance=GUIDANCE, latents=latents)
    kw |= dict(height=height, width=width)
    lat = ours.sample(PROMPTS, decode=False, **kw)
    img = ours.sample(PROMPTS, **kw)
    errors = rel_err(lat, ref_lat), rel_err((img + 1) / 2, ref_img)
    assert max(errors) < TOL, errors
    return errors


def test_folder_sd1(sd1):
    root, pipe = sd1
    assert is_sd_checkpoint(root / "folder")
    ours = Pipeline.from_pretrained(root / "folder")
    cfg = ours.model.config
    assert (cfg.prediction, cfg.spacing, cfg.steps_offset, cfg.clip_x0) == (
        "eps",
        "leading",
        1,
        False,
    )
    assert (cfg.image_size, cfg.channels, ours.image_size, ours.set_alpha_to_one) == (
        16,
        4,
        32,
        False,
    )
    assert cfg.unet.num_heads == 8 and not cfg.unet.use_linear_projection
    _check_conformance(ours, pipe)


def test_single_file_sd1(sd1):
    root, pipe = sd1
    path = root / "sd1.safetensors"
    assert is_sd_checkpoint(path)
    ours = Pipeline.from_pretrained(path, tokenizer=root / "folder", image_size=16)
    folder = Pipeline.from_pretrained(root / "folder")
    assert ours.model.config.unet == folder.model.config.unet
    assert ours.vae.config == folder.vae.config
    for a, b in [(ours.model.unet, folder.model.unet), (ours.vae, folder.vae)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ours.model.config.prediction == "eps"
    _check_conformance(ours, pipe)


def test_v_prediction_sd2(sd2):
    root, pipe = sd2
    folder = Pipeline.from_pretrained(root / "folder")
    assert folder.model.config.prediction == "v"
    assert folder.model.config.unet.use_linear_projection
    _check_conformance(folder, pipe)
    single = Pipeline.from_pretrained(
        root / "sd2.safetensors", tokenizer=root / "folder", image_size=16
    )
    assert single.model.config.prediction == "v"  # SD 2.x single files: v unless told otherwise
    assert single.model.config.unet == folder.model.config.unet
    assert single.model.text_encoder.clip.tokenizer.pad_token == "!"  # OpenCLIP pads with "!"
    _check_conformance(single, pipe, height=32, width=32)


def test_img2img_matches_diffusers(sd1):
    from diffusers import StableDiffusionImg2ImgPipeline

    root, pipe = sd1
    ours = Pipeline.from_pretrained(root / "folder")
    ref_pipe = StableDiffusionImg2ImgPipeline(**pipe.components)
    ref_pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, strength=0.6)
    gen = torch.Generator().manual_seed(7)
    ref = ref_pipe(PROMPTS[0], image=image, generator=gen, output_type="latent", **kw).images
    mine = ours.sample(
        PROMPTS[0], steps=STEPS, sampler="ddim", guidance=GUIDANCE, seed=7, image=image,
        strength=0.6, decode=False,
    )  # fmt: skip
    assert rel_err(mine, ref) < TOL


def test_inpainting_keeps_the_unmasked_region(sd1):
    root, _ = sd1
    ours = Pipeline.from_pretrained(root / "folder")
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    mask = torch.zeros(32, 48)
    mask[8:24, 16:40] = 1  # generate the middle, keep the border
    noise = _latents((1, 4, 16, 24), seed=2)
    kw = dict(steps=STEPS, sampler="ddim", seed=3, image=image, latents=noise, decode=False)
    out = ours.sample("a red circle", mask_image=mask, **kw)
    init = ours.encode(image, torch.Generator().manual_seed(3))  # the same posterior sample
    s = ours.model.schedule.sigma_min  # DDIM's last sigma (set_alpha_to_one=False)
    kept = (init + s * noise) / (1 + s**2) ** 0.5
    m = torch.zeros(1, 1, 16, 24)
    m[..., 4:12, 8:20] = 1
    torch.testing.assert_close(out * (1 - m), kept * (1 - m), rtol=0, atol=1e-5)
    assert (out - kept)[..., 4:12, 8:20].abs().mean() > 0.1  # the middle is new
    full = ours.sample("a red circle", mask_image=torch.ones(32, 48), **kw)
    img2img = ours.sample("a red circle", strength=1.0, **kw)  # a full mask is img2img
    torch.testing.assert_close(full, img2img)
    pil_mask = Image.fromarray((mask.numpy() * 255).astype(np.uint8))
    torch.testing.assert_close(ours.sample("a red circle", mask_image=pil_mask, **kw), out)


def test_memory_options(sd1):
    root, _ = sd1
    ours = Pipeline.from_pretrained(root / "folder")
    kw = dict(steps=2, sampler="ddim", latents=_latents((1, 4, 16, 24)), height=32, width=48)
    full = ours.sample("a red circle", **kw)
    ours.vae_tile = 8  # latent pixels: 16x24 decodes in overlapping 8x8 tiles
    tiled = ours.sample("a red circle", **kw)
    assert tiled.shape == full.shape == (1, 3, 32, 48) and torch.isfinite(tiled).all()
    ours.vae_tile = None
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no native bfloat16 on this CPU (needs AVX-512 bf16 or AMX)")
    bf16 = Pipeline.from_pretrained(root / "folder", dtype=torch.bfloat16)
    assert bf16.model.unet.conv_in.weight.dtype == torch.bfloat16
    assert bf16.model.text_encoder.clip.model.dtype == torch.float32
    assert rel_err(bf16.sample("a red circle", **kw), full) < 0.05
    bf16.to(dtype=torch.float32)  # the input casts go too
    assert bf16._hook is None and rel_err(bf16.sample("a red circle", **kw), full) < 0.05


def test_ckpt_only_as_plain_tensors(sd1, tmp_path):
    from safetensors.torch import load_file

    root, _ = sd1
    state = load_file(str(root / "sd1.safetensors"))
    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    ours = Pipeline.from_pretrained(ckpt, tokenizer=root / "folder", image_size=16)
    ref = Pipeline.from_pretrained(
        root / "sd1.safetensors", tokenizer=root / "folder", image_size=16
    )
    kw = dict(steps=2, sampler="ddim", latents=_latents((1, 4, 16, 16)), decode=False)
    torch.testing.assert_close(ours.sample("a cat", **kw), ref.sample("a cat", **kw))

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state, "callback": Evil()}, bad)
    with pytest.raises(CheckpointError, match="weights_only") as err:
        Pipeline.from_pretrained(bad, tokenizer=root / "folder")
    assert "\n" not in str(err.value)


def test_bad_checkpoints(sd1, tmp_path):
    root, _ = sd1
    folder = tmp_path / "pickles"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        src = root / "folder" / part
        (folder / part).mkdir(parents=True)
        for f in src.iterdir():
            (folder / part / f.name).write_bytes(f.read_bytes())
    (folder / "model_index.json").write_bytes((root / "folder" / "model_index.json").read_bytes())
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(
        folder / "unet" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(CheckpointError, match="never unpickled"):
        Pipeline.from_pretrained(folder)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    assert not is_sd_checkpoint(other) and not is_sd_checkpoint(tmp_path)
    with pytest.raises(CheckpointError):
        Pipeline.from_pretrained(other)
    with pytest.raises(ValueError, match="multiples of 2"):
        Pipeline.from_pretrained(root / "folder").sample("a cat", height=31)


def test_final_sigma():
    sched = NoiseSchedule(ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012))
    default = sched.sample_sigmas(10, "leading", 1)
    assert default[-1] == 0
    ended = sched.sample_sigmas(10, "leading", 1, final_sigma=sched.sigma_min)
    torch.testing.assert_close(ended[:-1], default[:-1], rtol=0, atol=0)
    assert float(ended[-1]) == pytest.approx(sched.sigma_min)


def test_open_clip_vocabulary():
    pytest.importorskip("transformers")
    try:
        open_clip_bpe()
    except CheckpointError:
        pytest.skip(
            "open_clip_torch is not installed: make install (pip install --no-deps open_clip_torch)"
        )
    tok = clip_tokenizer()
    assert len(tok) == 49408 and (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == [49407] * 70  # SD 1.x pads with <|endoftext|>
    sd2 = clip_tokenizer(pad_token="!")
    assert sd2("a cat", padding="max_length", max_length=8).input_ids[4:] == [0] * 4


def test_cli_generate(sd1, tmp_path):
    from typer.testing import CliRunner

    from difusion.cli import app

    root, _ = sd1
    out = tmp_path / "g.png"
    args = ["generate", "a red circle", "-n", "1", "--steps", "2", "--model", str(root / "folder")]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] >= 32
