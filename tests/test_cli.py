import sys
from pathlib import Path

import pytest
from PIL import Image

from difusion.cli import main
from difusion.data import DigitsDataset
from difusion.train import TrainConfig, train


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["difusion", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def ok(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["difusion", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    cfg = TrainConfig(
        out=str(out), size=8, steps=2, batch_size=4, channels=16, channel_mult=(1, 2),
        attention_resolutions=(4,), layers_per_block=1, head_dim=16, cond="label",
    )  # fmt: skip
    return train(cfg, dataset=DigitsDataset(size=8), progress=False)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_noise_strip_from_any_image(monkeypatch, capsys, tmp_path, mode):
    src = tmp_path / f"in_{mode}.png"
    Image.new(mode, (50, 37), 120).save(src)
    out = tmp_path / "strip.png"
    ok(monkeypatch, capsys, "noise", src, "--steps", "0,500,999", "--size", "32", "-o", out)
    strip = Image.open(out)
    assert strip.width > 3 * 32 * 3  # three upscaled panels side by side


def test_sample_grid_and_gif(monkeypatch, capsys, tmp_path, run_dir):
    png, gif = tmp_path / "g.png", tmp_path / "t.gif"
    text = ok(
        monkeypatch,
        capsys,
        "sample",
        run_dir,
        "-n",
        "4",
        "--steps",
        "3",
        "--label",
        "7",
        "--guidance",
        "3",
        "-o",
        png,
        "--gif",
        gif,
    )
    assert "wrote" in text
    assert Image.open(png).size[0] > 8
    animation = Image.open(gif)
    assert animation.n_frames == 4  # three steps and the final image


def test_sample_is_deterministic_for_a_seed(monkeypatch, capsys, tmp_path, run_dir):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    ok(monkeypatch, capsys, "sample", run_dir, "-n", "2", "--steps", "2", "--seed", "3", "-o", a)
    ok(monkeypatch, capsys, "sample", run_dir, "-n", "2", "--steps", "2", "--seed", "3", "-o", b)
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "/nonexistent"], "no such checkpoint"),
        (["sample", "{run}", "--sampler", "plms"], "unknown sampler"),
        (["sample", "{run}", "--label", "12"], "label must be between 0 and 9"),
        (["sample", "{run}", "-n", "0"], "-n must be between"),
        (["sample", "{run}", "-o", "{tmp}/x.txt"], "must end in .png"),
        (["sample", "{run}", "--spacing", "odd"], "unknown timestep spacing"),
        (["noise", "{tmp}/missing.png"], "no such file"),
        (["noise", "{tmp}/bad.png"], "not a readable image"),
        (["noise", "{tmp}/bad.png", "--steps", "0,1000"], "--steps must lie in 0..999"),
        (["noise", "{tmp}/bad.png", "--schedule", "quadratic"], "unknown schedule"),
        (["train", "--data", "nowhere", "--out", "{tmp}/r"], "unknown data set"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/r"], "no readable image"),
        (["train", "--out", "{run}"], "already holds a run"),
        (["train", "--out", "{tmp}/none", "--resume"], "nothing to resume"),
        (["train", "--cond", "pixels", "--out", "{tmp}/r"], "--cond must be"),
        (["train", "--prediction", "score", "--out", "{tmp}/r"], "--prediction must be"),
        (["train", "--precision", "fp16", "--device", "cpu", "--out", "{tmp}/r", "--size", "8"], "fp16 training needs a CUDA device"),
        (["train", "--init", "{run}", "--channels", "32", "--cond", "text", "--out", "{tmp}/r"], "--channels, --cond: --init keeps the model's own"),
        (["train", "--init", "{tmp}/none", "--out", "{tmp}/r"], "--init: {tmp}/none: no such checkpoint"),
        (["train", "--data-option", "two_object_prob", "--out", "{tmp}/r"], "--data-option must be KEY=VALUE"),
        (["train", "--data-option", "colour=red", "--out", "{tmp}/r"], "has no option colour"),
        (["train", "--model", "gan", "--init", "{run}", "--out", "{tmp}/r"], "--init: not an option of --model gan"),
        (["train", "--init", "{run}", "--layout-map", "--out", "{tmp}/r"], "--layout-map is for text-conditioned models"),
        (["train", "--model", "vae", "--layout-map", "--out", "{tmp}/r"], "--layout-map: not an option of --model vae"),
        (["train", "--layout-steps", "-1", "--out", "{tmp}/r"], "'--layout-steps': must be 0 or more, got -1"),
        (["train", "--log-every", "0", "--out", "{tmp}/r"], "--log-every must be 1 or more, got 0"),
        (["train", "--sample-every", "0", "--out", "{tmp}/r"], "--sample-every must be 1 or more, got 0"),
        (["train", "--model", "gan", "--checkpoint-every", "0", "--out", "{tmp}/r"], "--checkpoint-every must be 1 or more, got 0"),
        (["distill", "{run}", "--log-every", "-2", "--out", "{tmp}/r"], "'--log-every': must be 0 or more, got -2"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_nonzero(monkeypatch, capsys, tmp_path, run_dir, args, message):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    args = [a.format(run=run_dir, tmp=tmp_path) for a in args]
    message = message.format(tmp=tmp_path)
    if "{tmp}/bad.png" in " ".join(args) and "noise" in args and "--steps" in args:
        Image.new("RGB", (8, 8)).save(tmp_path / "bad.png")
    if "--schedule" in args:
        Image.new("RGB", (8, 8)).save(tmp_path / "bad.png")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_usage_errors_exit_nonzero(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--steps", "abc")
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize("command", ["noise", "train", "sample"])
def test_help(monkeypatch, capsys, command):
    code, out, _ = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0 and "Usage" in out


def test_python_dash_m_difusion_is_the_command():
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "difusion", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "Usage: python -m difusion" in out and "serve" in out and "distill" in out


@pytest.mark.parametrize("model", ["unet", "gan"])
def test_log_every_sets_the_log_lines(monkeypatch, capsys, tmp_path, model):
    import json

    out = tmp_path / "r"
    arch = ["--channels", "16", "--channel-mult", "1,2", "--attention", "4"]
    arch += ["--layers-per-block", "1"] if model == "unet" else []
    ok(monkeypatch, capsys, "train", "--data", "digits", "--size", "8", "--steps", "6",
       "--batch-size", "2", "--log-every", "2", "--model", model, "--out", out,
       *(arch if model == "unet" else ["--channels", "16"]))  # fmt: skip
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "steps_per_s" in r] == [2, 4, 6]


def one_line_error(monkeypatch, capsys, *args) -> str:
    code, _, err = run_cli(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code not in (0, None) and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_generate_refuses_a_size_the_model_does_not_make(monkeypatch, capsys, tmp_path, run_dir):
    out = tmp_path / "g.png"
    for size in (["--height", "16", "--width", "16"], ["--width", "4096"]):
        line = one_line_error(monkeypatch, capsys, "generate", "7", "--model", run_dir, *size,
                              "-o", out)  # fmt: skip
        assert "this model makes 8x8" in line and not out.exists()


def test_generate_resizes_an_image_of_another_size_and_says_so(
    monkeypatch, capsys, tmp_path, run_dir
):
    Image.new("RGB", (20, 15), (200, 10, 10)).save(tmp_path / "start.png")
    monkeypatch.setattr(sys, "argv", ["difusion", "generate", "7", "--model", str(run_dir), "-n",
                        "1", "--steps", "2", "--image", str(tmp_path / "start.png"),
                        "-o", str(tmp_path / "g.png")])  # fmt: skip
    with pytest.warns(UserWarning, match="--image is 20x15, a size this model makes 8x8: it is "
                      "resized to 8x8"), pytest.raises(SystemExit) as exit_info:  # fmt: skip
        main()
    assert exit_info.value.code == 0
    assert Image.open(tmp_path / "g.png").size[0] >= 8


def test_train_refuses_a_size_no_memory_holds(monkeypatch, capsys, tmp_path):
    line = one_line_error(monkeypatch, capsys, "train", "--size", "100000", "--out", tmp_path / "r")
    assert "--size 100000: a batch of 64 needs at least" in line and "GiB free" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", ["-o", "--gif"])
def test_sample_checks_where_it_writes_before_sampling(monkeypatch, capsys, tmp_path, run_dir,
                                                       flag):  # fmt: skip
    import os

    (tmp_path / "a_file").write_text("")
    name = "x.gif" if flag == "--gif" else "x.png"
    places = {tmp_path / "a.png" if flag == "-o" else tmp_path / "a.gif": "is a folder",
              tmp_path / "a_file" / name: "a_file is a file, not a folder"}  # fmt: skip
    (tmp_path / "a.png").mkdir()
    (tmp_path / "a.gif").mkdir()
    if os.geteuid() != 0:  # root writes through permissions: a read-only place is /sys then
        (tmp_path / "ro").mkdir(mode=0o555)
        places[tmp_path / "ro" / "new" / name] = "cannot write in"
    else:
        places[Path("/sys") / "new" / name] = "cannot write in /sys"
    for path, message in places.items():
        line = one_line_error(monkeypatch, capsys, "sample", run_dir, "-n", "1", flag, path)
        assert message in line, line


def test_attention_at_a_level_the_unet_lacks_is_refused(monkeypatch, capsys, tmp_path):
    line = one_line_error(monkeypatch, capsys, "train", "--size", "8", "--channel-mult", "1,2",
                          "--attention", "7", "--out", tmp_path / "r")  # fmt: skip
    assert "--attention 7: no level of this U-Net has that resolution; its levels are 8, 4" in line


def test_resume_refuses_what_contradicts_the_run(monkeypatch, capsys, tmp_path, run_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for args, message in [
        (["--data", "fashion"], "--data fashion: the run in {run} was made with digits"),
        (["--steps", "3", "--channels", "32"], "--channels 32: the run in {run} was made with 16"),
        (["--steps", "1"], "the run in {run} is at step 2: --steps 1 leaves nothing to train"),
    ]:
        line = one_line_error(monkeypatch, capsys, "train", "--out", run, "--resume", *args)
        assert message.format(run=run) in line, line
    # what may change is taken; the rest comes from the run
    text = ok(monkeypatch, capsys, "train", "--out", run, "--resume", "--steps", "3",
              "--sample-every", "1000")  # fmt: skip
    assert "steps 2->3" in text and "stopped at step 3" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "{run}", "--steps", "0"], "--steps must be from 1 to 1000, got 0"),
        (["sample", "{run}", "--eta", "1.5"], "--eta must be from 0 (deterministic) to 1"),
        (["generate", "7", "--model", "{run}", "--steps", "0"], "--steps must be from 1 to 1000"),
        (["eval", "{run}", "--steps", "0"], "--steps must be from 1 to 1000"),
        (["train", "--steps", "0", "--out", "{tmp}/r"], "--steps and --batch-size must be positive"),
        (["train", "--text-encoder-path", "{tmp}", "--out", "{tmp}/r"], "--text-encoder-path is the folder of --text-encoder clip"),
        (["eval", "{run}", "--wording", "synonyms"], "--wording: only with --alignment"),
        (["train", "--device", "tpu9", "--out", "{tmp}/r"], "--device must be auto, cpu or cuda"),
    ],
)  # fmt: skip
def test_numbers_and_options_are_refused_alike(monkeypatch, capsys, tmp_path, run_dir, args,
                                               message):  # fmt: skip
    args = [a.format(run=run_dir, tmp=tmp_path) for a in args]
    assert message in one_line_error(monkeypatch, capsys, *args)
