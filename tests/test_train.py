import json
import time
from dataclasses import replace

import pytest
import torch

from difusion.data import DigitsDataset
from difusion.loop import Stop, TrainLoop
from difusion.model import DiffusionModel
from difusion.runs import Run, TrainingError
from difusion.train import TrainConfig, train


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(
        data="digits",
        out=str(tmp_path / name),
        size=8,
        steps=6,
        batch_size=4,
        channels=16,
        channel_mult=(1, 2),
        attention_resolutions=(4,),
        layers_per_block=1,
        head_dim=16,
        log_every=1,
        checkpoint_every=3,
        sample_every=1000,
        warmup=2,
        dropout=0.1,  # dropout draws from the global RNG: resume must restore it too
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits8():
    return DigitsDataset(size=8)


def weights(path):
    return DiffusionModel.load(path / "model.safetensors").unet.state_dict()


def raw_weights(path):
    from safetensors.torch import load_file

    return load_file(path / "train_state.safetensors")


def test_train_loop_budget_log_and_callback(tmp_path):
    run = Run(tmp_path / "r")
    run.dir.mkdir()
    seen = []
    loop = TrainLoop(run, 2, 7, Stop(None), 2, False, on_step=lambda s, r: seen.append((s, r["a"])))
    while loop.running():
        loop.advance({"a": float(loop.step), "b": 1.0}, lr=0.1)
    assert loop.step == 7 and seen == [(3, 2.0), (4, 3.0), (5, 4.0), (6, 5.0), (7, 6.0)]
    # means over each logging window: steps 3-4, 5-6, then the last step 7
    assert [(r["step"], r["a"]) for r in run.read_log()] == [(4, 2.5), (6, 4.5), (7, 6.0)]
    assert all(r["lr"] == 0.1 and r["b"] == 1.0 for r in run.read_log())
    loop = TrainLoop(run, 0, 10, Stop(1e-6), 1, False)
    time.sleep(0.01)
    assert not loop.running()  # no minutes left
    loop = TrainLoop(run, 4, 10, Stop(None), 1, False)
    loop.saved_step = 3
    with pytest.raises(TrainingError, match="at step 5; stopping: the last good checkpoint"):
        loop.check_finite("loss", torch.tensor(float("nan")))


def test_budget_keeps_back_the_work_after_the_last_step():
    stop = Stop(1.0)  # 60 s
    assert not stop.requested()
    stop.reserve = 61.0  # the last grid and checkpoint took that long: no time for a step
    assert stop.requested()


def test_on_step_sees_plain_numbers_without_a_warning(tmp_path):
    import warnings

    run = Run(tmp_path / "r")
    run.dir.mkdir()
    seen = []
    loop = TrainLoop(run, 0, 1, Stop(None), 1, False, on_step=lambda s, r: seen.append(r))
    loss = (torch.ones(2, requires_grad=True) * 3).mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of float() of a tensor that needs grad
        loop.advance({"loss": loss}, lr=0.1)
    assert seen == [{"loss": 3.0}]


def test_minutes_cover_the_final_grid(tmp_path, digits8, monkeypatch):
    """With a grid every step, the budget keeps back the time the last one took: the whole
    run, its final grid included, ends within the budget and a fraction of a grid (without
    the reserve it ends a whole grid later)."""
    import difusion.train as training
    from difusion.previews import preview
    from difusion.train import model_config_for

    stops = []

    class Watched(Stop):  # the budget's own clock, seen from here
        def __init__(self, minutes):
            super().__init__(minutes)
            stops.append(self)

    # a first save, grid and plot import their libraries: paid here, not in the budget
    train(tiny(tmp_path, "warm", steps=1, sample_every=1), dataset=digits8, progress=False)
    monkeypatch.setattr(training, "Stop", Watched)
    cfg = tiny(tmp_path, steps=10**6, sample_every=1, checkpoint_every=1)
    started = time.monotonic()
    preview(DiffusionModel(model_config_for(cfg, digits8)), tmp_path / "grid.png")
    grid = time.monotonic() - started  # what a grid of this model costs on this machine now
    cfg = replace(cfg, minutes=max(0.25, 10 * grid / 60))  # the first grid imports matplotlib
    steps = []
    train(cfg, dataset=digits8, progress=False, on_step=lambda *_: steps.append(1))
    took = time.monotonic() - stops[0].start
    assert len(steps) > 1 and took < cfg.minutes * 60 + 0.5 * grid, (took, grid, len(steps))


def test_resume_continues_exactly(tmp_path, digits8):
    full = train(tiny(tmp_path, "full", steps=6), dataset=digits8, progress=False)
    half = train(tiny(tmp_path, "half", steps=3), dataset=digits8, progress=False)
    # what shapes the optimisation comes from the run, not from the resuming command
    again = tiny(tmp_path, "half", steps=6, lr=0.5, min_snr_gamma=5.0, batch_size=2)
    resumed = train(again, resume=True, dataset=digits8, progress=False)
    assert resumed == half
    a, b = raw_weights(full), raw_weights(resumed)
    for key in a:
        if key.startswith(("model.", "opt.")):
            assert torch.equal(a[key], b[key]), key
    ema_a, ema_b = weights(full), weights(resumed)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # the log of the resumed run reads like one run
    assert [r["step"] for r in Run(resumed).read_log()] == list(range(1, 7))


def test_training_reduces_loss_and_writes_run_files(tmp_path, digits8):
    losses = []
    out = train(
        tiny(tmp_path, steps=40, lr=2e-3, dropout=0.0, batch_size=16),
        dataset=digits8,
        progress=False,
        on_step=lambda step, loss: losses.append(loss),
    )
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5
    for name in (
        "model.safetensors",
        "train_state.safetensors",
        "log.jsonl",
        "loss.png",
        "samples.png",
    ):
        assert (out / name).is_file(), name
    model = DiffusionModel.load(out / "model.safetensors")
    assert model.config.channels == 1 and model.config.image_size == 8
    x = model.sample(2, steps=3)
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1


def test_class_conditional_training_and_guided_sampling(tmp_path, digits8):
    out = train(tiny(tmp_path, cond="label", steps=3), dataset=digits8, progress=False)
    model = DiffusionModel.load(out / "model.safetensors")
    assert model.config.class_names == [str(i) for i in range(10)]
    assert model.unet.config.num_classes == 11  # ten digits and the null label
    cond, uncond = model.label_cond([7, 7])
    a = model.sample(2, steps=3, cond=cond, uncond=uncond, guidance=3.0)
    b = model.sample(2, steps=3, cond=cond, uncond=uncond, guidance=1.0)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="label must be between 0 and 9"):
        model.label_cond([10])


class NaNDigits(torch.utils.data.Dataset):
    """Digits whose images turn into NaN after a few steps."""

    def __init__(self, base, after_steps, batch):
        self.base, self.calls, self.limit = base, 0, after_steps * batch
        self.channels, self.size = base.channels, base.size
        self.num_classes, self.class_names = base.num_classes, base.class_names

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.calls += 1
        item = dict(self.base[i])
        if self.calls > self.limit:
            item["image"] = item["image"] * float("nan")
        return item


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits8):
    cfg = tiny(tmp_path, steps=10, checkpoint_every=3)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*step 3"):
        train(cfg, dataset=NaNDigits(digits8, after_steps=4, batch=4), progress=False)
    run = Run(cfg.out)
    from safetensors import safe_open

    with safe_open(str(run.state_path), "pt") as f:
        assert f.metadata()["step"] == "3"
    assert all(torch.isfinite(v).all() for v in weights(run.dir).values())


def test_existing_run_is_not_overwritten_and_resume_needs_a_run(tmp_path, digits8):
    cfg = tiny(tmp_path, steps=2)
    train(cfg, dataset=digits8, progress=False)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg, dataset=digits8, progress=False)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny(tmp_path, "empty"), resume=True, dataset=digits8, progress=False)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_other_prediction_targets_train(tmp_path, digits8, prediction):
    out = train(
        tiny(tmp_path, prediction=prediction, steps=2, min_snr_gamma=5),
        dataset=digits8,
        progress=False,
    )
    meta = json.loads((out / "train_config.json").read_text())
    assert meta["prediction"] == prediction
    assert DiffusionModel.load(out / "model.safetensors").config.prediction == prediction


def test_bf16_autocast_runs_on_cpu(tmp_path, digits8):
    out = train(tiny(tmp_path, precision="bf16", steps=2), dataset=digits8, progress=False)
    assert (out / "model.safetensors").is_file()


def test_init_starts_from_a_models_weights_and_keeps_its_architecture(tmp_path, digits8):
    import hashlib

    base = train(tiny(tmp_path, "base", cond="label", steps=3), dataset=digits8, progress=False)
    model_file = base / "model.safetensors"
    # lr 0: the fine-tuned weights must stay exactly the ones it started from; the
    # architecture options given here are replaced by the model's own
    cfg = tiny(tmp_path, "ft", init=str(base), lr=0.0, steps=2, channels=32, cond=None)
    out = train(cfg, dataset=digits8, progress=False)
    start, tuned = weights(base), weights(out)
    assert start.keys() == tuned.keys()
    assert all(torch.equal(start[k], tuned[k]) for k in start)
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["channels"] == 16 and stored["cond"] == "label" and stored["lr"] == 0.0
    assert stored["init_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    # it resumes like any run: the stored architecture rebuilds the model, the stored lr 0
    # (not the resuming command's) keeps it where it started
    again = tiny(tmp_path, "ft", steps=4, lr=1e-2)
    train(again, resume=True, dataset=digits8, progress=False)
    resumed = weights(out)
    assert [r["step"] for r in Run(out).read_log()] == [1, 2, 3, 4]
    assert all(torch.equal(start[k], resumed[k]) for k in start)


def test_init_refuses_a_model_that_does_not_fit_the_data(tmp_path, digits8):
    base = train(tiny(tmp_path, "base", cond="label", steps=1), dataset=digits8, progress=False)
    other = DigitsDataset(size=16)
    with pytest.raises(TrainingError, match="does not fit 'digits'.*unet"):
        train(tiny(tmp_path, "ft", init=str(base)), dataset=other, progress=False)
    with pytest.raises(TrainingError, match="--init: .*no such checkpoint"):
        train(tiny(tmp_path, "ft", init=str(tmp_path / "none")), dataset=digits8, progress=False)
    assert not (tmp_path / "ft").exists()


def test_warm_start_takes_the_trunk_and_leaves_a_new_condition_fresh(tmp_path):
    """An unconditional model's U-Net starts a text model: every tensor of the same name and shape
    (lr 0 keeps them as they started), the new condition's own fresh; the architecture is
    the base's whatever was asked."""
    shapes = dict(data="shapes", size=16, attention_resolutions=(8,))
    base = train(tiny(tmp_path, "base", steps=1, **shapes), progress=False)
    cfg = tiny(tmp_path, "warm", steps=1, lr=0.0, warm_start=str(base), channels=32,
               cond="text", text_encoder="scratch", layout_map=True, layout_steps=0, **shapes)  # fmt: skip
    out = train(cfg, progress=False)
    start, warm = weights(base), weights(out)
    same = [k for k in warm if k in start and start[k].shape == warm[k].shape]
    fresh = [k for k in warm if k not in same]
    assert "conv_in.weight" in same and any("resnets" in k for k in same)
    assert any("attn2.to_k" in k for k in fresh)
    assert any("layout_" in k for k in fresh)
    assert all(torch.equal(start[k], warm[k]) for k in same)
    stored = json.loads((out / "train_config.json").read_text())
    assert stored["channels"] == 16 and stored["cond"] == "text"
    with pytest.raises(TrainingError, match="give one"):
        train(tiny(tmp_path, "both", init=str(base), warm_start=str(base)), progress=False)


def test_init_adds_a_layout_map_that_starts_as_the_same_model(tmp_path, digits8):
    shapes = dict(
        data="shapes", size=16, cond="text", text_encoder="scratch", attention_resolutions=(8,)
    )
    base = train(tiny(tmp_path, "base", steps=1, **shapes), progress=False)
    cfg = tiny(tmp_path, "ft", steps=1, lr=0.0, init=str(base), layout_map=True, **shapes)
    out = train(replace(cfg, layout_steps=40, log_every=10), progress=False)
    fitted = [r for r in Run(out).read_log() if "layout_loss" in r]
    assert [r["layout_step"] for r in fitted] == [10, 20, 30, 40]
    assert fitted[-1]["layout_loss"] < 0.5 * fitted[0]["layout_loss"]  # the map learns
    start, tuned = (DiffusionModel.load(p / "model.safetensors") for p in (base, out))
    assert not start.config.unet.layout_map and tuned.config.unet.layout_map
    a, b = start.weights(), tuned.weights()
    added = sorted(set(b) - set(a))
    assert added and all(k.startswith("layout_map.") or ".layout_proj." in k for k in added)
    assert all(not b[k].any() for k in added if ".layout_proj." in k)
    assert all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(0)
    x, ctx = (
        torch.randn(2, 3, 16, 16, generator=g),
        torch.randn(2, 5, start.unet.config.context_dim),
    )
    with torch.no_grad():
        assert torch.equal(start.unet(x, 500, context=ctx), tuned.unet(x, 500, context=ctx))
    train(tiny(tmp_path, "ft", steps=2, lr=1e-3), resume=True, progress=False)
    assert DiffusionModel.load(out / "model.safetensors").config.unet.layout_map
    assert len([r for r in Run(out).read_log() if "layout_loss" in r]) == 4  # fitted once
    new = tiny(tmp_path, "new", steps=1, layout_map=True, layout_steps=2, log_every=1, **shapes)
    new_run = train(new, progress=False)
    assert DiffusionModel.load(new_run / "model.safetensors").config.unet.layout_map
    assert [r["layout_step"] for r in Run(new_run).read_log() if "layout_loss" in r] == [1, 2]
    for where in (
        {},
        {"init": str(train(tiny(tmp_path, "label", steps=1), dataset=digits8, progress=False))},
    ):
        with pytest.raises(TrainingError, match="--layout-map is for text"):
            bad = tiny(tmp_path, "bad", layout_map=True, **where)
            train(bad, dataset=digits8, progress=False)


def test_layout_map_on_a_model_that_has_one_refits_it_on_the_new_captions(tmp_path):
    """`--init MODEL --layout-map` where MODEL already has a map (new words, another
    language): that map is fitted alone first, then the whole model trains as usual."""
    shapes = dict(data="shapes", size=16, cond="text", text_encoder="minilm")
    shapes["attention_resolutions"] = (8,)
    mapped = tiny(tmp_path, "mapped", steps=1, layout_map=True, layout_steps=2, **shapes)
    base = train(mapped, progress=False)
    spanish = {"language": "es"}
    cfg = tiny(tmp_path, "es", steps=1, lr=0.0, init=str(base), layout_map=True, **shapes)
    out = train(replace(cfg, layout_steps=30, log_every=10, data_options=spanish), progress=False)
    fitted = [r for r in Run(out).read_log() if "layout_loss" in r]
    assert [r["layout_step"] for r in fitted] == [10, 20, 30]
    start, tuned = (DiffusionModel.load(p / "model.safetensors").weights() for p in (base, out))
    assert set(start) == set(tuned)  # no second map: the model's own one was fitted
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert changed and all(k.startswith("layout_map.") for k in changed)  # lr 0 for the rest


def test_data_options_reach_the_data_set(tmp_path):
    cfg = tiny(tmp_path, data="shapes", size=16, steps=1, cond="text", text_encoder="scratch",
               attention_resolutions=(8,))  # fmt: skip
    bad = TrainConfig(**{**cfg.__dict__, "data_options": {"two_object_prob": 2.0}})
    with pytest.raises(ValueError, match="two_object_prob must be in"):
        train(bad, progress=False)
    cfg.data_options = {"two_object_prob": 1.0, "length": 64}
    out = train(cfg, progress=False)
    assert json.loads((out / "train_config.json").read_text())["data_options"] == {
        "two_object_prob": 1.0,
        "length": 64,
    }


def test_fine_tuned_scratch_encoder_keeps_its_vocabulary_on_resume(tmp_path):
    shapes = dict(
        data="shapes", size=16, cond="text", text_encoder="scratch", attention_resolutions=(8,)
    )
    base = train(tiny(tmp_path, "base", steps=1, **shapes), progress=False)
    # canonical captions only: a vocabulary built from them would differ from the base's
    other = {"paraphrase": False, "two_object_prob": 1.0}
    cfg = tiny(tmp_path, "ft", steps=1, lr=0.0, init=str(base), data_options=other, **shapes)
    out = train(cfg, progress=False)
    train(tiny(tmp_path, "ft", steps=2), resume=True, progress=False)
    start, tuned = (DiffusionModel.load(p / "model.safetensors") for p in (base, out))
    assert tuned.text_encoder.config() == start.text_encoder.config()
    a, b = start.weights(), tuned.weights()
    assert any(k.startswith("text_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def outputs_of(run_dir, n=8) -> torch.Tensor:
    """The EMA U-Net's outputs on fixed inputs. Weights are not compared: a bias before a
    GroupNorm (or a key bias) has no gradient but rounding noise, which AdamW turns into
    steps of about lr either way, without changing what the network computes."""
    model = DiffusionModel.load(run_dir / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    c, s = model.config.channels, model.config.image_size
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    extra = {"class_labels": torch.arange(n) % 10} if model.config.cond == "label" else {}
    with torch.no_grad():
        return model.unet(x, t, **extra)


def test_accumulated_batches_make_the_whole_batch_step(tmp_path, digits8):
    """4 images x 2 accumulated batches draw what 8 images at once draw: the same step."""
    kw = dict(steps=4, dropout=0.0, cond="label", cond_drop=0.3)
    whole = train(tiny(tmp_path, "whole", batch_size=8, **kw), dataset=digits8, progress=False)
    split = train(
        tiny(tmp_path, "split", batch_size=4, grad_accum=2, **kw), dataset=digits8, progress=False
    )
    torch.testing.assert_close(outputs_of(whole), outputs_of(split), atol=1e-5, rtol=0)
    losses = [[r["loss"] for r in Run(p).read_log()] for p in (whole, split)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    with pytest.raises(TrainingError, match="--grad-accum must be 1 or more"):
        train(tiny(tmp_path, "bad", grad_accum=0), dataset=digits8, progress=False)


def test_loop_watches_tensors_without_waiting_and_names_the_first_bad_step(tmp_path):
    run = Run(tmp_path / "r")
    run.dir.mkdir()
    loop = TrainLoop(run, 0, 10, Stop(None), 5, False)
    values = [1.0, 2.0, float("inf"), float("nan"), 3.0]
    for v in values[:2]:
        loop.advance({"loss": torch.tensor(v)}, lr=0.1)
    loop.verify()  # all finite so far
    for v in values[2:4]:
        loop.advance({"loss": torch.tensor(v)}, lr=0.1)
    with pytest.raises(TrainingError, match="loss became inf at step 3; stopping: nothing was"):
        loop.verify()


def test_compiled_training_matches_eager(tmp_path, digits8, capsys):
    """torch.compile (Inductor: about a minute of C++ compilation here, so the smallest net)."""
    kw = dict(
        steps=2, dropout=0.0, channels=8, channel_mult=(1,), attention_resolutions=(), head_dim=8
    )
    eager = train(tiny(tmp_path, "eager", **kw), dataset=digits8, progress=False)
    compiled = train(tiny(tmp_path, "compiled", compile=True, **kw), dataset=digits8)
    assert "compiled (first step: " in capsys.readouterr().err
    torch.testing.assert_close(outputs_of(eager), outputs_of(compiled), atol=1e-5, rtol=0)


def test_resume_is_exact_with_rendered_shapes_captions_and_accumulation(tmp_path):
    """All of the loop at once: shapes rendered a batch at a time, a scratch text encoder
    trained beside the U-Net, condition dropout, accumulated batches, fused AdamW."""
    kw = dict(
        data="shapes", size=16, cond="text", text_encoder="scratch", grad_accum=2,
        dropout=0.0, layout_map=False, attention_resolutions=(8,),
    )  # fmt: skip
    full = train(tiny(tmp_path, "full", steps=4, **kw), progress=False)
    train(tiny(tmp_path, "half", steps=2, **kw), progress=False)
    resumed = train(tiny(tmp_path, "half", steps=4, **kw), resume=True, progress=False)
    a, b = raw_weights(full), raw_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
