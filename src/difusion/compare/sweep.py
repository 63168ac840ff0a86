"""`difusion compare --budgets 2,5,10,20,40`: the study at several training budgets.

Budgets are the total training time of a run, in minutes. For each budget in turn, for each
seed and family, the run folder `<out>/<data>/sweep/seed<k>/<gan|diffusion>/` continues from
its last checkpoint until its training time reaches the budget, then its model is measured:
the sweep costs the largest budget per family and seed, not the sum. A run's training time
is read back from its own log (`training_seconds`), so a killed sweep resumes exactly: each
measured budget is a file `results/seed<k>-<family>-<b>min.json`, and a later start skips
the budgets that have one.

At every budget the diffusion model is also distilled (`distill.py`, consistency
distillation) for `distill_minutes` of extra compute into a student sampled with 1, 2 and 4
`lcm` steps, and measured as its teacher is (in the feature network's space, and in
Inception's unless `--no-inception`) beside its teacher's 20 steps.

Writes, per data set, `sweep.json` (every number and the sweep's wall time), `sweep.md` and
`fid_vs_minutes.png` (`sweep_report.py`) in `<out>/<data>/sweep/`, after every budget.

With `recipes` ("unet-v,unet-edm,unet-flow,dit-flow": `config.parse_recipes`), each recipe
is a family of its own beside the GAN, its runs in `seed<k>/<recipe>/`, and the sweep lives
in `<out>/<data>/recipes/`: one table and one plot with every recipe and the GAN (no
students: `distill_minutes` must be 0).

Starts on one folder at once share its work, one core each: a start trains and measures a run
(one family and seed) only while it holds that run's lock (`seed<k>/<family>.lock`), takes
the next budget whose earlier ones are measured, and waits when every such run is held by
another start. The report is rewritten from the results on disk after every budget, and the
wall time is the union of the starts' intervals.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..evaluate import draw
from ..machine import cpu_model
from ..runs import Run, write_whole
from .config import CompareConfig, check_settings, parse_recipes, recipe_settings
from .evaluation import Scorer, measure_model, measure_samples, real_sample, scorers_for
from .study import (
    dataset_info,
    describe_diffusion,
    describe_models,
    environment,
    train_run,
)
from .sweep_report import summarize, write_sweep_report

# the study's settings that a sweep's numbers do not depend on
NOT_FOR_SWEEP = (
    "data", "out", "seeds", "budget_minutes", "curve_points", "curve_samples",
    "steps_samples", "speed_batch", "speed_repeats",
)  # fmt: skip


WAIT_SECONDS = 5.0  # how often a start looks again when every run it could take is held


def parse_budgets(text: str) -> tuple[float, ...]:
    """ "2,5,10" -> (2.0, 5.0, 10.0): positive minutes, distinct, sorted."""
    budgets = []
    for item in str(text).split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--budgets: {item.strip()!r} is not a number of minutes") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--budgets: minutes must be positive, got {item.strip()}")
        budgets.append(value)
    budgets.sort()
    for a, b in zip(budgets, budgets[1:], strict=False):
        if label(a) == label(b):  # results are filed by label
            raise ValueError(f"--budgets: {a:g} minutes is given twice")
    return tuple(budgets)


@dataclass
class SweepConfig:
    study: CompareConfig
    budgets: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0, 40.0)
    distill_minutes: float = 2.0  # per budget and seed, on top of the budget; 0: no students
    student_steps: tuple[int, ...] = (1, 2, 4)
    recipes: tuple[str, ...] = ()  # diffusion recipes beside the GAN; () the study's one

    def __post_init__(self) -> None:
        self.budgets = parse_budgets(",".join(map(str, self.budgets)))
        if not (math.isfinite(self.distill_minutes) and self.distill_minutes >= 0):
            raise ValueError(f"--distill-minutes must be 0 or more, got {self.distill_minutes}")
        if self.recipes:
            self.recipes = parse_recipes(",".join(self.recipes))
            if self.distill_minutes > 0:
                raise ValueError("--recipes distils no students: give --distill-minutes 0")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The families of runs: the GAN, then the diffusion model or each recipe."""
        return ("gan", *(self.recipes or ("diffusion",)))

    @property
    def folder_name(self) -> str:
        return "recipes" if self.recipes else "sweep"

    def settings(self, study: CompareConfig) -> dict:
        """What a sweep's numbers depend on (a later start must keep them)."""
        kept = {k: v for k, v in study.to_dict().items() if k not in NOT_FOR_SWEEP}
        recipes = {"recipes": list(self.recipes)} if self.recipes else {}
        return {
            **kept,
            "distill_minutes": self.distill_minutes,
            "student_steps": self.student_steps,
            **recipes,
        }


def label(minutes: float) -> str:
    return f"{minutes:g}min"


def checkpoint_step(run_dir: Path) -> int:
    from ..checkpoints import read_metadata

    run = Run(run_dir)
    return int(read_metadata(run.state_path)["step"]) if run.exists() else 0


def training_seconds(run_dir: Path, step: int | None = None) -> float:
    """The training time of a run up to `step` (default: its checkpoint's step), from its log:
    each line's steps since the line before it over the rate it logged. Setup, final save and
    previews are not counted: the time in the loop, as a `--minutes` budget counts it."""
    step = checkpoint_step(run_dir) if step is None else step
    total, last = 0.0, 0
    for record in Run(run_dir).read_log():
        if "steps_per_s" in record and last < record["step"] <= step:
            total += (record["step"] - last) / record["steps_per_s"]
            last = record["step"]
    return total


def train_to(kind: str, data: str, dataset, seed: int, run_dir: Path, minutes: float,
             cfg: CompareConfig) -> str | None:  # fmt: skip
    """Continue a run until its training time is `minutes` (start it if it has no checkpoint);
    returns the reason it stopped early on a non-finite loss, else None. `budget.json` notes
    the budget it was last trained to, so a start after a kill does not add a few seconds."""
    marker = run_dir / "budget.json"
    trained_to = json.loads(marker.read_text())["minutes"] if marker.is_file() else 0.0
    if trained_to > minutes:
        raise ValueError(past_budget(run_dir, minutes))
    if trained_to == minutes:
        return None
    resume = Run(run_dir).exists()
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # killed before its first checkpoint: start it again
    left = minutes * 60 - (training_seconds(run_dir) if resume else 0.0)
    error = None
    if left > 0:
        error = train_run(kind, data, dataset, seed, run_dir, cfg, left / 60, resume=resume)
    marker.write_text(json.dumps({"minutes": minutes}))
    return error


def distil_student(teacher: Path, out: Path, data: str, dataset, seed: int,
                   scfg: SweepConfig) -> Path:  # fmt: skip
    """Consistency-distil `teacher` (a run folder) for `distill_minutes` into `out`, afresh."""
    from ..distill import DistillConfig, distill

    if out.exists():
        shutil.rmtree(out)
    dcfg = DistillConfig(
        teacher=str(teacher), out=str(out), data=data, steps=10**9,
        minutes=scfg.distill_minutes, device=scfg.study.device, seed=seed,
        sample_every=10**9, checkpoint_every=10**9,
    )  # fmt: skip
    return distill(dcfg, dataset=dataset, progress=False)


def measure_student(
    run_dir: Path, scorer: Scorer, inception: Scorer | None, scfg: SweepConfig, device
) -> dict:
    """The student's headline metrics with each of `student_steps` lcm steps, as its teacher's
    are measured (`measure_samples`): `steps` in the feature network's space, `inception`
    (None without `inception`) in Inception's, by step count."""
    from ..model import DiffusionModel

    student = DiffusionModel.load(Run(run_dir).model_path, device)
    steps, in_inception = {}, {}
    for k in scfg.student_steps:
        lcm = partial(draw, student, sampler="lcm", steps=k)
        steps[str(k)], in_inception[str(k)] = measure_samples(lcm, scorer, inception, scfg.study)
    return {
        "train_steps": checkpoint_step(run_dir),
        "steps": steps,
        "inception": in_inception if inception is not None else None,
    }


def past_budget(run_dir: Path, minutes: float) -> str:
    return (
        f"{run_dir} has trained past {minutes:g} minutes already: a budget below those "
        "measured needs another --out"
    )


def result_path(folder: Path, seed: int, kind: str, minutes: float) -> Path:
    return folder / "results" / f"seed{seed}-{kind}-{label(minutes)}.json"


def measured_budgets(folder: Path, seed: int, kind: str) -> dict[float, dict]:
    """The results a sweep folder holds for one run, by budget."""
    found = {}
    for path in (folder / "results").glob(f"seed{seed}-{kind}-*min.json"):
        result = json.loads(path.read_text())
        found[result["budget_minutes"]] = result
    return found


def budget_result(
    kind: str, data: str, dataset, seed: int, minutes: float, folder: Path,
    scorers: tuple[Scorer, Scorer | None], scfg: SweepConfig, device, say,
) -> dict:  # fmt: skip
    """One run at one budget: read back if measured, else trained on to it and measured."""
    path = result_path(folder, seed, kind, minutes)
    if path.is_file():
        return json.loads(path.read_text())
    cfg, run_dir = scfg.study, folder / f"seed{seed}" / kind
    done = measured_budgets(folder, seed, kind)
    if any(b > minutes for b in done):
        raise ValueError(past_budget(run_dir, minutes))
    before = done[max(done)] if done else None
    result = {"seed": seed, "kind": kind, "budget_minutes": minutes, "diverged": False,
              "error": None, "final": None, "inception": None}  # fmt: skip
    if before is not None and before["diverged"]:
        result.update(diverged=True, error=before["error"], steps=before["steps"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        return result  # a diverged run is not trained further
    start_step = before["steps"] if before is not None else 0
    say(f"{data} seed {seed}: training the {kind} to {minutes:g} min (from step {start_step})")
    began = time.monotonic()
    error = train_to(kind, data, dataset, seed, run_dir, minutes, cfg)
    train_wall = time.monotonic() - began
    result.update(
        diverged=error is not None, error=error, start_step=start_step,
        steps=checkpoint_step(run_dir), train_seconds=training_seconds(run_dir),
    )  # fmt: skip
    if result["train_seconds"] > 0:
        result["images_per_second"] = result["steps"] * cfg.batch_size / result["train_seconds"]
    began = time.monotonic()
    if Run(run_dir).model_path.is_file():
        result["final"], result["inception"] = measure_model(run_dir, *scorers, cfg, device)
    wall = {"train": train_wall, "measure": time.monotonic() - began}
    if kind == "diffusion" and scfg.distill_minutes > 0 and result["final"] is not None:
        say(f"{data} seed {seed}: distilling the {minutes:g}-min diffusion model")
        began = time.monotonic()
        student_dir = folder / f"seed{seed}" / f"student-{label(minutes)}"
        distil_student(run_dir, student_dir, data, dataset, seed, scfg)
        wall["distill"] = time.monotonic() - began
        began = time.monotonic()
        result["student"] = measure_student(student_dir, *scorers, scfg, device)
        wall["measure_student"] = time.monotonic() - began
    result["wall_seconds"] = wall
    result["cpu"] = cpu_model()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def sweep_data(data: str, scfg: SweepConfig, device: torch.device, say) -> Path:
    """The sweep on one data set; returns the path of its sweep.md."""
    from ..data import load_dataset
    from .study import load_models

    cfg = scfg.study
    out = Path(cfg.out)
    folder = out / Path(data).name / scfg.folder_name
    defaults = scfg.settings(CompareConfig())
    check_settings(folder, scfg.settings(cfg), defaults, (), "sweep")
    began = time.time()
    dataset = load_dataset(data)
    real = real_sample(dataset, max(cfg.samples, cfg.inception_samples if cfg.inception else 0))
    scorer, inception, note = scorers_for(data, dataset, real, cfg, out, device)
    seeds = cfg.seed_list(data)
    sweep: dict = {
        "data": data,
        "config": cfg.to_dict(),
        "budgets": list(scfg.budgets),
        "seeds": seeds,
        "distill_minutes": scfg.distill_minutes,
        "student_steps": list(scfg.student_steps),
        "recipe": cfg.recipe(),
        "kinds": list(scfg.kinds),
        "environment": environment(device),
        "info": dataset_info(dataset, real, scorer, inception, note),
        "runs": [],
    }
    items = [(m, seed, kind) for m in scfg.budgets for seed in seeds for kind in scfg.kinds]
    todo = list(items)
    while todo:
        for minutes, seed, kind in ready(todo, folder, scfg.budgets):
            with run_lock(folder / f"seed{seed}" / f"{kind}.lock") as mine:
                if mine:
                    budget_result(
                        kind, data, dataset, seed, minutes, folder, (scorer, inception),
                        scfg, device, say,
                    )  # fmt: skip
                    break
        else:
            time.sleep(WAIT_SECONDS)  # every run this start could take is another's
            continue
        todo = [i for i in todo if not result_path(folder, i[1], i[2], i[0]).is_file()]
        sweep["runs"] = [
            json.loads(path.read_text())
            for path in (result_path(folder, s, k, m) for m, s, k in items)
            if path.is_file()
        ]
        sweep["models"] = describe_models(*load_models(folder / f"seed{seeds[0]}", device), cfg)
        sweep["models"].update(describe_recipes(folder / f"seed{seeds[0]}", scfg, device))
        sweep["summary"] = summarize(sweep)
        report = write_sweep(sweep, folder, began)
    say(f"wrote {report}")
    return report


def ready(todo: list[tuple], folder: Path, budgets: tuple[float, ...]) -> list[tuple]:
    """The items of `todo` (minutes, seed, kind) whose run has every earlier budget measured."""
    return [
        (m, seed, kind)
        for m, seed, kind in todo
        if all(result_path(folder, seed, kind, b).is_file() for b in budgets if b < m)
    ]


@contextmanager
def run_lock(path: Path, wait: bool = False):
    """Yields whether this process holds the lock file `path` (taken at once, or after
    waiting with `wait`); the lock goes with the process if it dies. Without `fcntl` (not a
    POSIX system) every lock is taken: one start at a time there."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wall_seconds(starts: list[list]) -> float:
    """The wall time of starts [began, seconds] (began None: an older start, run alone): the
    length of the union of their intervals."""
    total = sum(s for b, s in starts if b is None)
    end = -math.inf
    for b, s in sorted((b, s) for b, s in starts if b is not None):
        total += max(0.0, b + s - max(b, end))
        end = max(end, b + s)
    return total


def write_sweep(sweep: dict, folder: Path, began: float) -> Path:
    """Write sweep.json and the report, this start's interval (since epoch `began`) merged
    with those of the other starts the file holds; returns the report's path."""
    results_file = folder / "sweep.json"
    with run_lock(folder / "report.lock", wait=True):
        stored = {}
        if results_file.is_file():
            stored = json.loads(results_file.read_text()).get("environment", {})
        starts = stored.get("starts") or [[None, s] for s in stored.get("starts_seconds", [])]
        starts = [s for s in starts if s[0] != began] + [[began, time.time() - began]]
        sweep["environment"].update(
            seconds=wall_seconds(starts), starts=starts, starts_seconds=[s for _, s in starts]
        )
        write_whole(results_file, lambda staged: staged.write_text(json.dumps(sweep, indent=2)))
        return write_sweep_report(sweep, folder)


def describe_recipes(folder: Path, scfg: SweepConfig, device) -> dict:
    """Each recipe's model (of a seed's `folder`): parameters and a line of description."""
    from ..model import DiffusionModel

    models = {}
    for recipe in scfg.recipes:
        path = folder / recipe / "model.safetensors"
        if path.is_file():
            gamma = recipe_settings(recipe).get("min_snr_gamma", 0.0)
            models[recipe] = describe_diffusion(
                DiffusionModel.load(path, device), scfg.study, gamma
            )
    return models


def sweep(scfg: SweepConfig, progress: bool = True) -> list[Path]:
    """Run the sweep of `scfg` on each of its data sets; returns the sweep.md paths."""
    from ..runs import pick_device

    device = pick_device(scfg.study.device)
    say = print if progress else (lambda *a, **k: None)
    return [sweep_data(data, scfg, device, say) for data in scfg.study.data]
