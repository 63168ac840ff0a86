"""The diffusion-vs-GAN study behind `difusion compare`.

For every data set and seed, a DCGAN (`gan_train.py`) and a small U-Net diffusion model
(`train.py`) train for the same wall-clock budget, one after the other. Along training, a
callback copies the latest checkpoint (the EMA weights) every budget / curve_points seconds;
afterwards every copy is measured, giving the metric along training time. Then:

- stability: the final FID's best and worst seed, the FID's fluctuation over the second
  half of training, runs stopped by a non-finite loss, and mode collapse (COLLAPSE_RULE);
- quality and diversity of the final models: FID, KID and precision (quality), recall and
  mode coverage / class KL (diversity) in the feature space of the data set's classifier;
  the headline FID in Inception space (`inception`, on `inception_samples` a model; a
  finished run measured without it gets it when the study is started again);
- generation speed: images per second on one batch, the GAN in one pass, the diffusion
  model with 1000-step DDPM, 50-step DDIM, 20- and 10-step DPM-Solver++;
- quality against the number of sampling steps, per sampler (the first seed's model).

The diffusion objective is eps-prediction on the cosine schedule unless `prediction`,
`zero_terminal_snr` or `min_snr_gamma` say otherwise (the fashion recipe of docs/training.md: v,
zero terminal SNR, min-SNR 5). Diffusion samples of the headline numbers use
DPM-Solver++(2M) with 20 steps. The feature
network is the data set's shipped classifier, else one trained here in a minute or two
(cached in `<out>/classifiers/`; for `shapes` its classes are the colour and shape of the
first object), or `feature_net` when given.

Writes `<out>/report.md` (the comparison tables, settings, budgets and sample counts),
`<out>/results.json` (every number) and per data set `<out>/<data>/curves.png`,
`steps.png` and `samples.png`. Runs live in `<out>/<data>/seed<k>/{gan,diffusion}/`; a run
with its `result.json` is reused when the study is started again with the same settings.

Default settings (`CompareConfig()`, preset "small") are sized for about two hours on two
CPU cores for digits + fashion + shapes: 5 minutes of training per model and seed, 3 seeds
on fashion and 1 elsewhere (50 min of training in all), then about 45 min of measuring,
mostly the 1000-step DDPM runs at 32 px (the steps curve on 200 samples, the speed on a
batch of 64, timed twice): 1,000 samples a model for the headline metrics, 5 points along
training of 250 samples, 200 samples per point of the steps curve. The small U-Net has 32 base channels,
multipliers (1, 2, 2), one ResBlock a level and attention at the lowest level (1.1M
parameters); the DCGAN has 64 base channels (0.34M + 0.13M at 16 px, 1.07M + 0.66M at
32 px). The Inception FID passes 13,000 images through Inception-v3 at 299 px (1,000 real
a data set, 1,000 samples of each of the 10 models), about 0.054 s an image on 2 cores.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from ..evaluate import draw
from ..nn.gan import GAN, parameter_count
from .config import PRESETS, CompareConfig, check_settings, recipe_settings
from .evaluation import (
    Scorer,
    collapsed,
    headline_samples,
    measure_model,
    measure_speed,
    real_sample,
    scorers_for,
)
from .report import write_report


class Snapshots:
    """`on_step` callback: every `interval` seconds, copy the run's latest checkpoint (the
    EMA weights) to snapshots/, noting the wall time at which its step was reached."""

    def __init__(self, run_dir: Path, interval: float, start: float) -> None:
        self.run_dir, self.interval, self.start = run_dir, interval, start
        self.times: dict[int, float] = {}
        self.taken: list[dict] = []
        self.next = interval
        (run_dir / "snapshots").mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, _info=None) -> None:
        now = time.monotonic() - self.start
        self.times[step] = now
        if now >= self.next:
            self.take()

    def take(self) -> None:
        from safetensors import safe_open

        path = self.run_dir / "model.safetensors"
        if not path.is_file():
            return
        with safe_open(str(path), framework="pt") as f:
            step = int((f.metadata() or {}).get("step", -1))
        if step < 1 or any(s["step"] == step for s in self.taken):
            return  # nothing new since the last copy: try again at the next step
        target = self.run_dir / "snapshots" / f"step_{step:07d}.safetensors"
        shutil.copyfile(path, target)
        self.taken.append({"step": step, "seconds": self.times.get(step, 0.0), "file": target.name})
        self.next = max(self.next + self.interval, self.times.get(step, 0.0) + self.interval / 2)


def unet_options(size: int, preset: str) -> dict:
    p = PRESETS[preset]
    mult = (1, 2) if preset == "tiny" else ((1, 2, 2) if size <= 32 else (1, 2, 2, 2))
    lowest = size // 2 ** (len(mult) - 1)
    return {
        "channels": p["unet_channels"],
        "channel_mult": mult,
        "attention_resolutions": () if preset == "tiny" else (lowest,),
        "layers_per_block": 1,
        "head_dim": p["unet_head_dim"],
    }


def diffusion_options(kind: str, size: int, cfg: CompareConfig) -> dict:
    """TrainConfig options of the study's diffusion model (`kind` "diffusion": the objective
    of `cfg`, a U-Net) or of a recipe ("dit-flow": its backbone, sized by the preset)."""
    if kind == "diffusion":
        return {
            "prediction": cfg.prediction,
            "zero_terminal_snr": cfg.zero_terminal_snr,
            "min_snr_gamma": cfg.min_snr_gamma,
            **unet_options(size, cfg.preset),
        }
    settings = recipe_settings(kind)
    if settings["backbone"] == "dit":
        return {**PRESETS[cfg.preset]["dit"], **settings}
    return {**settings, **unet_options(size, cfg.preset)}


def train_run(
    kind: str,
    data: str,
    dataset,
    seed: int,
    run_dir: Path,
    cfg: CompareConfig,
    minutes: float,
    on_step=None,
    resume: bool = False,
) -> str | None:
    """Train (or, with `resume`, continue) the run of one model family for `minutes` more of
    wall time; returns the reason it stopped early when its loss became non-finite, else
    None. Log lines fall on every checkpoint step, so the log holds the training time up to
    any checkpoint a run resumes from (`training_seconds`)."""
    from ..runs import NonFiniteLoss
    from ..train import TrainConfig, train

    preset = PRESETS[cfg.preset]
    checkpoint_every = preset["checkpoint_every"]["gan" if kind == "gan" else "diffusion"]
    common = dict(
        data=data,
        out=str(run_dir),
        steps=10**9,
        minutes=minutes,
        batch_size=cfg.batch_size,
        ema_decay=cfg.ema_decay,
        device=cfg.device,
        seed=seed,
        sample_every=10**9,
        checkpoint_every=checkpoint_every,
        log_every=math.gcd(25, checkpoint_every),
    )
    try:
        if kind == "gan":
            from ..gan_train import GANTrainConfig, train_gan

            gcfg = GANTrainConfig(lr=cfg.gan_lr, channels=preset["gan_channels"], **common)
            train_gan(gcfg, resume=resume, dataset=dataset, progress=False, on_step=on_step)
        else:
            dcfg = TrainConfig(
                lr=cfg.diffusion_lr,
                warmup=cfg.diffusion_warmup,
                **diffusion_options(kind, dataset.size, cfg),
                **common,
            )
            train(dcfg, resume=resume, dataset=dataset, progress=False, on_step=on_step)
    except NonFiniteLoss as e:
        return str(e)
    return None


def train_one(kind: str, data: str, dataset, seed: int, run_dir: Path, cfg: CompareConfig) -> dict:
    """Train one model for the budget; returns what happened (steps, time, snapshots)."""
    start = time.monotonic()
    snaps = Snapshots(run_dir, cfg.budget_minutes * 60 / cfg.curve_points, start)
    diverged = train_run(kind, data, dataset, seed, run_dir, cfg, cfg.budget_minutes, snaps)
    steps = max(snaps.times, default=0)
    model_path = run_dir / "model.safetensors"
    if model_path.is_file():
        snaps.next = 0.0
        snaps.take()  # the final (or last good) checkpoint ends the curve
    return {
        "seed": seed,
        "steps": steps,
        "train_seconds": snaps.times.get(steps, 0.0),
        "diverged": diverged is not None,
        "error": diverged,
        "snapshots": snaps.taken,
        "has_model": model_path.is_file(),
    }


def measure_run(
    kind: str,
    run_dir: Path,
    info: dict,
    scorer: Scorer,
    inception: Scorer | None,
    cfg: CompareConfig,
    device: torch.device,
) -> dict:
    """Metrics of the final model and of every snapshot."""
    curve = []
    for snap in info["snapshots"]:
        fake = headline_samples(run_dir / "snapshots" / snap["file"], cfg.curve_samples, device)
        curve.append({"step": snap["step"], "seconds": snap["seconds"], **scorer(fake)})
    final = final_inception = None
    if info["has_model"]:
        final, final_inception = measure_model(run_dir, scorer, inception, cfg, device)
    return {
        **info,
        "kind": kind,
        "final": final,
        "inception": final_inception,
        "curve": curve,
        "collapsed": collapsed(final, curve),
    }


# what a finished run's numbers do not depend on: the Inception FID is added to finished runs
NOT_TRAINING_NOR_MEASURING = ("inception", "inception_samples")


def environment(device: torch.device) -> dict:
    from ..machine import cpu_model

    return {
        "device": str(device), "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }  # fmt: skip


def earlier_starts(results_file: Path) -> list[float]:
    """Seconds of the earlier starts of a study or sweep whose work this start reuses."""
    if not results_file.is_file():
        return []
    env = json.loads(results_file.read_text()).get("environment", {})
    return env.get("starts_seconds", [env["seconds"]] if "seconds" in env else [])


def write_results(
    results: dict, results_file: Path, earlier: list[float], began: float, write_report
) -> Path:
    """Add this start's seconds (since `began`) to the `earlier` starts' in the results'
    environment, write them to `results_file` and the report beside it with
    `write_report(results, folder)`; returns the report's path."""
    starts = [*earlier, time.monotonic() - began]
    results["environment"].update(seconds=sum(starts), starts_seconds=starts)
    results_file.write_text(json.dumps(results, indent=2))
    return write_report(results, results_file.parent)


def compare(cfg: CompareConfig, progress: bool = True) -> Path:
    """Run the study of `cfg` and write its report; returns the report's path."""
    from ..data import load_dataset
    from ..images import auto_scale, grid, labelled_strip, to_pil
    from ..runs import pick_device

    out = Path(cfg.out)
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("data", "seeds", "out")}
    defaults = CompareConfig().to_dict()
    check_settings(out, settings, defaults, NOT_TRAINING_NOR_MEASURING, "study")
    earlier = earlier_starts(out / "results.json")
    device = pick_device(cfg.device)
    say = print if progress else (lambda *a, **k: None)
    began = time.monotonic()
    results: dict = {"config": cfg.to_dict(), "environment": environment(device), "datasets": {}}
    for data in cfg.data:
        dataset = load_dataset(data)
        ddir = out / Path(data).name
        ddir.mkdir(exist_ok=True)
        n_real = max(cfg.samples, cfg.curve_samples, cfg.steps_samples)
        real = real_sample(dataset, max(n_real, cfg.inception_samples if cfg.inception else 0))
        scorer, inception, note = scorers_for(data, dataset, real, cfg, out, device)
        entry: dict = {
            "info": dataset_info(dataset, real, scorer, inception, note),
            "runs": {"gan": [], "diffusion": []},
        }
        seeds = cfg.seed_list(data)
        for seed in seeds:
            for kind in ("gan", "diffusion"):
                run_dir = ddir / f"seed{seed}" / kind
                cached = run_dir / "result.json"
                if cached.is_file():
                    result = json.loads(cached.read_text())
                    if (
                        inception is not None
                        and result["has_model"]
                        and ((result.get("inception") or {}).get("n") != cfg.inception_samples)
                    ):
                        say(f"{data} seed {seed}: Inception FID of the {kind}")
                        fake = headline_samples(run_dir, cfg.inception_samples, device)
                        result["inception"] = inception(fake)
                        cached.write_text(json.dumps(result, indent=2))
                    entry["runs"][kind].append(result)
                    continue
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an unfinished run of this study: start it again
                say(f"{data} seed {seed}: training the {kind} for {cfg.budget_minutes:g} min")
                info = train_one(kind, data, dataset, seed, run_dir, cfg)
                say(
                    f"{data} seed {seed}: {kind} made {info['steps']} steps"
                    + (" and diverged" if info["diverged"] else "")
                    + "; measuring"
                )
                result = measure_run(kind, run_dir, info, scorer, inception, cfg, device)
                cached.write_text(json.dumps(result, indent=2))
                entry["runs"][kind].append(result)
        first = ddir / f"seed{seeds[0]}"
        extras_file = ddir / "extras.json"
        if extras_file.is_file():
            entry.update(json.loads(extras_file.read_text()))
        else:
            say(f"{data}: generation speed, quality against sampling steps, sample grids")
            entry.update(first_seed_extras(first, scorer, cfg, device))
            extras_file.write_text(
                json.dumps({k: entry[k] for k in ("models", "speed", "steps_curve")}, indent=2)
            )
        pics = []
        for kind, label in (
            ("gan", "GAN (DCGAN), one pass"),
            ("diffusion", "diffusion, DPM-Solver++ 20 steps"),
        ):
            if (first / kind / "model.safetensors").is_file():
                x = headline_samples(first / kind, 36, device)
                pics.append((grid(to_pil(x), cols=6, scale=auto_scale(dataset.size, 64)), label))
        if pics:
            labelled_strip([p for p, _ in pics], [label for _, label in pics]).save(
                ddir / "samples.png"
            )
        results["datasets"][data] = entry
    report = write_results(results, out / "results.json", earlier, began, write_report)
    say(f"wrote {report}")
    return report


def dataset_info(dataset, real: torch.Tensor, scorer: Scorer, inception, note: str) -> dict:
    return {
        "size": dataset.size,
        "channels": dataset.channels,
        "images": len(dataset),
        "real_images": len(real),
        "feature_net": scorer.name,
        "feature_net_note": note,
        "inception_net": inception.name if inception else None,
    }


def describe_models(gan: GAN | None, diffusion, cfg: CompareConfig) -> dict:
    """Parameter counts and a line of architecture and training settings per model."""
    models = {}
    if gan is not None:
        from ..nn.gan import Discriminator

        c = gan.config
        models["gan"] = {
            "params": parameter_count(gan.generator),
            "params_d": parameter_count(Discriminator(c)),
            "description": f"DCGAN, z {c.z_dim}, G base {c.g_channels} / D base {c.d_channels} "
            f"channels, Adam {cfg.gan_lr:g} betas (0.5, 0.999), non-saturating loss",
        }
    if diffusion is not None:
        models["diffusion"] = describe_diffusion(diffusion, cfg, cfg.min_snr_gamma)
    return models


def describe_diffusion(diffusion, cfg: CompareConfig, min_snr_gamma: float = 0.0) -> dict:
    """A diffusion model's parameter count, and a line of its network and objective."""
    c, schedule = diffusion.config, diffusion.config.schedule
    if c.backbone == "dit":
        d = c.dit
        network = (
            f"DiT width {d.dim}, {d.num_layers} blocks of {d.num_attention_heads} heads, "
            f"patches of {d.patch_size} px"
        )
    else:
        u = c.unet
        network = (
            f"U-Net channels {list(u.block_out_channels)}, {u.layers_per_block} ResBlock a "
            f"level, attention {list(u.attention_levels)}"
        )
    if c.prediction == "edm":
        objective = (
            f"EDM preconditioning (sigma_data {schedule.setting('sigma_data'):g}, ln sigma ~ "
            f"N({schedule.setting('p_mean'):g}, {schedule.setting('p_std'):g}^2))"
        )
    elif c.prediction == "flow":
        objective = (
            f"flow matching (logit t ~ N({schedule.setting('p_mean'):g}, "
            f"{schedule.setting('p_std'):g}^2), shift {schedule.setting('shift'):g})"
        )
    else:
        objective = (
            f"{c.prediction}-prediction, {schedule.kind} schedule"
            + (" (zero terminal SNR)" if schedule.zero_terminal_snr else "")
            + (f", min-SNR weighting {min_snr_gamma:g}" if min_snr_gamma > 0 else "")
        )
    return {
        "params": parameter_count(diffusion.unet),
        "description": f"{network}, {objective}, AdamW {cfg.diffusion_lr:g} "
        f"(warm-up {cfg.diffusion_warmup})",
    }


def load_models(folder: Path, device) -> tuple[GAN | None, object]:
    """The GAN and the diffusion model of a seed's folder (None where a run has no model)."""
    from ..model import DiffusionModel

    gan = diffusion = None
    if (folder / "gan" / "model.safetensors").is_file():
        gan = GAN.load(folder / "gan" / "model.safetensors", device)
    if (folder / "diffusion" / "model.safetensors").is_file():
        diffusion = DiffusionModel.load(folder / "diffusion" / "model.safetensors", device)
    return gan, diffusion


def first_seed_extras(folder: Path, scorer: Scorer, cfg: CompareConfig, device) -> dict:
    """Parameter counts, generation speed and the quality-vs-steps curve of the first seed's
    models (in `folder`)."""
    gan, diffusion = load_models(folder, device)
    speed = measure_speed(gan, diffusion, cfg, device)
    n = min(cfg.steps_samples, len(scorer.real_f))
    curve: dict = {"n": n, "feature_net": scorer.name, "samplers": {}}
    if gan is not None:
        curve["gan_fid"] = scorer(draw(gan, n))["fid"]
    if diffusion is not None:
        for sampler, grid_steps in cfg.steps_grid.items():
            points = []
            for steps in grid_steps:
                fake = draw(diffusion, n, sampler=sampler, steps=steps)
                points.append({"steps": steps, **scorer(fake)})
            curve["samplers"][sampler] = points
    return {"models": describe_models(gan, diffusion, cfg), "speed": speed, "steps_curve": curve}
