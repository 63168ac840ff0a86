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
- quality against the number of sampling steps, per sampler (seed 0's model).

Diffusion samples of the headline numbers use DPM-Solver++(2M) with 20 steps. The feature
network is the data set's shipped classifier, else one trained here in a minute or two
(cached in `<out>/classifiers/`; for `shapes` its classes are the colour and shape of the
first object), or `feature_net` when given.

Writes `<out>/report.md` (the comparison tables, settings, budgets and sample counts),
`<out>/results.json` (every number) and per data set `<out>/<data>/curves.png`,
`steps.png` and `samples.png`. Runs live in `<out>/<data>/seed<k>/{gan,diffusion}/`; a run
with its `result.json` is reused when the study is started again with the same settings.

Default settings (`CompareConfig()`, preset "small") are sized for about two hours on two
CPU cores for digits + fashion + shapes: 5 minutes of training per model and seed, 3 seeds
on fashion and 1 elsewhere (50 min of training in all), then about 45 min of measuring, mostly the 1000-step
DDPM runs at 32 px (the steps curve on 200 samples, the speed on a batch of 64, timed
twice): 1,000 samples a model for the headline metrics, 5 points along training of 250
samples, 200 samples per point of the steps curve. The small U-Net has 32 base channels,
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .evaluate import draw
from .nn.gan import GAN, is_gan_file, parameter_count

HEADLINE = ("dpmpp_2m", 20)
SPEED_CONFIGS = (("ddpm", 1000), ("ddim", 50), ("dpmpp_2m", 20), ("dpmpp_2m", 10))
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)"}
COLLAPSE_FINAL = 0.5
COLLAPSE_DROP = 0.3
COLLAPSE_RULE = (
    f"a run has collapsed when its final samples cover fewer than {COLLAPSE_FINAL:.0%} of the "
    f"classes the real images cover, or when the classes covered fell by at least "
    f"{COLLAPSE_DROP:.0%} of all classes from their peak along training (classifier labels; "
    "a class is covered by at least 1% of the samples)"
)
PRESETS: dict[str, dict] = {
    "small": {
        "gan_channels": 64,
        "unet_channels": 32,
        "unet_head_dim": 32,
        "checkpoint_every": {"gan": 100, "diffusion": 25},  # steps; about 10 s either way
        "classifier_steps": 300,
        "steps_grid": {
            "ddpm": (25, 100, 1000),
            "ddim": (10, 20, 50, 100),
            "dpmpp_2m": (5, 10, 20, 50),
        },
    },
    "tiny": {  # smoke tests only: miniature networks, a few sampling steps
        "gan_channels": 8,
        "unet_channels": 16,
        "unet_head_dim": 16,
        "checkpoint_every": {"gan": 2, "diffusion": 2},
        "classifier_steps": 20,
        "steps_grid": {"ddpm": (4, 8), "ddim": (2, 4), "dpmpp_2m": (2, 4)},
    },
}


@dataclass
class CompareConfig:
    data: tuple[str, ...] = ("digits", "fashion", "shapes")
    out: str = "compare"
    budget_minutes: float = 5.0  # training wall time per model and seed
    seeds: int | str = "fashion=3,1"  # per data set: "N", or "name=N,...,N" (N: the rest)
    preset: str = "small"  # network sizes and step grids: "small" (the study) or "tiny"
    samples: int = 1000  # per final model, for the headline metrics
    curve_points: int = 5  # checkpoints measured along training
    curve_samples: int = 250  # per point along training
    steps_samples: int = 200  # per point of the quality-vs-steps curve
    speed_batch: int = 64
    speed_repeats: int = 3  # timed runs per configuration (DDPM-1000: at most 2)
    inception: bool = True  # also the FID in Inception space (0.054 s an image, 2 CPU cores)
    inception_samples: int = 1000
    feature_net: str | None = None  # None: the data set's classifier (trained here if none ships)
    batch_size: int = 64  # training batch of both models
    diffusion_lr: float = 5e-4
    diffusion_warmup: int = 100
    gan_lr: float = 2e-4
    ema_decay: float = 0.995  # both models' EMA (short runs)
    device: str = "auto"

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        if not self.data:
            raise ValueError("compare: give at least one data set")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose {' or '.join(PRESETS)}")
        if not self.budget_minutes > 0:
            raise ValueError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        for data in self.data:
            self.seeds_for(data)  # a bad --seeds fails here, before any training
        for name in ("samples", "curve_samples", "steps_samples", "inception_samples"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name.replace('_', '-')} must be at least 8")
        if self.curve_points < 1 or self.speed_batch < 1 or self.speed_repeats < 1:
            raise ValueError("curve points, speed batch and speed repeats must be positive")

    def seeds_for(self, data: str) -> int:
        """Training seeds on `data`: `seeds` is "3" (every data set) or "fashion=3,1" (fashion
        3, the rest 1); a data set with no count of its own and no default is an error."""
        counts: dict[str | None, int] = {}
        for item in str(self.seeds).split(","):
            name, _, value = item.strip().rpartition("=")
            try:
                counts[name.strip() or None] = int(value)
            except ValueError:
                raise ValueError(f"--seeds: {item.strip()!r} is not N or NAME=N") from None
        key = Path(data).name if Path(data).name in counts else None
        if key not in counts:
            raise ValueError(f"--seeds {self.seeds!r} gives no count for {data!r}")
        if counts[key] < 1:
            raise ValueError(f"--seeds must be at least 1, got {counts[key]} for {data!r}")
        return counts[key]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CompareConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def steps_grid(self) -> dict[str, tuple[int, ...]]:
        return PRESETS[self.preset]["steps_grid"]


# ---------------------------------------------------------------------------------------
# Any model file: a GAN generator or a diffusion model
# ---------------------------------------------------------------------------------------


def load_generator_or_diffusion(path: str | Path, device: str | torch.device = "cpu"):
    """A run folder or model file -> `GAN` or `DiffusionModel`, by the file's format."""
    from .model import DiffusionModel, resolve_checkpoint

    path = resolve_checkpoint(path)
    if is_gan_file(path):
        return GAN.load(path, device)
    return DiffusionModel.load(path, device)


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


class Scorer:
    """Metrics of fake images against a fixed real set whose features are extracted once.

    A fake set of n images is compared with the first n real images (a random subset), so
    that both sides of every number have the same count. The real features are extracted at
    the first use: a study whose runs are all measured already never pays for them."""

    def __init__(self, net, real: torch.Tensor, k: int = 3) -> None:
        self.net, self.k, self.real = net, k, real
        self._features: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _real_features(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._features is None:
            self._features = self.net.extract(self.real)
        return self._features

    @property
    def real_f(self) -> torch.Tensor:
        return self._real_features()[0]

    @property
    def real_logits(self) -> torch.Tensor | None:
        return self._real_features()[1]

    @property
    def name(self) -> str:
        return self.net.name

    def __call__(self, fake: torch.Tensor) -> dict:
        from .metrics import (
            class_histogram,
            fid_from_features,
            kid_from_features,
            mode_coverage,
            precision_recall,
        )

        n = min(len(fake), len(self.real_f))
        fake_f, fake_logits = self.net.extract(fake[:n])
        real_f = self.real_f[:n]
        kid_mean, kid_std = kid_from_features(real_f, fake_f)
        precision, recall = precision_recall(real_f, fake_f, self.k)
        out = {
            "fid": fid_from_features(real_f, fake_f),
            "kid_mean": kid_mean,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
            "n": n,
            "feature_net": self.name,
        }
        if fake_logits is not None and self.real_logits is not None:
            k = fake_logits.shape[1]
            ref = class_histogram(self.real_logits[:n].argmax(1), k)
            cov = mode_coverage(fake_logits.argmax(1), k, ref)
            real_cov = mode_coverage(self.real_logits[:n].argmax(1), k, ref)
            out.update(
                classes_covered=cov["classes_covered"],
                num_classes=k,
                real_classes_covered=real_cov["classes_covered"],
                class_kl=cov["class_kl"],
            )
        return out


def images_per_second(
    fn, batch: int, repeats: int, device: torch.device, warm_up: bool = True
) -> dict:
    """Throughput of `fn()` (which makes `batch` images): mean and std over `repeats` timed
    calls, after one untimed call when `warm_up`."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batch / (time.perf_counter() - start)

    if warm_up:
        fn()
    rates = [timed() for _ in range(repeats)]
    return {"mean": sum(rates) / len(rates), "std": _std(rates), "batch": batch, "repeats": repeats}


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def measure_speed(gan: GAN | None, diffusion, cfg: CompareConfig, device: torch.device) -> dict:
    """Images per second on one batch: the GAN in one pass, the diffusion model with each of
    SPEED_CONFIGS (one short warm-up run, then DDPM-1000 at most twice)."""
    b, r = cfg.speed_batch, cfg.speed_repeats
    out: dict = {}
    if gan is not None:
        z = gan.noise(b, 0)
        out["gan"] = images_per_second(lambda: gan.sample(b, z=z), b, r, device)
    if diffusion is not None:
        diffusion.sample(b, sampler="ddim", steps=2)  # warm-up: the same shapes as timed
        for sampler, steps in SPEED_CONFIGS:
            repeats = min(r, 2) if steps >= 500 else r

            def run(sampler=sampler, steps=steps):
                diffusion.sample(b, sampler=sampler, steps=steps, seed=0)

            rate = images_per_second(run, b, repeats, device, warm_up=False)
            out[f"{sampler}-{steps}"] = {**rate, "sampler": sampler, "steps": steps}
    return out


def feature_net_for(data: str, dataset, cfg: CompareConfig, out: Path) -> tuple[object, str]:
    """The feature network of a data set and a note on where it comes from."""
    from .metrics import ClassifierFeatures, load_feature_net

    if cfg.feature_net is not None:
        return load_feature_net(cfg.feature_net), f"{cfg.feature_net} (as asked)"
    try:
        return load_feature_net(data), "shipped with the package"
    except ValueError:
        pass
    from .nn.classifier import Classifier, accuracy, train_classifier

    path = out / "classifiers" / f"classifier-{Path(data).name}.safetensors"
    note_path = path.with_suffix(".json")
    if path.is_file() and note_path.is_file():
        return ClassifierFeatures(Classifier.load(path)), json.loads(note_path.read_text())["note"]
    if not getattr(dataset, "num_classes", None):
        from .data import load_dataset

        try:
            dataset = load_dataset(data, dataset.size, label=True)  # shapes: colour + shape
        except (ValueError, TypeError):
            raise ValueError(
                f"{data!r} has no labels for a classifier: pass --feature-net inception or a file"
            ) from None
    n = len(dataset)
    limit = min(n, 6000)  # an infinite procedural set: a finite sample is enough
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=gen)[:limit]
    held, train_idx = perm[: limit // 10].tolist(), perm[limit // 10 :].tolist()
    parts = []
    for idx in (train_idx, held):
        part = torch.utils.data.Subset(dataset, idx)
        for attr in ("channels", "size", "num_classes", "class_names"):
            setattr(part, attr, getattr(dataset, attr))
        parts.append(part)
    start = time.monotonic()
    steps = PRESETS[cfg.preset]["classifier_steps"]
    classifier = train_classifier(parts[0], steps=steps)
    classifier.config.dataset = data
    acc = accuracy(classifier, parts[1])
    note = (
        f"trained by compare ({steps} steps on {len(train_idx)} images, "
        f"{time.monotonic() - start:.0f} s): held-out accuracy {acc:.3f} on {len(held)} images"
    )
    classifier.save(path)
    note_path.write_text(json.dumps({"note": note}))
    return ClassifierFeatures(classifier), note


# ---------------------------------------------------------------------------------------
# Training with snapshots along the way
# ---------------------------------------------------------------------------------------


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


def train_one(kind: str, data: str, dataset, seed: int, run_dir: Path, cfg: CompareConfig) -> dict:
    """Train one model for the budget; returns what happened (steps, time, snapshots)."""
    from .runs import TrainingError
    from .train import TrainConfig, train

    preset = PRESETS[cfg.preset]
    common = dict(
        data=data,
        out=str(run_dir),
        steps=10**9,
        minutes=cfg.budget_minutes,
        batch_size=cfg.batch_size,
        ema_decay=cfg.ema_decay,
        device=cfg.device,
        seed=seed,
        sample_every=10**9,
        checkpoint_every=preset["checkpoint_every"][kind],
        log_every=25,
    )
    start = time.monotonic()
    snaps = Snapshots(run_dir, cfg.budget_minutes * 60 / cfg.curve_points, start)
    diverged = None
    try:
        if kind == "gan":
            from .gan_train import GANTrainConfig, train_gan

            gcfg = GANTrainConfig(lr=cfg.gan_lr, channels=preset["gan_channels"], **common)
            train_gan(gcfg, dataset=dataset, progress=False, on_step=snaps)
        else:
            dcfg = TrainConfig(
                lr=cfg.diffusion_lr,
                warmup=cfg.diffusion_warmup,
                **unet_options(dataset.size, cfg.preset),
                **common,
            )
            train(dcfg, dataset=dataset, progress=False, on_step=snaps)
    except TrainingError as e:
        if "loss became" not in str(e):
            raise
        diverged = str(e)
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
        n = max(cfg.samples, cfg.inception_samples if inception is not None else 0)
        fake = headline_samples(run_dir, n, device)
        final = scorer(fake[: cfg.samples])
        if inception is not None:
            final_inception = inception(fake[: cfg.inception_samples])
    return {
        **info,
        "kind": kind,
        "final": final,
        "inception": final_inception,
        "curve": curve,
        "collapsed": collapsed(final, curve),
    }


def headline_samples(path: Path, n: int, device) -> torch.Tensor:
    """n samples of a model (a run folder or a model file) drawn as the headline metrics draw
    them: a GAN in one pass, a diffusion model with HEADLINE. Seeded per batch, so the
    first k of n samples are the k samples of a draw of k: the Inception FID added to a
    finished run sees the images that `measure_run` would have given it."""
    return draw(
        load_generator_or_diffusion(path, device), n, sampler=HEADLINE[0], steps=HEADLINE[1]
    )


def _training_and_measuring(settings: dict) -> dict:
    """The settings a finished run's numbers depend on: not the Inception ones, whose metrics
    are added to finished runs."""
    return {k: v for k, v in settings.items() if k not in ("inception", "inception_samples")}


def collapsed(final: dict | None, curve: list[dict]) -> bool | None:
    """COLLAPSE_RULE; None without class labels (a feature net without logits)."""
    if final is None or "classes_covered" not in final:
        return None
    if final["classes_covered"] < COLLAPSE_FINAL * final["real_classes_covered"]:
        return True
    peak = max((p["classes_covered"] for p in curve if "classes_covered" in p), default=0)
    return peak - final["classes_covered"] >= COLLAPSE_DROP * final["num_classes"]


# ---------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------


def compare(cfg: CompareConfig, progress: bool = True) -> Path:
    """Run the study of `cfg` and write its report; returns the report's path."""
    from .data import load_dataset
    from .images import auto_scale, grid, labelled_strip, to_pil
    from .runs import pick_device

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("data", "seeds", "out")}
    settings_file = out / "settings.json"
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        if _training_and_measuring(before) != _training_and_measuring(
            json.loads(json.dumps(settings))
        ):
            raise ValueError(f"{out} holds a study with other settings: choose another --out")
    settings_file.write_text(json.dumps(settings, indent=2))
    earlier: list[float] = []  # seconds of earlier starts whose runs this one reuses
    if (out / "results.json").is_file():
        env = json.loads((out / "results.json").read_text()).get("environment", {})
        earlier = env.get("starts_seconds", [env["seconds"]] if "seconds" in env else [])
    device = pick_device(cfg.device)
    say = print if progress else (lambda *a, **k: None)
    began = time.monotonic()
    results: dict = {
        "config": cfg.to_dict(),
        "environment": {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "datasets": {},
    }
    for data in cfg.data:
        dataset = load_dataset(data)
        ddir = out / Path(data).name
        ddir.mkdir(exist_ok=True)
        net, note = feature_net_for(data, dataset, cfg, out)
        gen = torch.Generator().manual_seed(0)
        n_real = max(cfg.samples, cfg.curve_samples, cfg.steps_samples)
        n_real = max(n_real, cfg.inception_samples if cfg.inception else 0)
        idx = torch.randperm(len(dataset), generator=gen)[: min(n_real, len(dataset))]
        real = torch.stack([dataset[int(i)]["image"] for i in idx])
        scorer = Scorer(net.to(device), real)
        inception = None
        if cfg.inception:
            from .metrics import InceptionFeatures

            inception = Scorer(InceptionFeatures(device=device), real[: cfg.inception_samples])
        entry: dict = {
            "info": {
                "size": dataset.size,
                "channels": dataset.channels,
                "images": len(dataset),
                "real_images": len(real),
                "feature_net": scorer.name,
                "feature_net_note": note,
                "inception_net": inception.name if inception else None,
            },
            "runs": {"gan": [], "diffusion": []},
        }
        for seed in range(cfg.seeds_for(data)):
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
        extras_file = ddir / "extras.json"
        if extras_file.is_file():
            entry.update(json.loads(extras_file.read_text()))
        else:
            say(f"{data}: generation speed, quality against sampling steps, sample grids")
            entry.update(seed0_extras(ddir, entry, scorer, cfg, device))
            extras_file.write_text(
                json.dumps({k: entry[k] for k in ("models", "speed", "steps_curve")}, indent=2)
            )
        seed0 = ddir / "seed0"
        pics = []
        for kind, label in (
            ("gan", "GAN (DCGAN), one pass"),
            ("diffusion", "diffusion, DPM-Solver++ 20 steps"),
        ):
            if (seed0 / kind / "model.safetensors").is_file():
                x = headline_samples(seed0 / kind, 36, device)
                pics.append((grid(to_pil(x), cols=6, scale=auto_scale(dataset.size, 64)), label))
        if pics:
            labelled_strip([p for p, _ in pics], [label for _, label in pics]).save(
                ddir / "samples.png"
            )
        results["datasets"][data] = entry
    starts = [*earlier, time.monotonic() - began]
    results["environment"].update(seconds=sum(starts), starts_seconds=starts)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = write_report(results, out)
    say(f"wrote {report}")
    return report


def seed0_extras(ddir: Path, entry: dict, scorer: Scorer, cfg: CompareConfig, device) -> dict:
    """Parameter counts, generation speed and the quality-vs-steps curve of seed 0's models."""
    from .model import DiffusionModel

    gan = diffusion = None
    seed0 = ddir / "seed0"
    if (seed0 / "gan" / "model.safetensors").is_file():
        gan = GAN.load(seed0 / "gan" / "model.safetensors", device)
    if (seed0 / "diffusion" / "model.safetensors").is_file():
        diffusion = DiffusionModel.load(seed0 / "diffusion" / "model.safetensors", device)
    models = {}
    if gan is not None:
        from .nn.gan import Discriminator

        c = gan.config
        models["gan"] = {
            "params": parameter_count(gan.generator),
            "params_d": parameter_count(Discriminator(c)),
            "description": f"DCGAN, z {c.z_dim}, G base {c.g_channels} / D base {c.d_channels} "
            f"channels, Adam {cfg.gan_lr:g} betas (0.5, 0.999), non-saturating loss",
        }
    if diffusion is not None:
        u = diffusion.config.unet
        models["diffusion"] = {
            "params": parameter_count(diffusion.unet),
            "description": f"U-Net channels {list(u.block_out_channels)}, "
            f"{u.layers_per_block} ResBlock a level, attention {list(u.attention_levels)}, "
            f"{diffusion.config.prediction}-prediction, {diffusion.config.schedule.kind} "
            f"schedule, AdamW {cfg.diffusion_lr:g} (warm-up {cfg.diffusion_warmup})",
        }
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
    return {"models": models, "speed": speed, "steps_curve": curve}


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if v == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(v)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{v:,.{decimals}f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def spread(values: list[float | None], digits: int = 3) -> str:
    """The mean ± std of the finite values (sample std; n/a for one value)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    m = sum(vals) / len(vals)
    return f"{_num(m, digits)} ± {_num(_std(vals), digits) if len(vals) > 1 else 'n/a'}"


def late_fluctuation(run: dict, metric: str = "fid") -> float | None:
    """Std of a metric over the points of the second half of training (None below 2)."""
    half = run.get("train_seconds", 0.0) / 2
    values = [p[metric] for p in run.get("curve", []) if p["seconds"] >= half and metric in p]
    return _std(values) if len(values) >= 2 else None


def _final(run: dict, key: str, scale: float = 1.0) -> float | None:
    final = run.get("final") or {}
    return final[key] * scale if key in final and final[key] is not None else None


def comparison_rows(entry: dict, cfg: dict) -> list[tuple[str, str, str]]:
    """(row label, GAN cell, diffusion cell) of one data set's table; section rows have
    empty cells."""
    runs = entry["runs"]
    info = entry["info"]
    net = info["feature_net"]
    n = min(cfg["samples"], info["real_images"])  # fakes are compared with as many reals
    n_curve = min(cfg["curve_samples"], info["real_images"])
    k = {kind: len(runs[kind]) for kind in ("gan", "diffusion")}

    def cell(kind: str, values: list[float | None], what: str) -> str:
        return f"{spread(values)} ({what}; {k[kind]} seed{'s' if k[kind] != 1 else ''})"

    def final_row(label: str, key: str, what: str, scale: float = 1.0):
        return (
            label,
            *(
                cell(kind, [_final(r, key, scale) for r in runs[kind]], what)
                for kind in ("gan", "diffusion")
            ),
        )

    def fid_range(kind: str) -> str:
        vals = [v for v in (_final(r, "fid") for r in runs[kind]) if v is not None]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            return "n/a"
        seeds = f"{k[kind]} seed{'s' if k[kind] != 1 else ''}"
        return f"{_num(min(vals))} – {_num(max(vals))} ({net}, n={n}; {seeds})"

    rows: list[tuple[str, str, str]] = [("**Stability**", "", "")]
    rows.append(
        ("FID of the final model, best – worst seed", fid_range("gan"), fid_range("diffusion"))
    )
    rows.append(
        (
            "FID fluctuation in the second half of training (std along the curve)",
            *(
                cell(
                    kind,
                    [late_fluctuation(r) for r in runs[kind]],
                    f"{net}, n={n_curve} a point",
                )
                for kind in ("gan", "diffusion")
            ),
        )
    )
    for label, key in (
        ("runs diverged (non-finite loss)", "diverged"),
        ("runs collapsed (mode coverage rule)", "collapsed"),
    ):
        cells = []
        for kind in ("gan", "diffusion"):
            flags = [r.get(key) for r in runs[kind]]
            known = [f for f in flags if f is not None]
            if not known:
                cells.append("n/a (no class labels)")
                continue
            text = f"{sum(bool(f) for f in known)} of {len(known)}"
            cells.append(text + (f" ({net} labels, n={n})" if key == "collapsed" else ""))
        rows.append((label, *cells))
    rows.append(
        (
            "training steps in the budget",
            *(
                cell(
                    kind, [float(r["steps"]) for r in runs[kind]], f"{cfg['budget_minutes']:g} min"
                )
                for kind in ("gan", "diffusion")
            ),
        )
    )
    rows.append(("**Quality**", "", ""))
    rows.append(final_row("FID ↓", "fid", f"{net}, n={n}"))
    rows.append(final_row("KID ×10³ ↓", "kid_mean", f"{net}, n={n}", 1e3))
    rows.append(final_row("precision ↑", "precision", f"{net}, n={n}, k=3"))
    if any(r.get("inception") for kind in runs for r in runs[kind]):
        ni = next(r["inception"]["n"] for kind in runs for r in runs[kind] if r.get("inception"))
        rows.append(
            (
                "Inception FID ↓",
                *(
                    cell(
                        kind,
                        [(r.get("inception") or {}).get("fid") for r in runs[kind]],
                        f"{info['inception_net']}, n={ni}",
                    )
                    for kind in ("gan", "diffusion")
                ),
            )
        )
    rows.append(("**Diversity**", "", ""))
    rows.append(final_row("recall ↑", "recall", f"{net}, n={n}, k=3"))
    if any("classes_covered" in (r.get("final") or {}) for kind in runs for r in runs[kind]):
        classes = next(
            r["final"]["num_classes"]
            for kind in runs
            for r in runs[kind]
            if "num_classes" in (r.get("final") or {})
        )
        rows.append(
            final_row(
                f"classes covered (of {classes}) ↑", "classes_covered", f"{net} labels, n={n}"
            )
        )
        rows.append(final_row("class KL from the data ↓", "class_kl", f"{net} labels, n={n}"))
    rows.append(("**Generation speed** (images/s ↑)", "", ""))
    speed = entry.get("speed", {})
    g = speed.get("gan")

    def rate(s: dict | None, what: str) -> str:
        if not s:
            return "n/a"
        return f"{_num(s['mean'])} ± {_num(s['std']) if s['repeats'] > 1 else 'n/a'} ({what}; batch {s['batch']}, {s['repeats']} timed run{'s' if s['repeats'] != 1 else ''})"

    for sampler, steps in SPEED_CONFIGS:
        label = f"{SAMPLER_NAMES[sampler]}, {steps} steps"
        rows.append(
            (
                f"diffusion: {label}; GAN: one pass",
                rate(g, "one pass"),
                rate(speed.get(f"{sampler}-{steps}"), label),
            )
        )
    return rows


def _plain_ticks(*axes) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in axes:
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())


def _plot_curves(entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = entry["runs"]
    coverage = any("classes_covered" in p for kind in runs for r in runs[kind] for p in r["curve"])
    fig, axes = plt.subplots(1, 2 if coverage else 1, figsize=(11 if coverage else 6, 3.8), dpi=100)
    axes = list(axes) if coverage else [axes]
    colours = {"gan": "tab:red", "diffusion": "tab:blue"}
    for kind in ("gan", "diffusion"):
        for i, r in enumerate(runs[kind]):
            pts = [p for p in r["curve"] if p.get("fid") is not None]
            label = f"{kind}" if i == 0 else None
            xs = [p["seconds"] / 60 for p in pts]
            axes[0].plot(
                xs, [p["fid"] for p in pts], marker="o", color=colours[kind], alpha=0.8, label=label
            )
            if coverage:
                axes[1].plot(
                    xs,
                    [p.get("classes_covered") for p in pts],
                    marker="o",
                    color=colours[kind],
                    alpha=0.8,
                    label=label,
                )
            if r.get("diverged") and pts:
                axes[0].plot(xs[-1], pts[-1]["fid"], "x", color="black", ms=10)
    net = entry["info"]["feature_net"]
    axes[0].set_ylabel(f"FID ({net})")
    axes[0].set_yscale("log")
    _plain_ticks(axes[0].yaxis)
    if coverage:
        axes[1].set_ylabel("classes covered")
    for ax in axes:
        ax.set_xlabel("training wall time (min)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_steps(entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = entry.get("steps_curve") or {}
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for sampler, points in curve.get("samplers", {}).items():
        ax.plot(
            [p["steps"] for p in points],
            [p["fid"] for p in points],
            marker="o",
            label=SAMPLER_NAMES.get(sampler, sampler),
        )
    if curve.get("gan_fid") is not None:
        ax.axhline(curve["gan_fid"], color="tab:red", ls="--", label="GAN (one pass)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax.xaxis, ax.yaxis)
    ax.set_xlabel("sampling steps (= network evaluations per image)")
    ax.set_ylabel(f"FID ({curve.get('feature_net', '')}, n={curve.get('n', '?')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _seeds_text(cfg: dict) -> str:
    config = CompareConfig.from_dict(cfg)
    counts = {Path(d).name: config.seeds_for(d) for d in config.data}

    def seeds(n: int) -> str:
        return f"{n} seed{'s' if n != 1 else ''}"

    if len(set(counts.values())) == 1:
        return f"{seeds(next(iter(counts.values())))} per model and data set"
    return ", ".join(f"{seeds(n)} on {name}" for name, n in counts.items()) + " per model"


def write_report(results: dict, out: str | Path) -> Path:
    """report.md (and the plots it shows) from the numbers of a study."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, env = results["config"], results["environment"]
    lines = [
        "# Diffusion vs GAN on the same wall-clock budget",
        "",
        "Made by `difusion compare`. Every model trained for "
        f"**{cfg['budget_minutes']:g} minutes** of wall time (batch {cfg['batch_size']}), "
        f"with **{_seeds_text(cfg)}**, on {env['device']} with {env['threads']} thread"
        f"{'s' if env['threads'] != 1 else ''} (torch {env['torch']}); preset "
        f"`{cfg['preset']}`. Cells are mean ± std across seeds (sample std; n/a with one seed), "
        "each with the feature network and the number of samples (and as many real images) "
        "behind it.",
        "",
        f"- Headline metrics: **{cfg['samples']} samples a model**; diffusion samples with "
        f"{SAMPLER_NAMES[HEADLINE[0]]}, {HEADLINE[1]} steps; both models use their EMA "
        f"weights (decay {cfg['ema_decay']}).",
        f"- Along training: the latest checkpoint every budget / {cfg['curve_points']} of wall "
        f"time and at the end, {cfg['curve_samples']} samples each.",
        f"- Quality against sampling steps: seed 0's model, {cfg['steps_samples']} samples a point.",
        f"- Speed: batch {cfg['speed_batch']}, mean ± std of {cfg['speed_repeats']} timed runs "
        "after a warm-up (DDPM-1000: at most 2).",
        f"- Collapse: {COLLAPSE_RULE}.",
        "- FID and KID use torchmetrics on the features; precision and recall are those of "
        "Kynkäänniemi et al. (2019) with k = 3.",
    ]
    if "seconds" in env:
        starts = env.get("starts_seconds", [env["seconds"]])
        parts = " + ".join(f"{s / 60:.1f}" for s in starts)
        lines.append(
            f"- The whole study took {env['seconds'] / 60:.1f} minutes"
            + (
                f" ({parts} over {len(starts)} starts; a start reuses the runs finished before it)."
                if len(starts) > 1
                else "."
            )
        )
    for data, entry in results["datasets"].items():
        info = entry["info"]
        name = Path(data).name
        (out / name).mkdir(exist_ok=True)
        lines += [
            "",
            f"## {data}",
            "",
            f"{info['images']} images of {info['size']}×{info['size']} px, "
            f"{info['channels']} channel{'s' if info['channels'] != 1 else ''}; feature network "
            f"`{info['feature_net']}` ({info['feature_net_note']}); {info['real_images']} real "
            "images drawn once (seed 0).",
            "",
        ]
        for kind, title in (("gan", "GAN"), ("diffusion", "Diffusion")):
            m = entry.get("models", {}).get(kind)
            if m:
                params = f"{_count(m['params'])} parameters" + (
                    f" (+ discriminator {_count(m['params_d'])})" if "params_d" in m else ""
                )
                lines.append(f"- {title}: {m['description']}; {params}.")
        for kind in ("gan", "diffusion"):
            for r in entry["runs"][kind]:
                if r.get("error"):
                    lines.append(f"- {kind} seed {r.get('seed', '?')}: {r['error']}")
        lines += ["", "| | GAN | diffusion |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in comparison_rows(entry, cfg)]
        _plot_curves(entry, out / name / "curves.png")
        lines += ["", f"![metric along training]({name}/curves.png)", ""]
        if (
            entry.get("steps_curve", {}).get("samplers")
            or entry.get("steps_curve", {}).get("gan_fid") is not None
        ):
            _plot_steps(entry, out / name / "steps.png")
            lines += [f"![quality against sampling steps]({name}/steps.png)", ""]
            curve = entry["steps_curve"]
            lines += ["| sampler | steps: FID |", "|---|---|"]
            for sampler, points in curve["samplers"].items():
                cells = ", ".join(f"{p['steps']}: {_num(p['fid'])}" for p in points)
                lines.append(f"| {SAMPLER_NAMES.get(sampler, sampler)} | {cells} |")
            if curve.get("gan_fid") is not None:
                lines.append(f"| GAN (one pass) | 1: {_num(curve['gan_fid'])} |")
            lines += [
                "",
                f"(FID with `{curve['feature_net']}`, n={curve['n']} samples a point.)",
                "",
            ]
        if (out / name / "samples.png").is_file():
            lines += [f"![samples, seed 0: GAN left, diffusion right]({name}/samples.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
