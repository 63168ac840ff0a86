"""Training LoRA adapters on models `--init` did not read before: Stable Diffusion checkpoints
(the tiny random pipeline test_sd builds, a diffusers folder and a single file) and latent
models of ours. Only the adapter moves; the file it writes applies through the project, and for
SD through diffusers' own `load_lora_weights`, to the same latents; resume is exact; bad input
is one line."""

import hashlib

import pytest
import torch
from cli_util import cli
from PIL import Image

from difusion import Pipeline, lora
from difusion.checkpoints import read_safetensors
from difusion.data import DigitsDataset
from difusion.model import DiffusionModel
from difusion.runs import Run, TrainingError
from difusion.train import TrainConfig, model_config_for, train

diffusers = pytest.importorskip("diffusers", reason="pip install -e '.[dev]' (make install)")
from test_latent import tiny_unet, tiny_vae  # noqa: E402
from test_sd import (  # noqa: E402
    GUIDANCE,
    PROMPTS,
    STEPS,
    TOL,
    _latents,
    build,
    rel_err,
    write_single_file,  # noqa: E402
)

CAPTIONS = ["a red circle", "a blue square", "a photo of a cat", "a red square above a circle"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD 1.x pipeline (16 latent pixels, a VAE of factor 2: 32 px pictures) and a
    folder of eight captioned 32 px pictures."""
    root = tmp_path_factory.mktemp("sd")
    pipe = build(root, v2=False)
    data = root / "pictures"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return root, pipe


def sd_run(root, out, **kw) -> TrainConfig:
    cfg = dict(
        data=str(root / "pictures"), out=str(out), init=str(root / "folder"), lora=4,
        lora_targets="all", steps=4, batch_size=4, lr=1e-2, warmup=1, log_every=1,
        checkpoint_every=2, sample_every=1000, device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**cfg, **kw})


def _files_sha(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def no_previews(monkeypatch):
    """The end-of-run sample grid (18 pictures of 20 steps: most of a tiny run's time) left out
    where a test does not look at it; test_sd_lora_on_a_single_file draws it."""
    monkeypatch.setattr("difusion.train.preview", lambda *args, **kwargs: None)


def test_sd_adapter_trains_resumes_and_loads_in_diffusers(sd, tmp_path, no_previews):
    root, pipe = sd
    base_sha = _files_sha(root / "folder")
    out = train(sd_run(root, tmp_path / "whole"), progress=False)
    assert _files_sha(root / "folder") == base_sha
    path = out / lora.LORA_FILE
    adapter = read_safetensors(path)[0]
    assert adapter and all(k.startswith("unet.") and ".lora_" in k for k in adapter)
    assert any(k.endswith("conv1.lora_A.weight") for k in adapter)  # targets "all": convs too
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # moved
    # the state holds the adapter, its EMA and the optimizer: not a copy of the SD base
    state = read_safetensors(Run(out).state_path)[0]
    weights = [k for k in state if k.startswith(("model.", "ema_lora."))]
    assert weights and all(".lora_" in k for k in weights)

    # resumed half way: the same adapter
    half = train(sd_run(root, tmp_path / "half", steps=2), progress=False)
    train(sd_run(root, tmp_path / "half"), resume=True, progress=False)
    resumed = read_safetensors(half / lora.LORA_FILE)[0]
    assert resumed.keys() == adapter.keys()
    assert all(torch.equal(resumed[k], adapter[k]) for k in adapter)

    # diffusers' load_lora_weights on the same pipeline: the same latents as ours with it
    latents = _latents((2, 4, 16, 16))
    kw = dict(steps=STEPS, sampler="ddim", guidance=GUIDANCE, latents=latents, decode=False)
    ours = Pipeline.from_pretrained(root / "folder", lora=[str(path)]).sample(PROMPTS, **kw)
    base = Pipeline.from_pretrained(root / "folder").sample(PROMPTS, **kw)
    pipe.load_lora_weights(str(path), adapter_name="trained")
    try:
        args = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents)
        ref = pipe(PROMPTS, output_type="latent", **args).images
    finally:
        pipe.unload_lora_weights()
    assert rel_err(base, ref) > 10 * TOL  # the adapter changes the latents
    assert rel_err(ours, ref) < TOL
    # the run folder as a model: its adapter on the checkpoint it names
    assert torch.equal(Pipeline.from_pretrained(out).sample(PROMPTS, **kw), ours)


def test_sd2_v_prediction(sd, tmp_path_factory, no_previews):
    """An SD 2.x-style checkpoint (v-prediction, linear projections): trained on v, and the run
    applies to it."""
    import json

    root, _ = sd
    sd2 = tmp_path_factory.mktemp("sd2")
    build(sd2, v2=True)
    out = train(sd_run(root, sd2 / "run", init=str(sd2 / "folder"), steps=2), progress=False)
    assert json.loads((out / "train_config.json").read_text())["prediction"] == "v"
    kw = dict(steps=2, sampler="ddim", guidance=GUIDANCE, latents=_latents((1, 4, 16, 16)))
    adapted = Pipeline.from_pretrained(out).sample(PROMPTS[:1], decode=False, **kw)
    base = Pipeline.from_pretrained(sd2 / "folder").sample(PROMPTS[:1], decode=False, **kw)
    assert rel_err(adapted, base) > 10 * TOL


def test_sd_lora_on_a_single_file(sd, tmp_path):
    """One original checkpoint, with no tokenizer beside it (open_clip's BPE vocabulary: the
    tiny text encoder's table padded to its size), at --size 32 (its guessed resolution is
    SD 1.x's 512)."""
    from transformers import CLIPTextModel

    root, pipe = sd
    text = CLIPTextModel(pipe.text_encoder.config)
    text.load_state_dict(pipe.text_encoder.state_dict())
    text.resize_token_embeddings(49408)
    single = type(pipe)(**{**pipe.components, "text_encoder": text})
    path = tmp_path / "sd.safetensors"
    write_single_file(single, path, v2=False)
    out = train(sd_run(root, tmp_path / "run", init=str(path), size=32, steps=2), progress=False)
    written = read_safetensors(out / lora.LORA_FILE)[0]
    model_file = read_safetensors(out / "model.safetensors")[0]
    assert written.keys() == model_file.keys() and all(".lora_" in k for k in written)
    assert Image.open(out / "samples.png").size[0] >= 6 * 32  # six prompts' columns, 32 px
    # the adapter fits the folder's U-Net too (the same names, the same weights' shapes)
    ours = Pipeline.from_pretrained(root / "folder", lora=[str(out / lora.LORA_FILE)])
    assert sum(1 for _ in lora.lora_layers(ours.model.unet)) == len(written) // 2


def test_sd_cli_and_bad_input(sd, tmp_path, monkeypatch, capsys, no_previews):
    root, _ = sd
    common = ["train", "--init", root / "folder", "--data", root / "pictures", "--steps", "1",
              "--batch-size", "2", "--sample-every", "1000", "--device", "cpu"]  # fmt: skip
    code, _, err = cli(monkeypatch, capsys, *common, "--lora", "2", "--size", "32", "--out",
                       tmp_path / "ok")  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "ok" / lora.LORA_FILE).is_file()
    picture = tmp_path / "cat.png"
    code, _, err = cli(monkeypatch, capsys, "generate", "a photo of a cat", "--model",
                       tmp_path / "ok", "--steps", "2", "-n", "1", "-o", picture)  # fmt: skip
    assert code == 0 and Image.open(picture).size[0] >= 32, err
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    Image.new("RGB", (32, 32)).save(uncaptioned / "0.png")
    bad = [
        (["--lora", "2", "--layout-map"], "--layout-map is for models of ours"),
        (["--lora", "2", "--size", "20"], "image size 20 does not fit --init"),
        ([], "trains a LoRA: give --lora RANK"),
        (["--lora", "2", "--channels", "8"], "--channels: --init keeps the model's own"),
        (["--lora", "2", "--data", uncaptioned], "needs captioned data"),
        (["--lora", "2", "--data-option", "channels=1"], "1-channel images; the VAE of --init"),
    ]
    for i, (args, message) in enumerate(bad):
        code, _, err = cli(monkeypatch, capsys, *common, *args, "--out", tmp_path / f"bad{i}")
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / f"bad{i}").exists()


# --- latent models of ours ----------------------------------------------------------------


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """A tiny class-conditional latent model of ours, on a tiny VAE's latents (16 px digits)."""
    from difusion.vae_train import latent_spec, train_vae

    tmp = tmp_path_factory.mktemp("latent")
    data = DigitsDataset(size=16)
    vae_run = train_vae(tiny_vae(tmp, steps=2), dataset=data, progress=False)
    cfg = tiny_unet(tmp, vae_run, cond="label")
    spec, _ = latent_spec(vae_run)
    torch.manual_seed(0)
    path = tmp / "ldm.safetensors"
    DiffusionModel(model_config_for(cfg, data, latent=spec)).save(path)
    return path


def latent_run(tmp_path, base, name, **kw) -> TrainConfig:
    cfg = dict(
        data="digits", out=str(tmp_path / name), init=str(base), steps=4, batch_size=4, lr=1e-2,
        warmup=1, log_every=1, checkpoint_every=2, sample_every=1000, device="cpu", lora=4,
        lora_targets="all",
    )  # fmt: skip
    return TrainConfig(**{**cfg, **kw})


def test_latent_model_lora_and_whole_init(latent_model, tmp_path):
    out = train(latent_run(tmp_path, latent_model, "lora"), progress=False)
    state = read_safetensors(Run(out).state_path)[0]
    frozen = {k.removeprefix("model.").replace(".base_layer", ""): v for k, v in state.items()
              if k.startswith("model.") and ".lora_" not in k}  # fmt: skip
    init = read_safetensors(latent_model)[0]
    assert frozen.keys() == init.keys() and all(torch.equal(frozen[k], init[k]) for k in init)

    # the adapter on the latent model through the project = the run's merged model; != the base
    path = out / lora.LORA_FILE
    adapted = Pipeline.from_pretrained(latent_model, lora=[str(path)])
    assert adapted.vae is not None and adapted.model.config.latent is not None
    kw = dict(steps=3, seed=1, n=2)
    images = adapted.sample("3", **kw)
    assert images.shape == (2, 1, 16, 16)
    assert rel_err(Pipeline.from_pretrained(out).sample("3", **kw), images) < 1e-4
    assert rel_err(Pipeline.from_pretrained(latent_model).sample("3", **kw), images) > 1e-3

    # resumed half way: the same adapter
    half = train(latent_run(tmp_path, latent_model, "half", steps=2), progress=False)
    train(latent_run(tmp_path, latent_model, "half"), resume=True, progress=False)
    a, b = read_safetensors(half / lora.LORA_FILE)[0], read_safetensors(path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the whole model fine-tuned (no adapter): every weight may move, the VAE is the same one
    whole = train(latent_run(tmp_path, latent_model, "whole", lora=0, lora_targets="attn",
                             steps=2), progress=False)  # fmt: skip
    tuned = DiffusionModel.load(whole / "model.safetensors")
    assert tuned.config.latent == DiffusionModel.load(latent_model).config.latent
    moved = read_safetensors(whole / "model.safetensors")[0]
    assert any(not torch.equal(moved[k], init[k]) for k in init)


def test_latent_init_refuses_data_that_does_not_fit(latent_model, tmp_path):
    with pytest.raises(TrainingError, match=r"does not fit 'fashion' .*\(class_names differ\)"):
        train(latent_run(tmp_path, latent_model, "bad", data="fashion"), progress=False)
    assert not (tmp_path / "bad").exists()
