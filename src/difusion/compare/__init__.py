"""The diffusion-vs-GAN study behind `difusion compare`, and its sweep over training budgets.

config.py        CompareConfig, the presets and the study's constants
evaluation.py    measuring a model: Scorer (FID, KID, precision/recall, coverage), speed
study.py         the study at one budget: training each family, measuring, compare()
report.py        the study's report.md and plots
sweep.py         `--budgets`: the study at several budgets, runs resumed from budget to
                 budget, students distilled at each; `--recipes`: several diffusion recipes
sweep_report.py  the sweep's summary, crossing point, sweep.md and fid_vs_minutes.png
"""

from .config import (
    COLLAPSE_RULE,
    HEADLINE,
    PRESETS,
    SAMPLER_NAMES,
    SPEED_CONFIGS,
    CompareConfig,
    parse_recipes,
)
from .evaluation import Scorer, collapsed, headline_samples, load_generator_or_diffusion
from .report import comparison_rows, late_fluctuation, spread, write_report
from .study import compare, train_one, unet_options
from .sweep import SweepConfig, parse_budgets, sweep, training_seconds
from .sweep_report import crossing_point, describe_race

__all__ = [
    "COLLAPSE_RULE",
    "HEADLINE",
    "PRESETS",
    "SAMPLER_NAMES",
    "SPEED_CONFIGS",
    "CompareConfig",
    "Scorer",
    "SweepConfig",
    "collapsed",
    "compare",
    "comparison_rows",
    "crossing_point",
    "describe_race",
    "headline_samples",
    "late_fluctuation",
    "load_generator_or_diffusion",
    "parse_budgets",
    "parse_recipes",
    "spread",
    "sweep",
    "train_one",
    "training_seconds",
    "unet_options",
    "write_report",
]
