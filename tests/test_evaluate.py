import json
import sys

import pytest

from difusion.alignment import prompt_set
from difusion.cli import main
from difusion.data import DigitsDataset, ShapesDataset
from difusion.evaluate import evaluate_alignment, format_table
from difusion.model import DiffusionModel
from difusion.train import TrainConfig, train

TINY = dict(
    steps=2, batch_size=4, channels=16, channel_mult=(1, 2), layers_per_block=1, head_dim=16
)


@pytest.fixture(scope="module")
def label_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = TrainConfig(out=str(out), size=8, attention_resolutions=(4,), cond="label", **TINY)
    return train(cfg, dataset=DigitsDataset(size=8), progress=False)


def test_eval_cli_prints_metrics_as_json(monkeypatch, capsys, label_run):
    argv = [
        "difusion",
        "eval",
        str(label_run),
        "-n",
        "20",
        "--feature-net",
        "random",
        "--steps",
        "2",
        "--json",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_fake"] == result["n_real"] == 20
    assert result["feature_net"] and result["data"] == "digits"
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1


def test_eval_errors_are_one_line(monkeypatch, capsys, label_run):
    for argv, message in [
        (
            ["eval", str(label_run), "--feature-net", "nothing", "-n", "4", "--steps", "1"],
            "unknown feature network",
        ),
        (["eval", str(label_run), "--alignment"], "needs a text-conditioned model"),
        (["eval", str(label_run / "model.safetensors"), "-n", "1"], "-n must be at least 4"),
    ]:
        monkeypatch.setattr(sys, "argv", ["difusion", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and message in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "text"
    cfg = TrainConfig(
        data="shapes", out=str(out), size=32, attention_resolutions=(16,), cond="text",
        text_encoder="scratch", **TINY,
    )  # fmt: skip
    return train(cfg, dataset=ShapesDataset(size=32, length=64), progress=False)


def test_alignment_of_a_tiny_text_model(text_run):
    result = evaluate_alignment(
        DiffusionModel.load(text_run / "model.safetensors"), 4, 4, (0, 1), steps=2
    )
    assert result["n_single"] == 8 and result["n_double"] == 8
    assert result["alignment_single"] == 0.0  # two steps of an untrained model draw no shapes
    # every failed image names at least one reason, each from the scorer's categories
    failed = 16 - round(8 * result["alignment_single"] + 8 * result["alignment_double"])
    assert sum(result["failures"].values()) >= failed == 16
    known = {"count", "fragment", "missing", "unexpected", "relation", "swapped", "background"}
    assert set(result["failures"]) <= known | {"junk"}
    row = next(line for line in format_table(result).splitlines() if line.startswith("failures"))
    assert all(f"{k} {v}" in row for k, v in result["failures"].items())


def test_alignment_with_unseen_wordings(text_run):
    model = DiffusionModel.load(text_run / "model.safetensors")
    asked: list[str] = []
    text_cond = model.text_cond
    model.text_cond = lambda prompts: asked.extend(prompts) or text_cond(prompts)
    result = evaluate_alignment(model, 2, 2, (0,), steps=1, wording="colour")
    assert result["wording"] == "colour" and result["n_single"] == result["n_double"] == 2
    prompts = [p for p in asked if p]
    assert len(prompts) == 4 and all("crimson" in p or "cobalt" in p or "golden" in p
                                      or "emerald" in p or "fuchsia" in p or "turquoise" in p
                                      for p in prompts)  # fmt: skip
    # the from-scratch encoder has never seen them: its tokenizer maps them to [UNK]
    assert "[UNK]" in model.text_encoder.tokens(prompts[0])
    with pytest.raises(ValueError, match="unknown wording 'smell'; choose one of canonical, "):
        evaluate_alignment(model, 1, 1, (0,), steps=1, wording="smell")
    asked.clear()
    canonical = evaluate_alignment(model, 1, 1, (0,), steps=1, wording="canonical")
    assert canonical["wording"] == "canonical"
    assert [p for p in asked if p] == prompt_set(1, 1, seed=0)
