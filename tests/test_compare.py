import json
import re
import sys

import pytest

from difusion.cli import main
from difusion.compare import (
    COLLAPSE_RULE,
    CompareConfig,
    collapsed,
    comparison_rows,
    late_fluctuation,
    spread,
    write_report,
)


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


def cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["difusion", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


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
    for bad, message in [
        ("fashion=3", "gives no count for 'digits'"),
        ("x", "is not N or NAME=N"),
        ("0", "at least 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            CompareConfig(data=("digits",), seeds=bad)
