"""What every trainer shares (diffusion, distillation, GAN, VAE): the run folder and its
checkpoints, the loop's bookkeeping (budget, signals, progress, log), and the start of a run.

A run folder holds `model.safetensors` (the weights to sample from), `train_state.safetensors`
(everything an exact `--resume` needs), `train_config.json`, `log.jsonl` and its plots, and
`samples/`. A checkpoint is written beside the last one and renamed over it, so a crash or a
full disk never leaves a half-written file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.utils.data import Dataset

from .checkpoints import CheckpointError, atomic_save, read_metadata
from .data import load_dataset

STATE_FILE = "train_state.safetensors"


MODEL_FILE = "model.safetensors"


WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a full disk as its own error


class TrainingError(RuntimeError):
    """Stops a run with a one-line reason; what was saved before stays as it was."""


class NonFiniteLoss(TrainingError):
    """A watched loss stopped being finite: the run diverged."""


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over the parameters being trained."""
    decay = min(decay, (1 + step) / (10 + step))
    pairs = [
        (e, p) for e, p in zip(ema.parameters(), model.parameters(), strict=True) if p.requires_grad
    ]
    torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1 - decay)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainingError(f"--device must be auto, cpu or cuda (cuda:N), got {name!r}") from None


class Run:
    """The files of a run folder: model (EMA) weights, training state, log and pictures."""

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def model_path(self) -> Path:
        return self.dir / MODEL_FILE

    @property
    def log_path(self) -> Path:
        return self.dir / "log.jsonl"

    def exists(self) -> bool:
        return self.state_path.exists()

    def read_log(self) -> list[dict]:
        """The log's records; a last line without its newline (a write cut short by a kill)
        is not one."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def truncate_log(self, step: int) -> None:
        """On resume, drop log lines written after the checkpoint we continue from (and a
        line cut short by a kill), replacing the log whole."""
        kept = [r for r in self.read_log() if r["step"] <= step]
        write_whole(self.log_path, lambda path: path.write_text("".join(map(log_line, kept))))

    def append_log(self, record: dict) -> None:
        """One write() of the whole line: a kill leaves it whole or a tail `read_log` drops."""
        line = log_line(record).encode()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
        if written < len(line):  # a full disk: the next line must not follow a cut one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.log_path))

    def plot_loss(self) -> None:
        records = [r for r in self.read_log() if "loss" in r]
        if not records:
            return
        steps = [r["step"] for r in records]
        loss = [r["loss"] for r in records]
        k = max(1, len(loss) // 20)
        smooth = [
            sum(loss[max(0, i - k) : i + 1]) / len(loss[max(0, i - k) : i + 1])
            for i in range(len(loss))
        ]
        series = {
            "mean loss between log steps": (steps, loss),
            f"moving average ({k + 1})": (steps, smooth),
        }
        plot_series(self.dir / "loss.png", series, "MSE", log=True)

    def plot_alignment(self) -> None:
        keys = {"one-object prompts": "align_single", "two-object prompts": "align_double"}
        plot_log(self.dir / "alignment.png", self.read_log(), keys, "prompts satisfied", at_least=1)


def log_line(record: dict) -> str:
    return json.dumps(record) + "\n"


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(staged)` beside `path`, then renamed over it: a kill leaves the old file or the
    new one, never part of one (the staged name keeps the suffix, for writers that read it)."""
    staged = path.with_name(f"next_{path.name}")
    write(staged)
    os.replace(staged, path)


def plot_log(
    path: Path, records: list[dict], keys: dict[str, str], ylabel: str, log: bool = False,
    at_least: int = 2,
) -> None:  # fmt: skip
    """Plot, by step, the log `records` that hold the first of `keys` ({label: log key}), when
    there are `at_least` of them."""
    records = [r for r in records if next(iter(keys.values())) in r]
    if len(records) >= at_least:
        steps = [r["step"] for r in records]
        series = {label: (steps, [r.get(key) for r in records]) for label, key in keys.items()}
        plot_series(path, series, ylabel, log)


def plot_series(
    path: Path, series: dict[str, tuple[list, list]], ylabel: str, log: bool, xlabel: str = "step"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, lw=1.5, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_whole(path, fig.savefig)
    plt.close(fig)


def training_state(
    modules: dict[str, dict[str, torch.Tensor]],
    opts: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Weights, optimizer states and RNG states as flat tensors (plus the optimizers' param
    groups as JSON metadata): everything an exact resume needs, in one safetensors file."""
    tensors = {
        f"{prefix}.{k}": v.detach().cpu().contiguous()
        for prefix, state in modules.items()
        for k, v in state.items()
    }
    groups = {}
    for name, opt in opts.items():
        state = opt.state_dict()
        for idx, entry in state["state"].items():
            for key, value in entry.items():
                tensors[f"opt_{name}.{idx}.{key}"] = (
                    torch.as_tensor(value).detach().cpu().contiguous()
                )
        groups[name] = state["param_groups"]
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, g in generators.items():
        tensors[f"rng.{name}"] = g.get_state().cpu()
    return tensors, {"param_groups": json.dumps(groups)}


def restore_training_state(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    opts: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> None:
    """The inverse of `training_state` for optimizers and RNGs (weights: `module_state`)."""
    groups = json.loads(metadata["param_groups"])
    for name, opt in opts.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        prefix = f"opt_{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, field = key[len(prefix) :].split(".", 1)
                state.setdefault(int(idx), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": groups[name]})
        match_param_layouts(opt)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for name, g in generators.items():
        if f"rng.{name}" in tensors:  # a generator added since the run was saved keeps its seed
            g.set_state(tensors[f"rng.{name}"].to(g.get_state().device))


def match_param_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each restored moment its parameter's memory layout (a file holds contiguous
    tensors): the fused AdamW kernels pair elements by memory, not by index, so a
    channels-last weight beside a contiguous moment would be updated with the wrong ones."""
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if (
                    torch.is_tensor(value)
                    and value.shape == p.shape
                    and value.stride() != p.stride()
                ):
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def module_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# what a resuming command may change: the budget, the device and how often to log, save,
# sample and keep; everything that shapes the optimisation continues as it was
RESUME_SETTINGS = (
    "out", "steps", "minutes", "device", "log_every", "sample_every", "checkpoint_every", "keep",
    "workers", "compile",
)  # fmt: skip


def resumed_config(cfg, stored):
    """The stored configuration of a run, with the settings a resuming command may change."""
    return replace(stored, **{k: getattr(cfg, k) for k in RESUME_SETTINGS if hasattr(cfg, k)})


def save_checkpoint(
    run: Run,
    step: int,
    write_model: Callable[[Path], None],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    keep: int = 0,
) -> None:
    """The model to sample from (`write_model(path)`) and the training state, both written
    beside the last checkpoint, then renamed over it: a failed write (a full disk) leaves that
    checkpoint whole. The `keep` copy is made before the renames, so a kill after them never
    leaves the step without it. The model goes first: a kill between the two renames leaves
    the new state staged, for `recover_run` to finish the checkpoint with."""
    staged = {
        run.model_path: run.dir / f"next_{MODEL_FILE}",
        run.state_path: run.dir / f"next_{STATE_FILE}",
    }
    try:
        write_model(staged[run.model_path])
        atomic_save(tensors, staged[run.state_path], metadata)
    except WRITE_ERRORS:
        for partial in run.dir.glob("next_*"):
            with suppress(OSError):
                partial.unlink()
        raise
    keep_checkpoint(run, step, staged, keep)
    for path, written in staged.items():
        os.replace(written, path)


def recover_run(run: Run) -> None:
    """What a kill left half done. Killed between `save_checkpoint`'s two renames, a run has
    the new model beside the old state, the new state whole in its staged file: renamed too,
    the state and the model (the EMA weights a resume reads) are of the same step. Then the
    files a kill left staged (`next_*`, whole or not, and the writer's own temporary files)
    are dropped. Every process of a run
    under torchrun may do it at once: a file another one renamed or dropped first is done."""
    staged_model, staged_state = (run.dir / f"next_{name}" for name in (MODEL_FILE, STATE_FILE))
    with suppress(FileNotFoundError, CheckpointError):
        if staged_state.exists() and run.model_path.exists() and not staged_model.exists():
            steps = {read_metadata(path).get("step") for path in (run.model_path, staged_state)}
            if len(steps) == 1:  # the model renamed is the one this state was staged with
                os.replace(staged_state, run.state_path)
    if not run.exists():  # not (yet) a run folder: its files are not ours to drop
        return
    # safetensors writes through a temporary file of its own (".tmp" and 6 characters)
    leftovers = [p for p in (*run.dir.glob(".tmp*"), *run.dir.glob("*/.tmp*")) if len(p.name) == 10]
    for staged in (*run.dir.glob("next_*"), *run.dir.glob("*/next_*"), *leftovers):
        if staged.is_dir():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.unlink(missing_ok=True)


def keep_checkpoint(run: Run, step: int, files: dict[Path, Path], keep: int) -> None:
    """The checkpoint being saved (`files`: its run folder paths -> the files written), also
    as checkpoints/step_NNNNNN/ (a run folder, as `sample` and `--init` read it), of which
    only the last `keep` stay (0: none)."""
    if keep < 1:
        return
    folder = run.dir / "checkpoints" / f"step_{step:06d}"
    staged = folder.with_name(f"next_{folder.name}")  # a kill leaves no folder half made
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for path, written in files.items():
        try:
            os.link(written, staged / path.name)  # saved files are only replaced, never written
        except OSError:
            shutil.copyfile(written, staged / path.name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staged, folder)
    kept = sorted(folder.parent.glob("step_*"), key=lambda f: int(f.name.removeprefix("step_")))
    for old in kept[:-keep]:
        shutil.rmtree(old)


@contextmanager
def run_folder_errors(run: Run) -> Iterator[None]:
    """A failed write while training (a full disk, a read-only run folder) ends the run with
    one line; the last checkpoint stays as it was."""
    try:
        yield
    except WRITE_ERRORS as e:
        kept = (
            f"its last good checkpoint (step {read_metadata(run.state_path)['step']}) is "
            f"kept in {run.dir}"
            if run.exists()
            else f"nothing was saved in {run.dir}"
        )
        reason = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else e
        raise TrainingError(f"training stopped: {reason}; {kept}") from None


def given_options(options: dict, command: Callable, names: tuple[str, ...]) -> list[str]:
    """The `--options` among `names` that `options` (a command's arguments) set to a value
    other than the command's default."""
    import inspect

    params = inspect.signature(command).parameters
    return [
        "--" + name.replace("_", "-")
        for name in names
        if name in options and name in params and options[name] != params[name].default
    ]


def options_for_model(
    model: str, options: dict, command: Callable, shared: tuple[str, ...], excluded: tuple[str, ...]
) -> dict:
    """`difusion train --model MODEL`: the `shared` options taken from the command's arguments;
    an option among `excluded` set to a value other than its default is an error."""
    given = given_options(options, command, excluded)
    if given:
        raise TrainingError(f"{', '.join(given)}: not an option of --model {model}")
    picked = {k: options[k] for k in shared if k in options}
    picked["out"] = str(picked.get("out", f"runs/{model}"))
    return picked


def check_run_folder(run: Run, resume: bool) -> None:
    """Resume needs a run; a fresh start never overwrites one."""
    recover_run(run)
    if resume and not run.exists():
        raise TrainingError(f"{run.dir}: nothing to resume (no {STATE_FILE})")
    if not resume and run.exists():
        raise TrainingError(
            f"{run.dir} already holds a run: pass --resume to continue it, or choose another --out"
        )


def check_budget(cfg) -> None:
    """Steps, batch size, minutes (when given) and the intervals between log lines, sample
    grids and checkpoints are positive."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise TrainingError("steps and batch size must be positive")
    if cfg.minutes is not None and not cfg.minutes > 0:
        raise TrainingError(f"--minutes must be positive, got {cfg.minutes}")
    for name in ("log_every", "sample_every", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise TrainingError(f"{flag} must be 1 or more, got {getattr(cfg, name)}")


def open_run(
    cfg, resume: bool, stored_config: Callable[[Path], Any], architecture: tuple[str, ...]
) -> tuple[Run, Any]:
    """The run folder checked; on resume the stored `architecture` fields win over `cfg`'s;
    budget and --keep validated."""
    run = Run(cfg.out)
    check_run_folder(run, resume)
    if resume:
        stored = stored_config(run.dir)
        cfg = replace(cfg, **{k: getattr(stored, k) for k in architecture})
    check_budget(cfg)
    if cfg.keep < 0:
        raise TrainingError(f"--keep must be 0 or more, not {cfg.keep}")
    return run, cfg


def start_run(
    cfg, resume: bool, stored_config: Callable[[Path], Any], architecture: tuple[str, ...],
    dataset: Dataset | None,
) -> tuple[Run, Any, torch.device, Dataset]:  # fmt: skip
    """The start the GAN and VAE trainers share: `open_run`, the EMA decay validated; device
    and data."""
    run, cfg = open_run(cfg, resume, stored_config, architecture)
    if not 0 <= cfg.ema_decay < 1:
        raise TrainingError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    device = pick_device(cfg.device)
    if dataset is None:
        dataset = load_dataset(cfg.data, cfg.size)
    return run, cfg, device, dataset


def seeded_generators(
    seed: int, rank: int = 0, noise_device: torch.device | None = None
) -> dict[str, torch.Generator]:
    """The data-order and noise generators of a run (one pair per process)."""
    return {
        "data": torch.Generator().manual_seed(seed * 7919 + rank),
        "noise": torch.Generator(device=noise_device or "cpu").manual_seed(
            seed * 104729 + rank + 1
        ),
    }


def write_run_config(run: Run, cfg) -> None:
    """The run folder, its samples/ folder and train_config.json (what `--resume` reads)."""
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "samples").mkdir(exist_ok=True)
    config = json.dumps(cfg.to_dict(), indent=2)
    write_whole(run.dir / "train_config.json", lambda path: path.write_text(config))


def any_process(wish: bool, device: torch.device) -> bool:
    """Whether any process of the group wishes it (every process gets the same answer)."""
    flag = torch.tensor([float(wish)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
