import json
import os
import re
import subprocess
import sys

import pytest
import torch
from cli_util import cli
from data_util import NaNImages

from difusion.compare import (
    COLLAPSE_RULE,
    CompareConfig,
    collapsed,
    comparison_rows,
    crossing_point,
    describe_race,
    late_fluctuation,
    parse_budgets,
    spread,
    training_seconds,
    write_report,
)
from difusion.compare.sweep_report import crossing_label, summarize, write_sweep_report


def fake_run(kind, seed, fid, coverage=(10, 10, 10), diverged=False):
    curve = [
        {"step": 100 * (i + 1), "seconds": 60.0 * (i + 1), "fid": fid + 10 * (2 - i) + seed,
         "precision": 0.5, "recall": 0.4, "classes_covered": c, "num_classes": 10,
         "real_classes_covered": 10, "class_kl": 0.1}
        for i, c in enumerate(coverage)
    ]  # fmt: skip
    final = {
        "fid": fid + seed, "kid_mean": 0.01 * (1 + seed), "kid_std": 0.001, "precision": 0.6,
        "recall": 0.5 - 0.1 * seed, "n": 500, "feature_net": "classifier:digits",
        "classes_covered": coverage[-1], "num_classes": 10, "real_classes_covered": 10,
        "class_kl": 0.05,
    }  # fmt: skip
    return {
        "seed": seed, "kind": kind, "steps": 1000 + seed, "train_seconds": 180.0,
        "diverged": diverged, "error": "loss became nan at step 7" if diverged else None,
        "snapshots": [], "has_model": True, "final": final,
        "inception": {"fid": 40.0 + seed, "n": 500}, "curve": curve,
        "collapsed": collapsed(final, curve),
    }  # fmt: skip


def synthetic_results():
    speed = {"gan": {"mean": 20000.0, "std": 500.0, "batch": 64, "repeats": 3}}
    for name in ("ddpm-1000", "ddim-50", "dpmpp_2m-20", "dpmpp_2m-10"):
        speed[name] = {"mean": 1000 / int(name.split("-")[1]), "std": 0.1, "batch": 64,
                       "repeats": 2 if name == "ddpm-1000" else 3}  # fmt: skip
    entry = {
        "info": {"size": 16, "channels": 1, "images": 1797, "real_images": 500,
                 "feature_net": "classifier:digits", "feature_net_note": "shipped",
                 "inception_net": "inception-v3-fid"},
        "runs": {
            "gan": [fake_run("gan", s, 30.0, coverage=(6, 9, 4)) for s in range(2)],
            "diffusion": [fake_run("diffusion", s, 20.0) for s in range(2)],
        },
        "models": {"gan": {"params": 337280, "params_d": 134400, "description": "DCGAN"},
                   "diffusion": {"params": 1_110_000, "description": "U-Net"}},
        "speed": speed,
        "steps_curve": {"n": 200, "feature_net": "classifier:digits", "gan_fid": 31.0,
                        "samplers": {"ddim": [{"steps": 10, "fid": 25.0}, {"steps": 50, "fid": 21.0}],
                                     "dpmpp_2m": [{"steps": 5, "fid": 24.0}, {"steps": 20, "fid": 20.5}]}},
    }  # fmt: skip
    cfg = CompareConfig(data=("digits",), seeds=2, samples=500, inception=True).to_dict()
    env = {"device": "cpu", "threads": 2, "torch": "2.x", "seconds": 3600.0}
    return {"config": cfg, "environment": env, "datasets": {"digits": entry}}


def test_report_from_synthetic_numbers(tmp_path):
    results = synthetic_results()
    path = write_report(results, tmp_path)
    text = path.read_text()
    for plot in ("digits/curves.png", "digits/steps.png"):
        assert (tmp_path / plot).is_file() and plot in text
    assert "5 minutes" in text and "2 seeds" in text and "500 samples a model" in text
    assert COLLAPSE_RULE in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "**" not in line]
    table = [r for r in rows if r.count("|") == 4 and r.split("|")[1].strip()]
    assert len(table) >= 14
    labels = [r.split("|")[1].strip() for r in table]
    for wanted in ("FID ↓", "KID ×10³ ↓", "precision ↑", "recall ↑", "Inception FID ↓"):
        assert wanted in labels
    assert any(label.startswith("classes covered") for label in labels)
    assert any("DDPM, 1000 steps" in label for label in labels)
    for row in table:  # every cell a number with its spread (or a count of runs)
        for cell in row.split("|")[2:4]:
            assert re.search(r"\d", cell), row
            assert "±" in cell or " of " in cell or " – " in cell, row
    fid_row = next(r for r in table if r.startswith("| FID ↓"))
    assert "classifier:digits, n=500" in fid_row and "2 seeds" in fid_row
    assert "30.5 ± 0.707" in fid_row and "20.5 ± 0.707" in fid_row
    assert "| 30.0 – 31.0 (classifier:digits, n=500; 2 seeds) |" in text
    assert "inception-v3-fid, n=500" in text
    collapse_row = next(r for r in table if "collapsed" in r)
    assert "| 2 of 2" in collapse_row and "| 0 of 2" in collapse_row  # GAN coverage 9 -> 4
    speed_row = next(r for r in table if "DDPM, 1000 steps" in r)
    assert "20,000 ± 500" in speed_row and "1.00 ± 0.100" in speed_row
    assert "| DDIM | 10: 25.0, 50: 21.0 |" in text
    assert "The whole study took 60.0 minutes." in text
    results["environment"].update(seconds=4200.0, starts_seconds=[3600.0, 600.0])
    text = write_report(results, tmp_path).read_text()
    assert "took 70.0 minutes (60.0 + 10.0 over 2 starts;" in text


def test_rows_helpers():
    assert spread([1.0, 3.0]) == "2.00 ± 1.41"
    assert spread([5.0]) == "5.00 ± n/a"
    assert spread([None, float("nan")]) == "n/a"
    run = {"train_seconds": 100.0, "curve": [{"seconds": s, "fid": f} for s, f in
                                             [(20, 50.0), (60, 10.0), (100, 12.0)]]}  # fmt: skip
    assert late_fluctuation(run) == pytest.approx(2**0.5)
    assert late_fluctuation({"train_seconds": 100.0, "curve": []}) is None
    final = {"classes_covered": 9, "real_classes_covered": 10, "num_classes": 10}
    assert collapsed(final, [{"classes_covered": 10}]) is False
    assert collapsed({**final, "classes_covered": 4}, []) is True
    assert collapsed({**final, "classes_covered": 7}, [{"classes_covered": 10}]) is True
    assert collapsed({"fid": 1.0}, []) is None
    entry = synthetic_results()["datasets"]["digits"]
    entry["runs"]["gan"][0]["diverged"] = True
    rows = comparison_rows(entry, synthetic_results()["config"])
    assert ("runs diverged (non-finite loss)", "1 of 2", "0 of 2") in rows


@pytest.mark.parametrize(
    "args, message",
    [
        (("--seeds", "0"), "--seeds must be at least 1"),
        (("--budget-minutes", "0"), "--budget-minutes must be positive"),
        (("--preset", "huge"), "unknown preset"),
        (("--samples", "2"), "samples must be at least 8"),
    ],
)
def test_compare_errors_are_one_line(monkeypatch, capsys, tmp_path, args, message):
    code, _, err = cli(monkeypatch, capsys, "compare", "--out", tmp_path / "c", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_compare_end_to_end_on_digits(monkeypatch, capsys, tmp_path):
    out = tmp_path / "study"
    args = ("compare", "--data", "digits", "--budget-minutes", "0.05", "--seeds", "1",
            "--out", out, "--preset", "tiny", "--samples", "16", "--curve-points", "2",
            "--curve-samples", "16", "--steps-samples", "16", "--speed-batch", "4",
            "--speed-repeats", "1", "--inception-samples", "16")  # fmt: skip
    code, stdout, err = cli(monkeypatch, capsys, *args, "--no-inception")
    assert code == 0, err
    report = (out / "report.md").read_text()
    for name in ("curves.png", "steps.png", "samples.png"):
        assert (out / "digits" / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    entry = results["datasets"]["digits"]
    for kind in ("gan", "diffusion"):
        (run,) = entry["runs"][kind]
        assert run["steps"] > 0 and not run["diverged"] and run["final"]["n"] == 16
        assert len(run["curve"]) >= 2  # snapshots along training and the end
        assert (out / "digits" / "seed0" / kind / "model.safetensors").is_file()
    assert set(entry["speed"]) == {"gan", "ddpm-1000", "ddim-50", "dpmpp_2m-20", "dpmpp_2m-10"}
    assert entry["steps_curve"]["samplers"]["dpmpp_2m"][0]["steps"] == 2
    assert "## digits" in report and "| FID ↓ |" in report
    assert "Inception" not in report and all(r["inception"] is None for r in entry["runs"]["gan"])
    # a second start reuses the finished runs and adds the Inception FID they lack
    code, stdout, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "training" not in stdout and stdout.count("Inception FID of the") == 2
    results = json.loads((out / "results.json").read_text())
    for kind in ("gan", "diffusion"):
        (run,) = results["datasets"]["digits"]["runs"][kind]
        assert run["inception"]["n"] == 16 and run["inception"]["fid"] > 0
    assert len(results["environment"]["starts_seconds"]) == 2
    report = (out / "report.md").read_text()
    assert "| Inception FID ↓ |" in report and "over 2 starts" in report
    # a third start has nothing left to do
    code, stdout, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and "training" not in stdout and "Inception FID of" not in stdout, err


def test_seeds_per_data_set():
    cfg = CompareConfig(data=("digits", "fashion", "shapes"))
    assert [cfg.seeds_for(d) for d in cfg.data] == [1, 3, 1]
    assert CompareConfig(data=("digits", "fashion"), seeds="2").seeds_for("fashion") == 2
    folder = CompareConfig(data=("photos/cats",), seeds="cats=4")
    assert folder.seeds_for("photos/cats") == 4
    assert CompareConfig(data=("digits", "fashion"), seeds="0,4,7").seed_list("fashion") == [
        0,
        4,
        7,
    ]
    assert CompareConfig(data=("digits",), seeds="3").seed_list("digits") == [0, 1, 2]
    assert CompareConfig(data=("digits",), seeds="0,4,7").seeds_for("digits") == 3
    for bad, message in [
        ("fashion=3", "gives no count for 'digits'"),
        ("x", "is not N or NAME=N"),
        ("0", "at least 1"),
        ("fashion=3,0,1", "not both"),
        ("2,2", "distinct"),
    ]:
        with pytest.raises(ValueError, match=message):
            CompareConfig(data=("digits",), seeds=bad)


# ---------------------------------------------------------------------------------------
# The sweep over training budgets
# ---------------------------------------------------------------------------------------


def test_budgets_are_parsed_and_sorted():
    assert parse_budgets("5,2, 40,10") == (2.0, 5.0, 10.0, 40.0)
    assert parse_budgets("0.05") == (0.05,)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--budgets", "2,x"), "--budgets: 'x' is not a number of minutes"),
        (("--budgets", ""), "--budgets: '' is not a number of minutes"),
        (("--budgets", "0,5"), "--budgets: minutes must be positive, got 0"),
        (("--budgets", "5,-1"), "--budgets: minutes must be positive, got -1"),
        (("--budgets", "nan"), "--budgets: minutes must be positive"),
        (("--budgets", "5,2,5"), "--budgets: 5 minutes is given twice"),
        (("--budgets", "2,5", "--budget-minutes", "5"), "--budgets or --budget-minutes"),
        (("--budgets", "2,5", "--distill-minutes", "-1"), "'--distill-minutes': must be 0 or more"),
        (("--budgets", "2,5", "--prediction", "noise"), "--prediction must be eps, v or x0"),
    ],
)
def test_bad_budgets_are_one_line_errors(monkeypatch, capsys, tmp_path, args, message):
    code, _, err = cli(monkeypatch, capsys, "compare", "--out", tmp_path / "c", *args)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_crossing_point_and_verdict():
    minutes = [1.0, 4.0, 16.0]
    # diffusion 10 worse at 1 min, 10 better at 4: level halfway in log-minutes, at 2 min
    assert crossing_point(minutes, [30, 30, 30], [40, 20, 10]) == pytest.approx(2.0)
    assert describe_race(minutes, [30, 30, 30], [40, 20, 10], "FID") == (
        "FID: diffusion overtakes the GAN between 1 and 4 minutes (interpolated: 2 min); "
        "at 16 minutes diffusion leads by 20.0 (30.0 GAN, 10.0 diffusion)."
    )
    # a quarter of the way from 4 to 16 min in log-minutes: 4 * 4 ** 0.25
    assert crossing_point(minutes, [10, 10, 30], [5, 6, 42]) == pytest.approx(4 * 4**0.25)
    assert describe_race(minutes, [10, 10, 30], [5, 6, 42], "FID").startswith(
        "FID: the GAN overtakes diffusion between 4 and 16 minutes (interpolated: 5.66 min);"
    )
    # no crossing: the GAN stays ahead
    assert crossing_point(minutes, [10, 8, 6], [20, 15, 9]) is None
    assert describe_race(minutes, [10, 8, 6], [20, 15, 9], "FID") == (
        "FID: the GAN stays ahead up to 16 minutes, by 10.0 at 1 min and 3.00 at 16 min."
    )
    # a touch: level at 4 min, the GAN ahead on both sides
    assert crossing_point(minutes, [10, 10, 10], [15, 10, 12]) == 4.0
    assert describe_race(minutes, [10, 10, 10], [15, 10, 12], "FID").startswith(
        "FID: the two are level at 4 minutes, and the GAN is ahead at the other budgets; "
    )
    # level at a budget, then ahead: the crossing is that budget
    assert crossing_point(minutes, [10, 10, 10], [15, 10, 5]) == 4.0
    assert describe_race(minutes, [10, 10, 10], [15, 10, 5], "FID").startswith(
        "FID: diffusion overtakes the GAN at 4 minutes, where they are level; "
    )
    assert crossing_point([2.0], [10], [12]) is None
    assert crossing_label(minutes, [30, 30, 30], [40, 20, 10]) == "diffusion ahead from 2 min"
    assert crossing_label(minutes, [10, 10, 30], [5, 6, 42]) == "GAN ahead from 5.66 min"
    assert crossing_label(minutes, [10, 10, 10], [15, 10, 12]) == "level at 4 min"


def test_training_seconds_from_the_log(tmp_path):
    lines = [{"step": 0, "layout_loss": 1.0}, {"step": 25, "loss": 1.0, "steps_per_s": 5.0},
             {"step": 50, "loss": 1.0, "steps_per_s": 25.0},
             {"step": 60, "loss": 1.0, "steps_per_s": 2.0}]  # fmt: skip
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert training_seconds(tmp_path, step=50) == pytest.approx(25 / 5 + 25 / 25)
    assert training_seconds(tmp_path, step=25) == pytest.approx(5.0)
    assert training_seconds(tmp_path, step=60) == pytest.approx(6.0 + 10 / 2)
    assert training_seconds(tmp_path) == 0.0  # no checkpoint: nothing to resume from


def synthetic_sweep():
    def run(kind, seed, minutes, fid):
        return {"seed": seed, "kind": kind, "budget_minutes": minutes, "steps": int(100 * minutes),
                "train_seconds": 60.0 * minutes, "diverged": False, "error": None,
                "final": {"fid": fid + seed, "precision": 0.5, "recall": 0.4, "kid_mean": 0.01},
                "inception": {"fid": 2 * fid + seed, "n": 100},
                "wall_seconds": {"train": 60.0 * minutes, "measure": 10.0}}  # fmt: skip

    runs = []
    for minutes, gan, diffusion in [(1.0, 30.0, 40.0), (4.0, 30.0, 20.0)]:
        for seed in (0, 2):
            runs += [run("gan", seed, minutes, gan), run("diffusion", seed, minutes, diffusion)]
    cfg = CompareConfig(data=("digits",), seeds="0,2", samples=100, inception_samples=100)
    return {"data": "digits", "config": cfg.to_dict(), "budgets": [1.0, 4.0], "seeds": [0, 2],
            "distill_minutes": 0.0, "student_steps": [], "recipe": cfg.recipe(),
            "environment": {"device": "cpu", "threads": 2, "torch": "2.x", "seconds": 600.0},
            "info": {"real_images": 100, "feature_net": "classifier:digits",
                     "feature_net_note": "shipped"},
            "runs": runs}  # fmt: skip


def test_sweep_report_from_synthetic_numbers(tmp_path):
    sweep = synthetic_sweep()
    sweep["summary"] = summarize(sweep)
    gan = sweep["summary"]["budgets"]["1"]["gan"]
    assert gan["fid"] == {"mean": 31.0, "std": pytest.approx(2**0.5), "n": 2}
    assert gan["inception_fid"]["mean"] == 61.0 and gan["train_minutes"]["mean"] == 1.0
    races = sweep["summary"]["races"]
    assert races["fid"]["crossing_minutes"] == pytest.approx(2.0)
    assert races["inception_fid"]["crossing_minutes"] == pytest.approx(2.0)
    text = write_sweep_report(sweep, tmp_path).read_text()
    assert (tmp_path / "fid_vs_minutes.png").is_file() and "fid_vs_minutes.png" in text
    assert (
        "Inception FID: diffusion overtakes the GAN between 1 and 4 minutes (interpolated: 2 min)"
        in text
    )
    assert "classifier FID: diffusion overtakes the GAN between 1 and 4 minutes" in text
    assert "| 1 | GAN | 100 ± 0 | 1.00 ± 0 | 61.0 ± 1.41 | 31.0 ± 1.41 |" in text
    assert "2 seeds (0, 2)" in text and "The sweep took 10.0 minutes" in text


def test_sweep_end_to_end_on_digits(monkeypatch, capsys, tmp_path):
    """Two budgets, one seed, tiny models: the second budget resumes the first's run."""
    out = tmp_path / "sweep"
    args = ("compare", "--data", "digits", "--budgets", "0.05,0.02", "--seeds", "1",
            "--out", out, "--preset", "tiny", "--samples", "16", "--no-inception",
            "--distill-minutes", "0.005", "--prediction", "v", "--zero-terminal-snr",
            "--min-snr-gamma", "5")  # fmt: skip
    code, stdout, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    folder = out / "digits" / "sweep"
    sweep = json.loads((folder / "sweep.json").read_text())
    assert sweep["budgets"] == [0.02, 0.05] and sweep["seeds"] == [0]
    runs = {(r["kind"], r["budget_minutes"]): r for r in sweep["runs"]}
    assert set(runs) == {(k, b) for k in ("gan", "diffusion") for b in (0.02, 0.05)}
    for kind in ("gan", "diffusion"):
        first, second = runs[kind, 0.02], runs[kind, 0.05]
        assert first["start_step"] == 0 and second["start_step"] == first["steps"] > 0
        assert second["steps"] > first["steps"]
        # the budget is the total training time: 3 s in all, not 1.2 + 3. The loop's time is
        # counted, not a start's setup (loading, the data's workers), which a loaded machine
        # can stretch to most of a second: the lower bounds leave room for it
        assert 1.2 - 1.0 < first["train_seconds"] < 1.2 + 1.0
        assert 3.0 - 1.5 < second["train_seconds"] < 3.0 + 1.0
        assert second["train_seconds"] == training_seconds(folder / "seed0" / kind)
        assert second["final"]["n"] == 16 and second["final"]["fid"] > 0
    student = runs["diffusion", 0.05]["student"]
    assert set(student["steps"]) == {"1", "2", "4"} and student["train_steps"] > 0
    assert "v-prediction, cosine schedule (zero terminal SNR), min-SNR" in sweep["models"][
        "diffusion"]["description"]  # fmt: skip
    report = (folder / "sweep.md").read_text()
    assert (folder / "fid_vs_minutes.png").is_file()
    assert re.search(r"(stays ahead up to 0.05 minutes|overtakes|level)", report)
    assert "extra compute" in report and "| 0.05 | student (4 lcm steps) |" in report
    # a second start finds every budget measured: nothing trained, the same numbers
    stamps = {p: p.stat().st_mtime_ns for p in (folder / "results").iterdir()}
    code, stdout, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and "training" not in stdout and "distilling" not in stdout, err
    again = json.loads((folder / "sweep.json").read_text())
    assert again["runs"] == sweep["runs"]
    assert {p: p.stat().st_mtime_ns for p in (folder / "results").iterdir()} == stamps
    assert len(again["environment"]["starts_seconds"]) == 2
    # a budget below those measured, or other settings, cannot reuse the folder
    code, _, err = cli(monkeypatch, capsys, *args[:4], "0.01,0.05", *args[5:])
    assert code == 1 and "has trained past 0.01 minutes" in err
    code, _, err = cli(monkeypatch, capsys, *args, "--samples", "24")
    assert code == 1 and "holds a sweep with other settings (samples)" in err, err


def test_settings_of_an_older_folder_count_as_defaults(tmp_path):
    from difusion.compare.config import check_settings

    defaults = {"samples": 1000, "prediction": "eps"}
    (tmp_path / "settings.json").write_text(json.dumps({"samples": 1000}))  # before --prediction
    check_settings(tmp_path, {"samples": 1000, "prediction": "eps"}, defaults, (), "study")
    assert json.loads((tmp_path / "settings.json").read_text())["prediction"] == "eps"
    (tmp_path / "settings.json").write_text(json.dumps({"samples": 1000}))
    with pytest.raises(ValueError, match=r"holds a study with other settings \(prediction\)"):
        check_settings(tmp_path, {"samples": 1000, "prediction": "v"}, defaults, (), "study")
    check_settings(tmp_path, {"samples": 500, "prediction": "eps"}, defaults, ("samples",), "s")


def tiny_student(folder):
    """The tiny preset's untrained U-Net for 8 px digits, saved as a run's model; returns it
    as loaded back."""
    from difusion.compare.study import unet_options
    from difusion.data import DigitsDataset
    from difusion.model import DiffusionModel
    from difusion.runs import Run
    from difusion.train import TrainConfig, model_config_for

    cfg = TrainConfig(data="digits", size=8, **unet_options(8, "tiny"))
    torch.manual_seed(0)
    DiffusionModel(model_config_for(cfg, DigitsDataset(size=8))).save(Run(folder).model_path)
    return DiffusionModel.load(Run(folder).model_path)


def test_students_get_the_inception_fid_their_teacher_gets(tmp_path):
    """Each step count's Inception FID is on the first inception_samples of the draw whose
    first samples give its feature-network numbers, as `measure_model` does for a teacher."""
    from difusion.compare import CompareConfig
    from difusion.compare.evaluation import Scorer
    from difusion.compare.sweep import SweepConfig, measure_student
    from difusion.evaluate import draw
    from difusion.metrics import RandomFeatures

    student = tiny_student(tmp_path)
    real = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scorer, inception = Scorer(RandomFeatures(0, 4), real), Scorer(RandomFeatures(1, 4), real)
    study = CompareConfig(data=("digits",), samples=8, inception_samples=12)
    scfg = SweepConfig(study, budgets=(1.0,), student_steps=(1, 2))
    result = measure_student(tmp_path, scorer, inception, scfg, torch.device("cpu"))
    assert set(result["steps"]) == set(result["inception"]) == {"1", "2"}
    for k in (1, 2):
        fake = draw(student, 12, sampler="lcm", steps=k)
        assert result["inception"][str(k)] == inception(fake)
        assert result["inception"][str(k)]["n"] == 12
        assert result["steps"][str(k)] == scorer(fake[:8])
    alone = measure_student(tmp_path, scorer, None, scfg, torch.device("cpu"))
    assert alone["inception"] is None
    assert alone["steps"]["1"] == result["steps"]["1"]  # one step: the first 8 of 12 are 8


def test_sweep_report_shows_the_students_inception_fid(tmp_path):
    sweep = synthetic_sweep()
    sweep.update(distill_minutes=1.0, student_steps=[1])
    for r in sweep["runs"]:
        if r["kind"] == "diffusion":
            fid = r["final"]["fid"] + 5
            r["student"] = {"train_steps": 50, "steps": {"1": {**r["final"], "fid": fid}},
                            "inception": {"1": {"fid": 2 * fid, "n": 100}}}  # fmt: skip
    sweep["summary"] = summarize(sweep)
    text = write_sweep_report(sweep, tmp_path).read_text()
    # diffusion at 1 min: FID 40 and 42 over the seeds; the students' 45 and 47, Inception 90, 94
    assert "| 1 | student (1 lcm step) | 50 ± 0 | — | 92.0 ± 2.83 | 46.0 ± 1.41 |" in text
    assert "features only" not in text
    assert "their FIDs, in the classifier's features and in Inception's, stand beside" in text
    for r in sweep["runs"]:
        r.get("student", {}).pop("inception", None)  # measured before students had one
    sweep["summary"] = summarize(sweep)
    text = write_sweep_report(sweep, tmp_path).read_text()
    assert "| 1 | student (1 lcm step) | 50 ± 0 | — | — | 46.0 ± 1.41 |" in text
    assert "their FID is in the classifier's features only, beside" in text


@pytest.mark.parametrize("kind", ["gan", "diffusion"])
def test_a_diverged_run_is_recorded_not_raised(tmp_path, kind):
    from difusion.compare.study import train_run
    from difusion.data import DigitsDataset

    cfg = CompareConfig(data=("digits",), batch_size=4, preset="tiny", device="cpu")
    error = train_run(
        kind, "digits", NaNImages(DigitsDataset(size=8)), 0, tmp_path / kind, cfg, 0.05
    )
    assert error is not None and "became nan at step 1" in error


def test_recipes_are_parsed():
    from difusion.compare import parse_recipes

    assert parse_recipes("unet-v, unet-edm,dit-flow") == ("unet-v", "unet-edm", "dit-flow")
    from difusion.compare.study import diffusion_options

    cfg = CompareConfig()
    assert diffusion_options("dit4-edm", 32, cfg) == {
        "backbone": "dit", "patch_size": 4, "channels": 128, "head_dim": 32, "depth": 6,
        "objective": "edm",
    }  # fmt: skip
    assert diffusion_options("dit-flow", 32, cfg)["patch_size"] == 2
    v = diffusion_options("unet-v", 32, cfg)
    assert v["prediction"] == "v" and v["min_snr_gamma"] == 5.0 and v["zero_terminal_snr"]
    with pytest.raises(ValueError, match="unknown recipe 'unet-gan'"):
        parse_recipes("unet-v,unet-gan")
    with pytest.raises(ValueError, match="give distinct recipes"):
        parse_recipes("dit-flow,dit-flow")


@pytest.mark.parametrize(
    "args, message",
    [
        (("--recipes", "unet-v", "--budget-minutes", "1"), "--recipes is a sweep's"),
        (("--recipes", "unet-v,vit-flow", "--budgets", "1"), "unknown recipe 'vit-flow'"),
        (("--recipes", "dit-edm", "--budgets", "1", "--distill-minutes", "1"),
         "--recipes distils no students"),
    ],
)  # fmt: skip
def test_bad_recipes_are_one_line_errors(monkeypatch, capsys, tmp_path, args, message):
    code, _, err = cli(monkeypatch, capsys, "compare", "--out", tmp_path / "c", *args)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def synthetic_recipes_sweep():
    """The GAN and two recipes at 1 and 4 minutes, one seed: the GAN leads at 1 minute,
    dit-flow at 4, and unet-edm never."""
    sweep = synthetic_sweep()
    fids = {"gan": (30.0, 30.0), "unet-edm": (40.0, 35.0), "dit-flow": (45.0, 20.0)}
    runs = []
    for kind, (at_1, at_4) in fids.items():
        for minutes, fid in ((1.0, at_1), (4.0, at_4)):
            run = next(r for r in sweep["runs"] if r["budget_minutes"] == minutes)
            runs.append({**run, "kind": kind, "seed": 0, "final": {**run["final"], "fid": fid},
                         "inception": {"fid": 2 * fid, "n": 100},
                         "images_per_second": 500.0 if kind == "gan" else 120.0})  # fmt: skip
    return {**sweep, "seeds": [0], "kinds": list(fids), "runs": runs}


def test_recipes_sweep_report_races_every_recipe_against_the_gan(tmp_path):
    sweep = synthetic_recipes_sweep()
    sweep["summary"] = summarize(sweep)
    race = sweep["summary"]["races"]["fid"]
    assert race["verdict"] == (
        "classifier FID, lowest: at 1 min GAN (30.0), the best recipe unet-edm 40.0; "
        "at 4 min dit-flow (20.0), the GAN 30.0."
    )
    assert race["recipes"]["dit-flow"]["crossing_minutes"] == pytest.approx(
        2 ** (2 * 15 / 25)  # the gap goes 15 -> -10: 15/25 of the way in log-minutes
    )
    assert race["recipes"]["unet-edm"]["verdict"] == (
        "classifier FID, unet-edm: the GAN stays ahead up to 4 minutes, by 10.0 at 1 min and "
        "5.00 at 4 min."
    )
    text = write_sweep_report(sweep, tmp_path).read_text()
    assert "difusion compare --recipes unet-edm,dit-flow --budgets 1,4" in text
    assert "| 4 | dit-flow (20 steps) | 400 | 4.00 | 40.0 | 20.0 | 0.500 | 0.400 | 120 |" in text
    assert "| 4 | GAN | 400 | 4.00 | 60.0 | 30.0 | 0.500 | 0.400 | 500 |" in text
    assert "| budget (min) | GAN | unet-edm | dit-flow |" in text
    assert (tmp_path / "fid_vs_minutes.png").is_file()


def test_recipes_sweep_end_to_end_on_digits(monkeypatch, capsys, tmp_path):
    """Two recipes beside the GAN, two budgets: each run continues from the first budget to
    the second; one table and one plot hold them all."""
    out = tmp_path / "recipes"
    args = ("compare", "--data", "digits", "--recipes", "unet-edm,dit-flow", "--budgets",
            "0.02,0.05", "--seeds", "1", "--out", out, "--preset", "tiny", "--samples", "16",
            "--no-inception")  # fmt: skip
    code, stdout, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    folder = out / "digits" / "recipes"
    sweep = json.loads((folder / "sweep.json").read_text())
    assert sweep["kinds"] == ["gan", "unet-edm", "dit-flow"]
    runs = {(r["kind"], r["budget_minutes"]): r for r in sweep["runs"]}
    for kind in sweep["kinds"]:
        first, second = runs[kind, 0.02], runs[kind, 0.05]
        assert second["start_step"] == first["steps"] > 0 and second["steps"] > first["steps"]
        assert second["final"]["n"] == 16 and second["images_per_second"] > 0
    assert "EDM preconditioning" in sweep["models"]["unet-edm"]["description"]
    assert "DiT width 32, 2 blocks" in sweep["models"]["dit-flow"]["description"]
    report = (folder / "sweep.md").read_text()
    assert "| 0.05 | dit-flow (20 steps) |" in report and "| 0.05 | GAN |" in report
    assert (folder / "fid_vs_minutes.png").is_file()
    assert "classifier FID, lowest: at 0.02 min" in report


def test_wall_seconds_is_the_union_of_the_starts():
    from difusion.compare.sweep import wall_seconds

    # an older start of 60 s, two overlapping starts (0-100, 50-150) and a later one
    assert wall_seconds([[None, 60.0], [50.0, 100.0], [0.0, 100.0], [300.0, 10.0]]) == 220.0
    assert wall_seconds([[0.0, 100.0], [10.0, 20.0]]) == 100.0  # one inside the other
    assert wall_seconds([]) == 0.0


def test_a_held_run_lock_is_not_taken_by_another_handle(tmp_path):
    from difusion.compare.sweep import run_lock

    path = tmp_path / "seed0" / "gan.lock"
    with run_lock(path) as first, run_lock(path) as second:  # another open file, as a process
        assert first and not second
    with run_lock(path) as again:
        assert again  # released when the holder left


def test_two_starts_at_once_share_a_sweep(tmp_path):
    """The same command twice at once: each run and budget is trained and measured by one
    start only, each run continues from its own last budget, and the report holds them all."""
    out = tmp_path / "shared"
    args = [sys.executable, "-m", "difusion", "compare", "--data", "digits", "--recipes",
            "unet-v", "--budgets", "0.02,0.04", "--seeds", "1", "--out", str(out), "--preset",
            "tiny", "--samples", "16", "--no-inception"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    starts = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    logs = [p.communicate(timeout=600)[0] for p in starts]
    assert [p.returncode for p in starts] == [0, 0], logs
    trained = re.findall(r"training the (\S+) to (\S+) min", "".join(logs))
    each_once = sorted((k, m) for k in ("gan", "unet-v") for m in ("0.02", "0.04"))
    assert sorted(trained) == each_once, logs  # by one start or the other
    folder = out / "digits" / "recipes"
    sweep = json.loads((folder / "sweep.json").read_text())
    runs = {(r["kind"], r["budget_minutes"]): r for r in sweep["runs"]}
    assert len(runs) == 4
    for kind in ("gan", "unet-v"):
        assert runs[kind, 0.04]["start_step"] == runs[kind, 0.02]["steps"] > 0
    env_ = sweep["environment"]
    assert len(env_["starts"]) == 2 and env_["seconds"] < sum(env_["starts_seconds"])  # at once
    assert "2 starts, some of them at once" in (folder / "sweep.md").read_text()


def test_the_report_names_the_cpu_of_each_budget(tmp_path):
    from difusion.compare.sweep_report import on_what

    sweep = synthetic_sweep()
    assert on_what(sweep) == "cpu"  # results from before the CPU was noted
    for r in sweep["runs"]:
        r["cpu"] = "AMD EPYC (avx512_bf16)"
    assert on_what(sweep) == "cpu (AMD EPYC (avx512_bf16))"
    for r in sweep["runs"]:
        if r["budget_minutes"] == 4.0:
            r["cpu"] = "Intel Xeon (amx_bf16)"  # the sweep went on on another machine
    sweep["summary"] = summarize(sweep)
    text = write_sweep_report(sweep, tmp_path).read_text()
    assert (
        "on cpu, budgets measured on several CPUs: AMD EPYC (avx512_bf16) (1 min); "
        "Intel Xeon (amx_bf16) (4 min), with 2 threads"
    ) in text
