"""No lost work: a training run killed with SIGKILL at any moment (while it starts, while it
trains, in the middle of writing a checkpoint) leaves only whole files, and `--resume` ends
it with the very weights an uninterrupted run ends with."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_gan import tiny as tiny_gan

from difusion.checkpoints import CheckpointError, read_metadata, read_safetensors
from difusion.data import DigitsDataset
from difusion.gan_train import train_gan
from difusion.runs import Run

STEPS = 60
COMMON = (
    "--data", "digits", "--size", "16", "--batch-size", "8", "--steps", str(STEPS),
    "--checkpoint-every", "5", "--keep", "2", "--sample-every", "100000", "--seed", "0",
    "--device", "cpu",
)  # fmt: skip
MODELS = {
    "unet": ("--channels", "16", "--channel-mult", "1,2", "--attention", "",
             "--layers-per-block", "1"),
    "gan": ("--model", "gan", "--channels", "8"),
}  # fmt: skip
# how each attempt is killed: "startup" at a random time after the launch (imports, resume,
# truncating the log), "training" a random moment after a random checkpoint, "checkpoint"
# while a checkpoint's files are being written
KILLS = ("checkpoint", "startup", "training", "checkpoint")


def launch(out: Path, model: str, resume: bool) -> subprocess.Popen:
    args = ["--out", str(out), *COMMON, *MODELS[model], *(["--resume"] if resume else [])]
    return subprocess.Popen(
        [sys.executable, "-m", "difusion", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def staged(run: Run, since: int) -> list[str]:
    """The files a checkpoint is being written to, made after `since` (time.time_ns(); files
    a kill left are older)."""
    names = []
    for entry in os.scandir(run.dir) if run.dir.exists() else []:
        if not entry.name.startswith(("next_model", "next_train_state")):
            continue
        with suppress(FileNotFoundError):  # renamed since it was listed
            if entry.stat().st_mtime_ns > since:
                names.append(entry.name)
    return sorted(names)


def saved_step(run: Run) -> int:
    try:
        return int(read_metadata(run.state_path)["step"])
    except CheckpointError:  # not there yet
        return 0


def stopped(proc: subprocess.Popen) -> bool:
    """Whether the process is stopped (or gone), from its state in /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in "tTZX"


def kill_in_a_checkpoint(proc: subprocess.Popen, run: Run, rng: random.Random) -> str:
    """Freeze the process at a random moment (0-3 ms) after a checkpoint's first staged file
    shows; kill it if it is still writing (a staged file is there), else let it go on and
    try the next checkpoint."""
    since = time.time_ns()
    while proc.poll() is None:
        if staged(run, since):
            time.sleep(rng.uniform(0, 0.003))
            proc.send_signal(signal.SIGSTOP)
            while not stopped(proc):  # SIGSTOP takes effect a moment after kill() returns
                time.sleep(0.0001)
            caught = staged(run, since)
            if caught:
                proc.kill()
                return f"killed writing step {saved_step(run) + 5}: {caught} staged"
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.0005)
    return "ended before a checkpoint was caught"


def kill_while_training(proc: subprocess.Popen, run: Run, rng: random.Random) -> str:
    start = saved_step(run)
    target = rng.randrange(start + 5, STEPS, 5) if start + 5 < STEPS else STEPS
    delay = rng.uniform(0, 0.1)
    while proc.poll() is None and saved_step(run) < target:
        time.sleep(0.005)
    time.sleep(delay)
    proc.kill()
    return f"killed {delay * 1000:.0f} ms after the checkpoint of step {target}"


def kill_at_startup(proc: subprocess.Popen, rng: random.Random) -> str:
    delay = rng.uniform(1.0, 4.0)
    try:
        proc.wait(delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    return f"killed {delay:.1f} s after its launch"


def check_whole(run: Run) -> None:
    """Every file of the run folder that is not a staged one (`next_*`) is whole: the
    safetensors files read, train_config.json and each line of log.jsonl parse (a kill may
    cut the last line short: `read_log` and the resume's truncation drop it), PNGs decode."""
    for path in sorted(run.dir.rglob("*")):
        staged = path.name.startswith(("next_", ".tmp")) or path.parent.name.startswith("next_")
        if path.is_dir() or staged:
            continue
        if path.suffix == ".safetensors":
            tensors, metadata = read_safetensors(path)
            assert tensors and "step" in metadata, path
        elif path.name == "log.jsonl":
            for line in path.read_text().split("\n")[:-1]:
                assert isinstance(json.loads(line)["step"], int), line
            run.read_log()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        else:
            pytest.fail(f"unexpected file {path}")


@pytest.mark.parametrize("model", MODELS)
def test_sigkill_at_any_moment_loses_nothing(tmp_path, model):
    reference = launch(tmp_path / "reference", model, resume=False)  # meanwhile, on the other core
    run = Run(tmp_path / "killed")
    rng = random.Random(0)
    history = []
    for kill in KILLS:
        proc = launch(run.dir, model, resume=run.model_path.exists() or run.state_path.exists())
        if kill == "checkpoint":
            what = kill_in_a_checkpoint(proc, run, rng)
        elif kill == "training":
            what = kill_while_training(proc, run, rng)
        else:
            what = kill_at_startup(proc, rng)
        _, err = proc.communicate(timeout=120)
        history.append(f"{kill}: {what}, exit {proc.returncode}")
        assert proc.returncode in (0, -signal.SIGKILL), (history, err)
        check_whole(run)
        if proc.returncode == 0:
            break
    print(*history, sep="\n")  # shown by pytest -s
    assert any("staged" in h for h in history), history  # one kill hit a checkpoint write
    if saved_step(run) < STEPS:
        proc = launch(run.dir, model, resume=True)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (history, err)
    _, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err

    check_whole(run)
    assert not [*run.dir.rglob("next_*"), *run.dir.rglob(".tmp*")]  # nothing staged is left
    ref = Run(tmp_path / "reference")
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(ref.dir / name), load_file(run.dir / name)
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (name, differ, history)
    # each line ends with its newline; the steps logged are the uninterrupted run's
    assert run.log_path.read_text().endswith("\n")
    assert [r["step"] for r in run.read_log()] == [r["step"] for r in ref.read_log()]
    kept = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    assert kept == ["step_000055", "step_000060"], history


# ---- the moments too short to hit at random, made to happen ----


def test_a_line_cut_short_is_dropped_and_the_log_stays_whole(tmp_path):
    run = Run(tmp_path)
    for step in (1, 2, 3):
        run.append_log({"step": step, "loss": 0.5})
    with run.log_path.open("a") as f:
        f.write('{"step": 4, "lo')  # a kill in the middle of a line
    assert [r["step"] for r in run.read_log()] == [1, 2, 3]
    run.truncate_log(2)
    assert run.log_path.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.5}\n'
    run.append_log({"step": 3, "loss": 0.25})
    assert [r["step"] for r in run.read_log()] == [1, 2, 3]
    assert not list(tmp_path.glob("next_*"))


@pytest.fixture(scope="module")
def digits16():
    return DigitsDataset(size=16)


class Killed(BaseException):
    """What nothing in the trainer catches: a SIGKILL's end, in process."""


def test_a_kill_between_the_two_renames_of_a_checkpoint_is_recovered(
    monkeypatch, tmp_path, digits16
):
    import difusion.runs

    whole = train_gan(tiny_gan(tmp_path, "whole", steps=6), dataset=digits16, progress=False)
    real_replace = os.replace

    def killed_before_the_state_of_step_4(src, dst):
        if Path(src).name == "next_train_state.safetensors" and read_metadata(src)["step"] == "4":
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(difusion.runs.os, "replace", killed_before_the_state_of_step_4)
    cfg = tiny_gan(tmp_path, "killed", steps=6, checkpoint_every=2)
    with pytest.raises(Killed):
        train_gan(cfg, dataset=digits16, progress=False)
    monkeypatch.undo()
    run = Run(cfg.out)
    # the new model beside the old state: resuming from these would pair step 4's EMA
    # weights with step 2's training state
    assert read_metadata(run.model_path)["step"] == "4"
    assert read_metadata(run.state_path)["step"] == "2"
    assert read_metadata(run.dir / "next_train_state.safetensors")["step"] == "4"
    with open(run.log_path, "a") as f:
        f.write('{"step": 5, "loss_d"')  # and the log cut short, for good measure
    train_gan(tiny_gan(tmp_path, "killed", steps=6), resume=True, dataset=digits16, progress=False)
    a, b = load_file(whole / "model.safetensors"), load_file(run.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in run.read_log()] == list(range(1, 7))
    assert not list(run.dir.glob("next_*"))


def test_a_writers_own_temporary_file_is_dropped_on_recovery(tmp_path):
    from difusion.runs import recover_run

    run = Run(tmp_path / "run")
    run.dir.mkdir()
    save_file({"w": torch.zeros(1)}, run.model_path, {"step": "1"})
    save_file({"w": torch.zeros(1)}, run.state_path, {"step": "1"})
    (run.dir / ".tmpAb3dEf").write_bytes(b"half a file")
    (run.dir / ".tmp-notes-of-the-user").write_text("kept")
    recover_run(run)
    assert sorted(p.name for p in run.dir.iterdir()) == [
        ".tmp-notes-of-the-user", "model.safetensors", "train_state.safetensors"
    ]  # fmt: skip
