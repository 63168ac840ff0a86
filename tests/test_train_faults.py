"""`difusion train` on bad input, stopped early or interrupted: one-line errors, and every
stop leaves a model, a training state and a log that end at the same step."""

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from data_util import NaNImages
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_cli import ok, run_cli
from test_gan import tiny as tiny_gan
from test_latent import tiny_vae
from test_train import tiny

from difusion.checkpoints import read_metadata
from difusion.data import DigitsDataset, load_dataset
from difusion.gan_train import train_gan
from difusion.model import DiffusionModel, resolve_checkpoint
from difusion.nn.gan import GAN
from difusion.runs import Run, TrainingError
from difusion.train import train
from difusion.vae_train import load_vae, train_vae

# the options of test_train.tiny, on the command line
TINY_CLI = (
    "--size", "8", "--batch-size", "4", "--channels", "16", "--channel-mult", "1,2",
    "--attention", "4", "--layers-per-block", "1", "--sample-every", "100000",
)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose much (20 s for a preview
    instead of 0.1) when another job holds the other core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits8():
    return DigitsDataset(size=8)


def state_step(run: Run) -> int:
    return int(read_metadata(run.state_path)["step"])


def model_step(run: Run) -> int:
    return int(read_metadata(run.model_path)["step"])


def logged_steps(run: Run) -> list[int]:
    return [r["step"] for r in run.read_log() if "loss" in r]


@pytest.mark.parametrize("encoder", ["scratch", "minilm"])
def test_text_condition_on_a_folder_without_captions(monkeypatch, capsys, tmp_path, encoder):
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    args = ("--data", folder, "--cond", "text", "--text-encoder", encoder, "--out", out)
    code, _, err = run_cli(monkeypatch, capsys, "train", *args, *TINY_CLI, "--steps", "2")
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: --cond text needs captioned data; '{folder}' has no captions"
    ]
    assert not out.exists()


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_non_positive_minutes_is_refused(monkeypatch, capsys, tmp_path, digits8, minutes):
    out = tmp_path / "run"
    args = ("--data", "digits", "--out", out, "--minutes", minutes, *TINY_CLI)
    code, stdout, err = run_cli(monkeypatch, capsys, "train", *args)
    assert "EMA weights" not in stdout and len(err.strip().splitlines()) == 1
    if minutes == "0":
        assert code == 1 and err.strip() == "error: --minutes must be positive, got 0.0"
    else:  # a negative number, to any option: a usage error
        assert code == 2 and "'--minutes': must be 0 or more, got -1" in err
    assert not out.exists()
    with pytest.raises(TrainingError, match="--minutes must be positive"):
        train(tiny(tmp_path, minutes=float(minutes)), dataset=digits8, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    "option, message",
    [
        ("two_object_prob=abc", "option two_object_prob must be float, got 'abc'"),
        ("paraphrase=3", "option paraphrase must be bool, got 3"),
        ("length=2.5", "option length must be int, got 2.5"),
        ("colour=1", "has no option colour"),
    ],
)
def test_data_option_of_a_wrong_type_is_a_one_line_error(
    monkeypatch, capsys, tmp_path, option, message
):
    args = ("--data", "shapes", "--data-option", option, "--out", tmp_path / "r", "--steps", "1")
    tiny_shapes = [a if a != "8" else "16" for a in TINY_CLI]  # shapes: 16 px at least
    code, _, err = run_cli(monkeypatch, capsys, "train", *args, *tiny_shapes)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: data set 'shapes'") and message in err


def test_data_options_are_checked_against_every_data_sets_signature(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for name, options, message in [
        ("digits", {"size": "16"}, "option size must be int, got '16'"),
        ("mnist", {"root": 3}, "option root must be str | pathlib.Path | None, got 3"),
        (tmp_path, {"background": [1, 2]}, "must be tuple[int, int, int], got [1, 2]"),
        (tmp_path, {"cache": "yes"}, "option cache must be bool | None, got 'yes'"),
    ]:
        with pytest.raises(ValueError, match="^data set .*" + re.escape(message)):
            load_dataset(name, **options)
    # JSON has no tuples, and a whole number is a float
    assert load_dataset(tmp_path, size=8, background=[0, 0, 0]).background == (0, 0, 0)
    assert load_dataset("shapes", length=4, two_object_prob=1).two_object_prob == 1.0


def test_a_run_stopped_by_its_minutes_logs_and_plots_its_last_step(tmp_path, digits8):
    cfg = tiny(tmp_path, steps=10**6, minutes=0.03, log_every=25, checkpoint_every=1000)
    run = Run(train(cfg, dataset=digits8, progress=False))
    step = state_step(run)
    assert 0 < step < 10**6 and model_step(run) == step
    assert logged_steps(run)[-1] == step
    assert (run.dir / "loss.png").is_file()


@contextmanager
def sigint_raises_keyboard_interrupt():
    """SIGINT as in a terminal, also where the tests run with it ignored (in background)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigint_saves_the_step_it_stops_at_and_logs_it(tmp_path, digits8):
    def interrupt_at_3(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = tiny(tmp_path, steps=20, log_every=25, checkpoint_every=10)
    with sigint_raises_keyboard_interrupt():
        with pytest.raises(KeyboardInterrupt):
            train(cfg, dataset=digits8, progress=False, on_step=interrupt_at_3)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    run = Run(cfg.out)
    assert state_step(run) == model_step(run) == 3
    assert logged_steps(run) == [3] and (run.dir / "loss.png").is_file()
    train(tiny(tmp_path, steps=5), resume=True, dataset=digits8, progress=False)
    assert state_step(run) == 5 and logged_steps(run) == [3, 4, 5]


def start_cli(*args) -> subprocess.Popen:
    def default_sigint():  # a background shell starts its jobs with SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-m", "difusion.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as `one_thread`
    )


def wait_for(path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before {path.name} was written: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path.name} after {seconds} s")
        time.sleep(0.05)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_resume_continues_from_it(
    monkeypatch, capsys, tmp_path, sig, status
):
    run = Run(tmp_path / "run")
    args = ("--data", "digits", "--out", run.dir, "--steps", "100000", "--checkpoint-every", "2")
    proc = start_cli("train", *args, *TINY_CLI)
    wait_for(run.state_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    step = state_step(run)
    assert step >= 2 and model_step(run) == step and logged_steps(run)[-1] == step
    name = signal.Signals(sig).name
    assert f"{name}: stopped at step {step}; model and training state saved in {run.dir}" in err
    assert "Traceback" not in err
    again = ("train", "--out", run.dir, "--resume", "--steps", step + 2)
    assert f"steps {step}->{step + 2}" in ok(monkeypatch, capsys, *again)
    assert state_step(run) == step + 2 and logged_steps(run)[-1] == step + 2


def test_minutes_cover_the_layout_map_pre_fit(tmp_path):
    shapes = dict(data="shapes", size=16, cond="text", text_encoder="scratch", layout_map=True,
                  attention_resolutions=(8,))  # fmt: skip
    cfg = tiny(tmp_path, steps=10**6, minutes=0.02, layout_steps=5000, log_every=25, **shapes)
    run = Run(train(cfg, progress=False))
    fitted = [r["layout_step"] for r in run.read_log() if "layout_loss" in r]
    assert 0 < fitted[-1] < 5000  # the pre-fit stopped with the budget
    # the main loop got what was left (nothing): its state is saved at step 0, and resumes
    assert state_step(run) == model_step(run) == 0 and logged_steps(run) == []
    train(tiny(tmp_path, steps=2), resume=True, progress=False)
    assert state_step(run) == 2 and logged_steps(run) == [1, 2]
    assert [r["layout_step"] for r in run.read_log() if "layout_loss" in r] == fitted


def test_a_diverging_layout_map_pre_fit_names_its_steps_and_saves_nothing(tmp_path):
    """The pre-fit reads its loss only at log lines: a NaN stops it there, with the steps."""
    shapes = dict(data="shapes", size=16, cond="text", text_encoder="scratch", layout_map=True,
                  attention_resolutions=(8,))  # fmt: skip
    cfg = tiny(tmp_path, steps=2, layout_steps=7, log_every=3, **shapes)
    data = NaNImages(load_dataset("shapes", size=16, length=64))
    with pytest.raises(TrainingError, match=r"layout map's loss became nan within steps 1-3$"):
        train(cfg, dataset=data, progress=False)
    assert not Run(cfg.out).state_path.exists()


def test_keep_holds_the_last_checkpoints_as_run_folders(monkeypatch, capsys, tmp_path, digits8):
    def kept(run: Run) -> list[str]:
        return sorted(p.name for p in (run.dir / "checkpoints").iterdir())

    cfg = tiny(tmp_path, steps=7, checkpoint_every=2, keep=2)
    run = Run(train(cfg, dataset=digits8, progress=False))
    assert kept(run) == ["step_000006", "step_000007"]
    for name in kept(run):
        folder = Run(run.dir / "checkpoints" / name)
        assert state_step(folder) == model_step(folder) == int(name[5:])
        DiffusionModel.load(resolve_checkpoint(folder.dir))  # a run folder, as `sample` reads
    # like --checkpoint-every, --keep is the resuming command's
    again = tiny(tmp_path, steps=9, checkpoint_every=2, keep=1)
    train(again, resume=True, dataset=digits8, progress=False)
    assert kept(run) == ["step_000009"]
    plain = Run(train(tiny(tmp_path, "plain", steps=2), dataset=digits8, progress=False))
    assert not (plain.dir / "checkpoints").exists()
    for args, message in [
        (("--keep", "-1"), "'--keep': must be 0 or more, got -1"),
        (("--keep", "-1", "--model", "gan"), "'--keep': must be 0 or more, got -1"),
        (("--keep", "-1", "--model", "vae"), "'--keep': must be 0 or more, got -1"),
    ]:  # a usage error of every number option (exit status 2)
        code, _, err = run_cli(monkeypatch, capsys, "train", "--out", tmp_path / "bad", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(monkeypatch, tmp_path, digits8):
    import difusion.checkpoints

    real_save_file = difusion.checkpoints.save_file

    def disk_full_at_step_4(tensors, path, metadata=None):
        if "next_train_state" in path and metadata["step"] == "4":
            Path(path).write_bytes(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(difusion.checkpoints, "save_file", disk_full_at_step_4)
    cfg = tiny(tmp_path, steps=6, checkpoint_every=2, keep=1)
    with pytest.raises(TrainingError) as error:
        train(cfg, dataset=digits8, progress=False)
    assert str(error.value) == (
        "training stopped: Error while serializing: I/O error: No space left on device; "
        f"its last good checkpoint (step 2) is kept in {cfg.out}"
    )
    run = Run(cfg.out)
    # the model file written for step 4 did not replace step 2's; no partial file is left
    assert state_step(run) == model_step(run) == 2
    assert [p.name for p in run.dir.iterdir() if p.name.startswith("next_")] == []
    assert [p.name for p in (run.dir / "checkpoints").iterdir()] == ["step_000002"]
    monkeypatch.undo()
    train(tiny(tmp_path, steps=6), resume=True, dataset=digits8, progress=False)
    assert state_step(run) == 6 and logged_steps(run) == [1, 2, 3, 4, 5, 6]


def read_only_stops_writes(folder: Path) -> bool:
    """Whether this process is kept out of a read-only folder (root is not, unless it runs
    without CAP_DAC_OVERRIDE: `setpriv --bounding-set=-dac_override --inh-caps=-dac_override`)."""
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
        return False
    except PermissionError:
        return True
    finally:
        folder.chmod(0o755)


def test_a_read_only_run_folder_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, digits8):
    if not read_only_stops_writes(tmp_path / "probe"):
        pytest.skip(
            "root writes to read-only folders: run as another user, or under setpriv --bounding-set=-dac_override --inh-caps=-dac_override"
        )
    cfg = tiny(tmp_path, steps=6, checkpoint_every=3)

    def read_only_after_checkpoint_3(step, loss):
        if step == 4:
            os.chmod(cfg.out, 0o555)

    kept = r"^training stopped: .*Permission denied.*; its last good checkpoint \(step 3\) is kept"
    try:
        with pytest.raises(TrainingError, match=kept):
            train(cfg, dataset=digits8, progress=False, on_step=read_only_after_checkpoint_3)
    finally:
        os.chmod(cfg.out, 0o755)
    run = Run(cfg.out)
    assert state_step(run) == model_step(run) == 3


# ---- the GAN and VAE trainers: the same checkpoints, signals and failed writes ----

TRAINERS = {"gan": (train_gan, tiny_gan, GAN.load), "vae": (train_vae, tiny_vae, load_vae)}


@pytest.fixture(scope="module")
def digits16():
    return DigitsDataset(size=16)


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.mark.parametrize("model", TRAINERS)
def test_sigterm_saves_a_gan_or_vae_run_that_resumes_exactly(tmp_path, digits16, model):
    train_fn, config, _ = TRAINERS[model]
    whole = Run(train_fn(config(tmp_path, "whole", steps=6), dataset=digits16, progress=False))

    def terminate_at_4(step, record):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = config(tmp_path, "stopped", steps=6, log_every=3, checkpoint_every=3)
    with pytest.raises(SystemExit) as stop:
        train_fn(cfg, dataset=digits16, progress=False, on_step=terminate_at_4)
    assert stop.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    run = Run(cfg.out)
    assert state_step(run) == model_step(run) == 4
    assert [r["step"] for r in run.read_log()] == [3, 4]  # the step it stopped at is logged
    train_fn(config(tmp_path, "stopped", steps=6), resume=True, dataset=digits16, progress=False)
    assert state_step(run) == 6 and [r["step"] for r in run.read_log()] == [3, 4, 5, 6]
    a, b = weights(whole.model_path), weights(run.model_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model", TRAINERS)
def test_keep_holds_the_last_gan_or_vae_checkpoints(monkeypatch, capsys, tmp_path, digits16, model):
    train_fn, config, load = TRAINERS[model]
    cfg = config(tmp_path, steps=7, checkpoint_every=2, keep=2)
    run = Run(train_fn(cfg, dataset=digits16, progress=False))
    kept = run.dir / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step_000006", "step_000007"]
    for name in ("step_000006", "step_000007"):
        folder = Run(kept / name)
        assert state_step(folder) == model_step(folder) == int(name[5:])
        load(folder.model_path)
    last, now = weights(kept / "step_000007" / "model.safetensors"), weights(run.model_path)
    assert all(torch.equal(last[k], now[k]) for k in now)
    # the resuming command's --keep, as for a diffusion run
    again = config(tmp_path, steps=9, checkpoint_every=2, keep=1)
    train_fn(again, resume=True, dataset=digits16, progress=False)
    assert [p.name for p in kept.iterdir()] == ["step_000009"]
    out = tmp_path / "cli"
    options = ["--size", "16", "--channels", "8", "--batch-size", "4", "--steps", "3"]
    if model == "vae":
        options += ["--channel-mult", "1,1", "--layers-per-block", "1"]
    args = ("--model", model, "--out", out, "--checkpoint-every", "2", "--keep", "1")
    ok(monkeypatch, capsys, "train", *args, *options)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"]


@pytest.mark.parametrize("model", TRAINERS)
def test_a_full_disk_stops_a_gan_or_vae_run_and_keeps_its_last_checkpoint(
    monkeypatch, tmp_path, digits16, model
):
    import difusion.checkpoints

    train_fn, config, _ = TRAINERS[model]
    real_save_file = difusion.checkpoints.save_file

    def disk_full_at_step_4(tensors, path, metadata=None):
        if "next_train_state" in path and metadata["step"] == "4":
            Path(path).write_bytes(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(difusion.checkpoints, "save_file", disk_full_at_step_4)
    cfg = config(tmp_path, steps=6, checkpoint_every=2)
    with pytest.raises(TrainingError) as error:
        train_fn(cfg, dataset=digits16, progress=False)
    assert str(error.value) == (
        "training stopped: Error while serializing: I/O error: No space left on device; "
        f"its last good checkpoint (step 2) is kept in {cfg.out}"
    )
    run = Run(cfg.out)
    assert state_step(run) == model_step(run) == 2
    assert [p.name for p in run.dir.iterdir() if p.name.startswith("next_")] == []
