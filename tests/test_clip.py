"""Our CLIP: the standard folder through transformers, the contrastive loss, the trainer
(lowers the loss, resumes exactly, writes a CLIP folder) and the measures of `eval --clip`."""

import json
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_util import cli
from PIL import Image

from difusion.clip import Clip, ClipConfig, contrastive_loss
from difusion.clip_eval import clip_score_summary, retrieval, roc_auc
from difusion.clip_train import ClipTrainConfig, train_clip
from difusion.runs import Run

TINY = dict(
    vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
    text_heads=2, embed_dim=16, context_length=24, patch_size=8,
)  # fmt: skip
PROMPTS = ["un círculo rojo encima de un cuadrado azul", "a red circle", "una zapatilla deportiva"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    clip = Clip(ClipConfig(**TINY, vocab_size=2048)).eval()
    folder = tmp_path_factory.mktemp("clip") / "folder"
    clip.save(folder)
    return clip, folder


def test_folder_round_trips_through_transformers(saved):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    clip, folder = saved
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = CLIPImageProcessor.from_pretrained(folder)
    ids, mask = clip.tokenize(PROMPTS)
    theirs = tokenizer(PROMPTS, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(theirs["input_ids"], ids) and ids.max() < 2048
    with torch.no_grad():
        text = model.get_text_features(**theirs)
        text = getattr(text, "pooler_output", text)
        ours_text = clip.encode_text(PROMPTS)
    torch.testing.assert_close(F.normalize(text, dim=-1), ours_text, atol=1e-5, rtol=1e-5)

    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    inputs = processor(images=[Image.fromarray(p) for p in pixels], return_tensors="pt")
    ours_in = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        image = model.get_image_features(**inputs)
        image = getattr(image, "pooler_output", image)
        ours_image = clip.encode_image(ours_in)
    torch.testing.assert_close(F.normalize(image, dim=-1), ours_image, atol=1e-4, rtol=1e-4)

    loaded = Clip.load(folder).eval()
    assert loaded.config == clip.config
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(PROMPTS), ours_text)


def test_contrastive_loss_matches_clip_and_is_lowest_for_matched_pairs():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 8), dim=-1)
    texts = F.normalize(images + 0.1 * torch.randn(6, 8), dim=-1)  # text i describes image i
    logits = 10 * images @ texts.T
    labels = torch.arange(6)
    reference = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(contrastive_loss(logits), reference)
    matched = contrastive_loss(logits)
    for shift in range(1, 6):  # every text paired with another image
        shuffled = 10 * images @ texts.roll(shift, 0).T
        assert contrastive_loss(shuffled) > matched + 1.0
    # items 0 and 1 show the same thing: pairing them either way is as good
    keys = torch.tensor([0, 0, 1, 2, 3, 4])
    swapped = texts[[1, 0, 2, 3, 4, 5]]
    assert torch.allclose(
        contrastive_loss(10 * images @ swapped.T, keys), contrastive_loss(logits, keys)
    )


def test_roc_auc_is_sklearns():
    from sklearn.metrics import roc_auc_score

    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4, 0.2, 0.9])
    passed = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    assert roc_auc(scores, passed) == pytest.approx(roc_auc_score(passed, scores))
    assert roc_auc(scores, torch.ones(7)) is None
    summary = clip_score_summary([(scores[:3], [False, False, True]), (scores[3:], [1, 1, 0, 1])])
    assert summary["clip_n_passed"] == 4 and summary["clip_n_failed"] == 3
    assert summary["clip_auc"] == pytest.approx(roc_auc_score(passed, scores))


def test_retrieval_counts_a_hit_by_what_the_image_shows(saved):
    clip, _ = saved
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    data = {"image": images, "caption": ["a", "b", "c", "d"], "key": torch.tensor([0, 1, 2, 3])}
    result = retrieval(clip, data, ks=(1, 4))
    assert result["R@4"] == 1.0 and result["n"] == 4 and result["chance"] == 0.25
    same = {**data, "key": torch.zeros(4, dtype=torch.long)}  # all show the same thing
    assert retrieval(clip, same, ks=(1,))["R@1"] == 1.0


def tiny_run(out, steps, **kw):
    cfg = ClipTrainConfig(
        data="shapes,emoji", out=str(out), steps=steps, batch_size=24, lr=2e-3, warmup=5,
        channels=32, layers=1, heads=2, embed_dim=16, vocab_size=2048, probe_size=24,
        data_options={"language": "both"}, log_every=5, sample_every=20, checkpoint_every=10,
        device="cpu",
    )  # fmt: skip
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "clip"
    train_clip(tiny_run(out, 40), progress=False)
    return out


def test_short_run_lowers_the_loss_and_writes_a_clip_folder(trained):
    log = Run(trained).read_log()
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3
    probes = [r for r in log if "probe_emoji_es" in r]
    assert [r["step"] for r in probes] == [20, 40]
    assert {"probe_shapes_en", "probe_shapes_es", "probe_emoji_en"} <= set(probes[0])
    clip = Clip.load(trained / "clip")
    assert clip.config.vocab_size == 2048 and clip.config.vision_width == 32
    from difusion.text import load_text_encoder

    encoder = load_text_encoder("clip", trained / "clip")  # --text-encoder-path RUN/clip
    tokens, _ = encoder.encode(PROMPTS)  # padded to the window; ours to the longest prompt
    with torch.no_grad():
        _, states, mask = clip.text_states(PROMPTS)
    assert torch.allclose(tokens[:, : mask.shape[1]][mask], states[mask], atol=1e-5)


def test_resume_is_exact(trained, tmp_path):
    out = tmp_path / "resumed"

    def terminate_at_20(step, record):
        if step == 20:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:  # the run saves at the signal, then exits 143
        train_clip(tiny_run(out, 40), progress=False, on_step=terminate_at_20)
    assert stopped.value.code == 143 and Run(out).read_log()[-1]["step"] == 20
    with pytest.raises(Exception, match="already holds a run"):
        train_clip(tiny_run(out, 40), progress=False)
    train_clip(tiny_run(out, 40), resume=True, progress=False)
    straight = Clip.load(trained / "clip").state_dict()
    resumed = Clip.load(out / "clip").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    timeless = lambda run: [  # noqa: E731
        {k: v for k, v in r.items() if k != "steps_per_s"} for r in Run(run).read_log()
    ]
    assert timeless(out) == timeless(trained)


def test_cli_resume_keeps_the_runs_own_options(monkeypatch, capsys, trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for args, message in [
        (["--lr", "0.5"], f"--lr 0.5: the run in {run} was made with 0.002"),
        (["--batch-size", "8"], f"--batch-size 8: the run in {run} was made with 24"),
        (["--steps", "30"], f"the run in {run} is at step 40: --steps 30 leaves nothing"),
    ]:
        code, _, err = cli(monkeypatch, capsys, "train", "--model", "clip", "--data",
                           "shapes,emoji", "--out", run, "--resume", *args)  # fmt: skip
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_trains_and_evaluates(monkeypatch, capsys, trained, tmp_path):
    code, _, err = cli(
        monkeypatch, capsys, "train", "--model", "clip", "--data", "shapes,digits",
        "--out", tmp_path / "r",
    )  # fmt: skip
    assert code == 1 and err.strip() == (
        "error: digits has no captions: a CLIP learns from captioned images"
    )
    code, _, err = cli(
        monkeypatch, capsys, "train", "--model", "clip", "--data", "shapes",
        "--data-option", "colour=3", "--out", tmp_path / "r",
    )  # fmt: skip
    assert code == 1 and "--data-option colour: no data set has it" in err
    code, _, err = cli(
        monkeypatch, capsys, "train", "--model", "clip", "--data", "shapes", "--cond", "text",
        "--out", tmp_path / "r",
    )  # fmt: skip
    assert code == 1 and "--cond: not an option of --model clip" in err
    code, out, err = cli(monkeypatch, capsys, "eval", "--clip", trained / "clip", "-n", "20")
    assert code == 0, err
    rows = [line.split("|")[1:-1] for line in out.splitlines()[2:]]
    langs = {(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows}
    assert {("zero-shot", "fashion", "es"), ("retrieval", "emoji", "en")} <= langs
    assert len(rows) == 10 and all(0 < int(r[-1]) <= 20 for r in rows)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("model.safetensors", "model.safetensors missing"),
        ("tokenizer.json", "tokenizer.json (or vocab.json + merges.txt) missing"),
        ("config", "model_type is 'bert', not 'clip'"),
    ],
)
def test_a_broken_folder_is_one_line(monkeypatch, capsys, saved, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(saved[1], folder)
    if damage == "config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    else:
        (folder / damage).unlink()
    with pytest.raises(ValueError, match=re.escape(message)):
        Clip.load(folder)
    code, out, err = cli(monkeypatch, capsys, "eval", "--clip", folder)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_the_shipped_clip_sees_shapes_in_both_languages():
    from difusion.clip_eval import zero_shot_set

    clip = Clip.load("default").eval()
    assert clip.config.vocab_size == 8192
    for language in ("en", "es"):
        result = zero_shot_set(clip, "shapes", language, 90)
        assert result["n"] == 90 and result["accuracy"] > 4 * result["chance"], language


def test_eval_alignment_adds_the_clip_score(monkeypatch, capsys):
    code, out, err = cli(
        monkeypatch, capsys, "eval", "default", "--alignment", "--clip", "default",
        "--prompts", "3", "--steps", "4", "--language", "es", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["language"] == "es" and len(result["clip_scores"]) == 6
    assert len(result["exact_passed"]) == 6
    assert result["clip_n_passed"] + result["clip_n_failed"] == 6
    assert all(-1 <= s <= 1 for s in result["clip_scores"])
    code, _, err = cli(monkeypatch, capsys, "eval", "default", "--clip", "default")
    assert code == 1 and "--clip goes alone" in err
