"""LoRA adapters: applied, merged and unloaded exactly; files of both layouts read as diffusers
reads them (on a tiny random Stable Diffusion pipeline, as test_sd builds it); training that
moves only the adapters; the bad inputs."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from difusion import Pipeline, lora
from difusion.checkpoints import read_safetensors
from difusion.data import load_dataset
from difusion.model import DiffusionModel, resolve_checkpoint
from difusion.runs import Run, TrainingError
from difusion.train import build_text_encoder, model_config_for, train

diffusers = pytest.importorskip("diffusers", reason="pip install -e '.[dev]' (make install)")
from test_sd import GUIDANCE, PROMPTS, STEPS, TOL, _latents, build, rel_err  # noqa: E402
from test_train import tiny  # noqa: E402

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "v_proj", "out_proj")
RANK = 4


def random_adapters(module: torch.nn.Module, targets, seed: int) -> dict[str, tuple]:
    """{module name: (down, up)} of random rank-RANK adapters on the `targets` layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and name.endswith(targets):
            w = m.weight
            down = 0.2 * torch.randn(RANK, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
            up = 0.2 * torch.randn(w.shape[0], RANK, *(1,) * (w.dim() - 2), generator=g)
            out[name] = (down, up)
    return out


def diffusers_file(path, parts: dict[str, dict]) -> None:
    save_file(
        {
            f"{root}.{name}.lora_{half}.weight": t.contiguous()
            for root, adapters in parts.items()
            for name, pair in adapters.items()
            for half, t in zip("AB", pair, strict=True)
        },
        str(path),
    )


def kohya_file(path, parts: dict[str, dict], alpha: float) -> None:
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    tensors = {}
    for root, adapters in parts.items():
        for name, (down, up) in adapters.items():
            stem = prefix[root] + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipe = build(root, v2=False)
    parts = {
        "unet": random_adapters(pipe.unet, UNET_TARGETS, 1),
        "text_encoder": random_adapters(pipe.text_encoder, TEXT_TARGETS, 2),
    }
    assert any(d.dim() == 4 and d.shape[-1] == 3 for d, _ in parts["unet"].values())  # 3x3 convs
    diffusers_file(root / "diffusers.safetensors", parts)
    kohya_file(root / "kohya.safetensors", parts, alpha=2.0)
    return root, pipe


def _images(pipe, ours: bool, latents, **kw):
    if ours:
        x = pipe.sample(PROMPTS, steps=STEPS, sampler="ddim", guidance=GUIDANCE, latents=latents)
        return (x + 1) / 2
    args = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents)
    return pipe(PROMPTS, output_type="pt", height=32, width=32, **args, **kw).images


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_both_layouts_match_diffusers(sd, layout):
    root, pipe = sd
    path = root / f"{layout}.safetensors"
    latents = _latents((2, 4, 16, 16))
    ours = Pipeline.from_pretrained(root / "folder", lora=[f"{path}:0.7"])
    assert sum(1 for _ in lora.lora_layers(ours.model.text_encoder.clip.model)) > 0
    pipe.load_lora_weights(str(path), adapter_name=layout)
    pipe.set_adapters([layout], [0.7])
    try:
        ref = _images(pipe, False, latents)
        base = _images(Pipeline.from_pretrained(root / "folder"), True, latents)
        assert rel_err(base, ref) > 10 * TOL  # the adapter does change the images
        assert rel_err(_images(ours, True, latents), ref) < TOL
    finally:
        pipe.unload_lora_weights()


def test_scale_zero_merge_and_unload(sd, tmp_path):
    root, _ = sd
    latents = _latents((2, 4, 16, 16))
    pipe = Pipeline.from_pretrained(root / "folder")
    before = {k: v.clone() for k, v in pipe.model.unet.state_dict().items()}
    base = _images(pipe, True, latents)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        before_out = pipe.model.unet(x, 981, context=ctx)
    names = lora.apply_loras(pipe.model, [(root / "kohya.safetensors", 0.0)])
    assert torch.equal(_images(pipe, True, latents), base)  # scale 0: the base exactly
    lora.set_scale(pipe.model, names[0], 0.5)
    merged = lora.merged(pipe.model)  # merging is exact to float rounding (which 4 DDIM steps
    assert not any(True for _ in lora.lora_layers(merged.unet))  # at guidance 7.5 amplify)
    with torch.no_grad():
        applied = pipe.model.unet(x, 981, context=ctx)
        assert rel_err(applied, merged.unet(x, 981, context=ctx)) < TOL / 10
        assert rel_err(applied, before_out) > 10 * TOL
    encode = lambda model: model.text_encoder.encode(PROMPTS)[0]  # noqa: E731
    assert rel_err(encode(merged), encode(pipe.model)) < TOL / 10
    lora.unload(pipe.model)
    after = pipe.model.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in after)
    assert torch.equal(_images(pipe, True, latents), base)  # text embeddings re-encoded too


def test_two_adapters_add_up(sd):
    root, _ = sd
    latents = _latents((2, 4, 16, 16))
    files = [(root / "kohya.safetensors", 0.5), (root / "diffusers.safetensors", 0.25)]
    both = Pipeline.from_pretrained(root / "folder", lora=files)
    assert lora.unload(both.model, names=["lora0"]) is both.model  # one of them out
    one = Pipeline.from_pretrained(root / "folder", lora=files[1:])
    assert rel_err(_images(both, True, latents), _images(one, True, latents)) < TOL


def test_bad_files(sd, tmp_path):
    root, _ = sd
    model = Pipeline.from_pretrained(root / "folder").model
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(lora.LoraError, match="not a safetensors file"):
        lora.apply_loras(model, [(tmp_path / "text.safetensors", 1.0)])
    save_file({"conv_in.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(lora.LoraError, match="no LoRA adapters"):
        lora.apply_loras(model, [(tmp_path / "model.safetensors", 1.0)])
    other = {"unet": {"no_such.layer": (torch.zeros(4, 8), torch.zeros(8, 4))}}
    diffusers_file(tmp_path / "other.safetensors", other)
    with pytest.raises(lora.LoraError, match="none of its 1 adapters matches"):
        lora.apply_loras(model, [(tmp_path / "other.safetensors", 1.0)])
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = {"unet": {q: (torch.zeros(4, 31), torch.zeros(32, 4))}}  # the layer takes 32
    diffusers_file(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(lora.LoraError, match=f"does not fit the layer {q}"):
        lora.apply_loras(model, [(tmp_path / "wrong.safetensors", 1.0)])
    ranks = {"unet": {q: (torch.zeros(4, 32), torch.zeros(32, 2))}}
    diffusers_file(tmp_path / "ranks.safetensors", ranks)
    with pytest.raises(lora.LoraError, match="down is rank 4, up rank 2"):
        lora.apply_loras(model, [(tmp_path / "ranks.safetensors", 1.0)])
    partly = {"unet": {q: (torch.zeros(4, 32), torch.zeros(32, 4)), **other["unet"]}}
    diffusers_file(tmp_path / "partly.safetensors", partly)
    with pytest.warns(UserWarning, match="1 of its 2 adapters fit no layer.*no_such"):
        lora.apply_loras(model, [(tmp_path / "partly.safetensors", 1.0)])


def test_spec():
    assert lora.parse_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert lora.parse_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert lora.parse_spec("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)


def _sha(model: DiffusionModel) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.unet.state_dict().items()):
        if ".lora_" not in k:
            h.update(k.replace(".base_layer", "").encode())
            h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# --- training -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny random text-to-image model of ours (shapes, scratch text encoder) to adapt."""
    path = tmp_path_factory.mktemp("base") / "model.safetensors"
    cfg = tiny(path.parent, data="shapes", size=16, cond="text", text_encoder="scratch",
               attention_resolutions=())  # fmt: skip
    data = load_dataset("shapes", 16, length=64)
    encoder = build_text_encoder(cfg, data)
    torch.manual_seed(0)
    DiffusionModel(model_config_for(cfg, data, encoder), text_encoder=encoder).save(path)
    return path


def lora_run(tmp_path, base, name="lora", **kw):
    cfg = dict(init=str(base), lora=4, lora_alpha=8, lora_targets="all", lr=1e-2, steps=6,
               attention_resolutions=())  # fmt: skip
    return tiny(tmp_path, name, data="shapes", **{**cfg, **kw})


def test_training_moves_only_the_adapter_and_lowers_the_loss(base_model):
    model = DiffusionModel.load(base_model).train()
    before = _sha(model)
    lora.add_trainable(model, RANK, None, "all")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # adapters only
    trainable = list(trainable.values())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    xt = model.schedule.q_sample(x0, t, eps)
    cond = model.text_cond(["a red circle"] * 8)
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    for _ in range(8):
        loss = (model.unet(xt, t, **cond) - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert _sha(model) == before


def test_lora_run_folder_resume_and_diffusers(base_model, tmp_path):
    from diffusers import UNet2DConditionModel

    out = train(lora_run(tmp_path, base_model), progress=False)
    path = out / lora.LORA_FILE
    assert path.stat().st_size < 200_000
    state = read_safetensors(Run(out).state_path)[0]
    frozen = {k.removeprefix("model.").replace(".base_layer", ""): v for k, v in state.items()
              if k.startswith("model.") and ".lora_" not in k}  # fmt: skip
    init = read_safetensors(base_model)[0]
    assert frozen.keys() == init.keys() and all(torch.equal(frozen[k], init[k]) for k in init)

    # resumed half way, the same adapter
    half = train(lora_run(tmp_path, base_model, "half", steps=3), progress=False)
    train(lora_run(tmp_path, base_model, "half", steps=6), resume=True, progress=False)
    resumed = read_safetensors(half / lora.LORA_FILE)[0]
    written = read_safetensors(path)[0]
    assert resumed.keys() == written.keys()
    assert all(torch.equal(resumed[k], written[k]) for k in written)

    # diffusers loads it: the same U-Net as ours with it applied, and as the run's merged model
    ours = DiffusionModel.load(base_model)
    lora.apply_loras(ours, [(path, 1.0)])
    ref = UNet2DConditionModel(**ours.config.unet.to_diffusers_kwargs()).eval()
    ref.load_state_dict({k: v for k, v in init.items() if not k.startswith("text_encoder.")})
    ref.load_lora_adapter(str(path), prefix="unet", adapter_name="ours")
    g = torch.Generator().manual_seed(3)
    x, ctx = (
        torch.randn(2, 3, 16, 16, generator=g),
        torch.randn(2, 6, ours.text_encoder.dim, generator=g),
    )
    t = torch.tensor([900, 20])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx).sample
        assert rel_err(ours.unet(x, t, context=ctx), expected) < TOL
        merged = DiffusionModel.load(out / "model.safetensors")
        assert rel_err(merged.unet(x, t, context=ctx), expected) < TOL
        assert rel_err(DiffusionModel.load(base_model).unet(x, t, context=ctx), expected) > TOL


def test_lora_training_needs_init(tmp_path):
    with pytest.raises(TrainingError, match="--init"):
        train(tiny(tmp_path, lora=4), progress=False)


# --- the server -------------------------------------------------------------------------------


def shipped_model_lora(path, **metadata: str) -> None:
    """A small random LoRA file (rank RANK, the attention layers) for the shipped model."""
    model = DiffusionModel.load(resolve_checkpoint("default"))
    lora.add_trainable(model, RANK, None, "attn")
    with torch.no_grad():
        for _, layer in lora.lora_layers(model.unet):
            layer.lora_B[lora.TRAIN].weight.normal_(
                0, 0.05, generator=torch.Generator().manual_seed(0)
            )
    lora.save_lora(model, path, **metadata)


def test_server_lora_tags(tmp_path):
    import httpx
    from serve_util import running
    from test_serve import decode, read_events, same

    from difusion.serve import ServeSettings, create_app
    from difusion.serve.models import load_models

    shipped_model_lora(tmp_path / "dots.safetensors", trigger="dots")
    models = load_models(["default"])
    body = {"prompt": "a red circle", "seed": 3, "steps": 4, "width": 32, "height": 32}
    with running(create_app(ServeSettings(lora_dir=str(tmp_path)), models)) as base:
        listed = httpx.get(f"{base}/sdapi/v1/loras").json()
        assert listed == [{"name": "dots", "alias": "dots", "path": str(tmp_path / "dots.safetensors"),
                           "metadata": {"format": "pt", "trigger": "dots"}}]  # fmt: skip

        def image(prompt: str):
            r = httpx.post(f"{base}/sdapi/v1/txt2img", json={**body, "prompt": prompt}, timeout=120)
            assert r.status_code == 200, r.text
            return decode(r.json()["images"][0])

        plain = image("a red circle")
        adapted = image("<lora:dots:0.8> a red circle")
        expected = Pipeline.from_pretrained(
            "default", lora=[f"{tmp_path / 'dots.safetensors'}:0.8"]
        )
        assert same(adapted, expected("a red circle", seed=3, steps=4)[0])
        assert not same(adapted, plain)
        assert same(image("a red circle"), plain)  # the next request: the base, bit for bit
        stream = {"prompt": "a red circle <lora:dots:0.8>", "seed": 3, "steps": 4}
        with httpx.stream("POST", f"{base}/api/generate", json=stream, timeout=120) as r:
            event, done = read_events(r)[-1]  # the page's route takes the tags too
        assert event == "done" and done["parameters"]["prompt"] == "a red circle"
        assert same(decode(done["images"][0]), adapted)
        r = httpx.post(f"{base}/sdapi/v1/txt2img", json={**body, "prompt": "<lora:nope:1> a"})
        assert r.status_code == 422 and "no LoRA named 'nope'" in r.text and "prompt" in r.text


def test_lora_alone_waits_for_shared_holders():
    import threading

    from difusion.serve.loras import SharedOrAlone

    lock, order = SharedOrAlone(), []
    with lock.hold(alone=False):
        t = threading.Thread(
            target=lambda: [lock.hold(alone=True).__enter__(), order.append("alone")]
        )
        t.start()
        with lock.hold(alone=False):  # shared holders share
            pass
        t.join(timeout=0.2)
        assert t.is_alive() and not order  # the alone one waits for the shared ones
        order.append("shared done")
    t.join()
    assert order == ["shared done", "alone"]


def test_distill_into_a_lora(base_model, tmp_path):
    from difusion.distill import DistillConfig, distill

    cfg = DistillConfig(teacher=str(base_model), out=str(tmp_path / "lcm"), data="shapes",
                        data_options={"length": 64}, batch_size=4, steps=3, lr=1e-2, warmup=1,
                        lora=RANK, sample_every=10**6, checkpoint_every=10**6)  # fmt: skip
    run = distill(cfg, progress=False)
    adapter = read_safetensors(run / lora.LORA_FILE)[0]
    assert adapter and all(k.startswith("unet.") and ".lora_" in k for k in adapter)
    student = DiffusionModel.load(run / "model.safetensors")  # the adapter merged in
    assert student.config.consistency["lora"] == RANK and student.config.sampler == "lcm"
    assert student.guidance_range == (1.0, 1.0) and student.config.unet.time_cond_proj_dim is None
    teacher, with_lora = DiffusionModel.load(base_model), DiffusionModel.load(base_model)
    assert lora.apply_loras(with_lora, [(run / lora.LORA_FILE, 1.0)]) == ["lora0"]
    g = torch.Generator().manual_seed(3)
    x, ctx = (
        torch.randn(2, 3, 16, 16, generator=g),
        torch.randn(2, 6, teacher.text_encoder.dim, generator=g),
    )
    with torch.no_grad():
        out = with_lora.unet(x, 500, context=ctx)
        assert rel_err(student.unet(x, 500, context=ctx), out) < TOL
        assert rel_err(teacher.unet(x, 500, context=ctx), out) > TOL  # it learnt something
    images = student.sample(2, cond=student.text_cond(["a red circle"] * 2))  # 4 lcm steps
    assert images.shape == (2, 3, 16, 16) and images.isfinite().all()


def test_cli_merge_and_bad_lora(base_model, tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    model = DiffusionModel.load(base_model)
    lora.add_trainable(model, RANK, None, "attn")
    with torch.no_grad():
        for _, layer in lora.lora_layers(model.unet):
            layer.lora_B[lora.TRAIN].weight.normal_(
                0, 0.05, generator=torch.Generator().manual_seed(1)
            )
    lora.save_lora(model, tmp_path / "a.safetensors")
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "lora",
        "merge",
        base_model,
        f"{tmp_path / 'a.safetensors'}:0.5",
        "--out",
        out,
    )
    assert code in (0, None), err
    lora.set_scale(model, lora.TRAIN, 0.5)
    expected = lora.merged(model).unet.state_dict()
    written = DiffusionModel.load(out).unet.state_dict()
    assert written.keys() == expected.keys()
    assert all(rel_err(written[k], expected[k]) < 1e-6 for k in expected)
    (tmp_path / "bad.safetensors").write_text("nope")
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "generate",
        "a red circle",
        "--model",
        base_model,
        "-n",
        "1",
        "--steps",
        "1",
        "--lora",
        tmp_path / "bad.safetensors",
        "-o",
        tmp_path / "g.png",
    )
    assert code == 1 and err.count("\n") == 1 and "not a safetensors file" in err


def test_alphas_from_diffusers_metadata(base_model, tmp_path):
    """diffusers' `lora_adapter_metadata` (alpha 8 on rank 4) doubles the adapter, as scale 2."""
    model = DiffusionModel.load(base_model)
    adapters = {"unet": random_adapters(model.unet, ("to_q", "to_v"), 4)}
    diffusers_file(tmp_path / "plain.safetensors", adapters)
    tensors = read_safetensors(tmp_path / "plain.safetensors")[0]
    meta = {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 8}'}
    save_file(tensors, str(tmp_path / "alpha.safetensors"), meta)
    g = torch.Generator().manual_seed(3)
    x, ctx = (
        torch.randn(2, 3, 16, 16, generator=g),
        torch.randn(2, 6, model.text_encoder.dim, generator=g),
    )

    def output(spec):
        m = DiffusionModel.load(base_model)
        lora.apply_loras(m, [spec])
        with torch.no_grad():
            return m.unet(x, 500, context=ctx)

    doubled = output((tmp_path / "plain.safetensors", 2.0))
    assert rel_err(output((tmp_path / "alpha.safetensors", 1.0)), doubled) < TOL / 10
    assert rel_err(output((tmp_path / "plain.safetensors", 1.0)), doubled) > TOL
