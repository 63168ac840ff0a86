"""Measuring the study's models: FID, KID, precision/recall and mode coverage against a fixed
real set (`Scorer`), the headline samples of a run, generation speed, and the feature network
of a data set (shipped, or a classifier trained here and cached)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..evaluate import draw
from ..nn.gan import GAN, is_gan_file
from .config import COLLAPSE_DROP, COLLAPSE_FINAL, HEADLINE, PRESETS, SPEED_CONFIGS, CompareConfig


def load_generator_or_diffusion(path: str | Path, device: str | torch.device = "cpu"):
    """A run folder or model file -> `GAN` or `DiffusionModel`, by the file's format."""
    from ..model import DiffusionModel, resolve_checkpoint

    path = resolve_checkpoint(path)
    if is_gan_file(path):
        return GAN.load(path, device)
    return DiffusionModel.load(path, device)


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
        from ..metrics import class_histogram, feature_metrics, mode_coverage

        n = min(len(fake), len(self.real_f))
        fake_f, fake_logits = self.net.extract(fake[:n])
        out = {
            **feature_metrics(self.real_f[:n], fake_f, self.k),
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
    return {
        "mean": sum(rates) / len(rates),
        "std": sample_std(rates),
        "batch": batch,
        "repeats": repeats,
    }


def sample_std(values: list[float]) -> float:
    """The sample standard deviation (0 below two values)."""
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
    from ..metrics import ClassifierFeatures, load_feature_net

    if cfg.feature_net is not None:
        return load_feature_net(cfg.feature_net), f"{cfg.feature_net} (as asked)"
    try:
        return load_feature_net(data), "shipped with the package"
    except ValueError:
        pass
    from ..nn.classifier import Classifier, accuracy, train_classifier

    path = out / "classifiers" / f"classifier-{Path(data).name}.safetensors"
    note_path = path.with_suffix(".json")
    if path.is_file() and note_path.is_file():
        return ClassifierFeatures(Classifier.load(path)), json.loads(note_path.read_text())["note"]
    if not getattr(dataset, "num_classes", None):
        from ..data import load_dataset

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


def real_sample(dataset, n: int) -> torch.Tensor:
    """The real images every model of a data set is compared with: n of them (at most the
    whole set), drawn once with seed 0."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(dataset), generator=gen)[: min(n, len(dataset))]
    return torch.stack([dataset[int(i)]["image"] for i in idx])


def scorers_for(
    data: str, dataset, real: torch.Tensor, cfg: CompareConfig, out: Path, device: torch.device
) -> tuple[Scorer, Scorer | None, str]:
    """The feature network's scorer, the Inception scorer (None unless `cfg.inception`) and
    a note on where the feature network comes from."""
    net, note = feature_net_for(data, dataset, cfg, out)
    inception = None
    if cfg.inception:
        from ..metrics import InceptionFeatures

        inception = Scorer(InceptionFeatures(device=device), real[: cfg.inception_samples])
    return Scorer(net.to(device), real), inception, note


def measure_samples(
    sample: Callable[[int], torch.Tensor],
    scorer: Scorer,
    inception: Scorer | None,
    cfg: CompareConfig,
) -> tuple[dict, dict | None]:
    """The headline metrics of the images `sample(n)` draws: in the feature network's space
    on the first `cfg.samples`, and in Inception's on the first `cfg.inception_samples` of
    the same draw (None without `inception`)."""
    n = max(cfg.samples, cfg.inception_samples if inception is not None else 0)
    fake = sample(n)
    final = scorer(fake[: cfg.samples])
    return final, inception(fake[: cfg.inception_samples]) if inception is not None else None


def measure_model(
    path: Path, scorer: Scorer, inception: Scorer | None, cfg: CompareConfig, device
) -> tuple[dict, dict | None]:
    """The headline metrics (`measure_samples`) of a model (a run folder or a file), drawn
    as `headline_samples` draws them."""
    return measure_samples(lambda n: headline_samples(path, n, device), scorer, inception, cfg)


def headline_samples(path: Path, n: int, device) -> torch.Tensor:
    """n samples of a model (a run folder or a model file) drawn as the headline metrics draw
    them: a GAN in one pass, a diffusion model with HEADLINE. Seeded per batch, so the
    first k of n samples are the k samples of a draw of k: the Inception FID added to a
    finished run sees the images that `measure_run` would have given it."""
    return draw(
        load_generator_or_diffusion(path, device), n, sampler=HEADLINE[0], steps=HEADLINE[1]
    )


def collapsed(final: dict | None, curve: list[dict]) -> bool | None:
    """COLLAPSE_RULE; None without class labels (a feature net without logits)."""
    if final is None or "classes_covered" not in final:
        return None
    if final["classes_covered"] < COLLAPSE_FINAL * final["real_classes_covered"]:
        return True
    peak = max((p["classes_covered"] for p in curve if "classes_covered" in p), default=0)
    return peak - final["classes_covered"] >= COLLAPSE_DROP * final["num_classes"]
