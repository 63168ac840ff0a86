"""The settings of the study and of the budget sweep: `CompareConfig`, presets, constants."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..configs import DictConfig

HEADLINE = ("dpmpp_2m", 20)
SPEED_CONFIGS = (("ddpm", 1000), ("ddim", 50), ("dpmpp_2m", 20), ("dpmpp_2m", 10))
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "lcm": "LCM"}
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
        "dit": {"channels": 128, "head_dim": 32, "depth": 6, "patch_size": 2},
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
        "dit": {"channels": 32, "head_dim": 16, "depth": 2, "patch_size": 4},
        "checkpoint_every": {"gan": 2, "diffusion": 2},
        "classifier_steps": 20,
        "steps_grid": {"ddpm": (4, 8), "ddim": (2, 4), "dpmpp_2m": (2, 4)},
    },
}


# `--recipes`: a diffusion recipe is "<backbone>-<objective>"; "v" is the project's fashion
# recipe (v-prediction, zero terminal SNR, min-SNR 5), "edm" and "flow" their own objectives
RECIPE_OBJECTIVES: dict[str, dict] = {
    "eps": {"objective": "ddpm", "prediction": "eps"},
    "v": {"objective": "ddpm", "prediction": "v", "zero_terminal_snr": True, "min_snr_gamma": 5.0},
    "x0": {"objective": "ddpm", "prediction": "x0"},
    "edm": {"objective": "edm"},
    "flow": {"objective": "flow"},
}
# "dit" has the preset's patches; "dit4" patches of 4 px (a quarter of the tokens: a training
# step 0.44x the small U-Net's time at 32 px, "dit" 2.2x; bench/recipe_speed.py)
BACKBONES = {"unet": {"backbone": "unet"}, "dit": {"backbone": "dit"},
             "dit4": {"backbone": "dit", "patch_size": 4}}  # fmt: skip


def parse_recipes(text: str) -> tuple[str, ...]:
    """ "unet-v,dit-flow" -> ("unet-v", "dit-flow"): known, distinct recipes, in order."""
    recipes = tuple(item.strip() for item in str(text).split(",") if item.strip())
    known = [f"{b}-{o}" for b in BACKBONES for o in RECIPE_OBJECTIVES]
    for recipe in recipes:
        if recipe not in known:
            raise ValueError(
                f"--recipes: unknown recipe {recipe!r}; choose from {', '.join(known)}"
            )
    if not recipes or len(set(recipes)) != len(recipes):
        raise ValueError(f"--recipes: give distinct recipes, e.g. unet-v,dit-flow; got {text!r}")
    return recipes


def recipe_settings(recipe: str) -> dict:
    """The TrainConfig options of a recipe's objective, and its backbone."""
    backbone, objective = recipe.split("-")
    return {**BACKBONES[backbone], **RECIPE_OBJECTIVES[objective]}


@dataclass
class CompareConfig(DictConfig):
    data: tuple[str, ...] = ("digits", "fashion", "shapes")
    out: str = "compare"
    budget_minutes: float = 5.0  # training wall time per model and seed
    seeds: int | str = "fashion=3,1"  # "N", "name=N,...,N" (N: the rest) or a list "0,4,7"
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
    prediction: str = "eps"  # the diffusion model's target: eps, v or x0
    zero_terminal_snr: bool = False
    min_snr_gamma: float = 0.0  # min-SNR loss weighting; 0 turns it off
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
        if self.prediction not in ("eps", "v", "x0"):
            raise ValueError(f"--prediction must be eps, v or x0, got {self.prediction!r}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"--min-snr-gamma must be 0 or more, got {self.min_snr_gamma}")
        for data in self.data:
            self.seed_list(data)  # a bad --seeds fails here, before any training
        for name in ("samples", "curve_samples", "steps_samples", "inception_samples"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name.replace('_', '-')} must be at least 8")
        if self.curve_points < 1 or self.speed_batch < 1 or self.speed_repeats < 1:
            raise ValueError("curve points, speed batch and speed repeats must be positive")

    def seed_list(self, data: str) -> list[int]:
        """Training seeds on `data`. `seeds` is a count for every data set ("3": seeds 0, 1,
        2), counts per data set ("fashion=3,1": fashion 3, the rest 1) or a list of seeds
        ("0,4,7": two values or more without a name)."""
        counts: dict[str | None, int] = {}
        unnamed: list[int] = []
        for item in str(self.seeds).split(","):
            name, _, value = item.strip().rpartition("=")
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"--seeds: {item.strip()!r} is not N or NAME=N") from None
            counts[name.strip() or None] = number
            if not name.strip():
                unnamed.append(number)
        if len(unnamed) > 1:
            if len(counts) > 1:
                raise ValueError(
                    f"--seeds {self.seeds!r}: give counts (fashion=3,1) or a list of seeds "
                    "(0,4,7), not both"
                )
            if min(unnamed) < 0 or len(set(unnamed)) != len(unnamed):
                raise ValueError(f"--seeds {self.seeds!r}: seeds must be distinct and >= 0")
            return unnamed
        key = Path(data).name if Path(data).name in counts else None
        if key not in counts:
            raise ValueError(f"--seeds {self.seeds!r} gives no count for {data!r}")
        if counts[key] < 1:
            raise ValueError(f"--seeds must be at least 1, got {counts[key]} for {data!r}")
        return list(range(counts[key]))

    def seeds_for(self, data: str) -> int:
        """How many training seeds `data` gets."""
        return len(self.seed_list(data))

    @property
    def steps_grid(self) -> dict[str, tuple[int, ...]]:
        return PRESETS[self.preset]["steps_grid"]

    def recipe(self) -> str:
        """The diffusion objective in words (prediction, schedule, loss weighting)."""
        parts = [f"{self.prediction}-prediction", "cosine schedule"]
        if self.zero_terminal_snr:
            parts[-1] += " rescaled to zero terminal SNR"
        if self.min_snr_gamma > 0:
            parts.append(f"min-SNR weighting (gamma {self.min_snr_gamma:g})")
        return ", ".join(parts)


def check_settings(
    folder: Path, settings: dict, defaults: dict, ignored: tuple[str, ...], what: str
) -> None:
    """A folder's settings.json must match `settings` but for the `ignored` keys (a key the
    stored file predates counts as its value in `defaults`); then it is (re)written."""
    path = folder / "settings.json"
    settings, defaults = json.loads(json.dumps([settings, defaults]))  # tuples as stored
    if path.is_file():
        stored = {**defaults, **json.loads(path.read_text())}
        differ = sorted(k for k in settings if k not in ignored and stored.get(k) != settings[k])
        if differ:
            raise ValueError(
                f"{folder} holds a {what} with other settings ({', '.join(differ)}): "
                "choose another --out"
            )
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))
