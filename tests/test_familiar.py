import sys

import pytest

from difusion.familiar import (
    FAMILIAR,
    nearest_similarity,
    training_captions,
    training_config,
    unfamiliar_prompts,
)
from difusion.model import resolve_checkpoint
from difusion.text import load_text_encoder


@pytest.fixture(scope="module")
def shipped():
    config = training_config(resolve_checkpoint("default"))
    return load_text_encoder("minilm"), training_captions(config)


def test_the_shipped_models_captions_are_drawn_again(shipped):
    _, captions = shipped
    assert len(captions) == 64 and len(set(captions)) > 32
    assert all(any(c in caption for c in ("circle", "square", "triangle")) for caption in captions)
    assert training_captions({"data": "digits", "cond": "label"}) is None  # nothing to draw
    assert training_captions(None) is None


def test_prompts_far_from_the_training_captions_are_flagged(shipped):
    encoder, captions = shipped
    known = ["a red circle", "a blue square to the left of a green triangle", "a cyan circle"]
    foreign = ["un círculo rojo", "🔴 🟦", "an astronaut riding a horse", "红色圆圈"]
    near = nearest_similarity(encoder, known + foreign, captions)
    assert (near[:3] >= FAMILIAR).all() and (near[3:] < FAMILIAR).all(), near
    assert [p for p, _ in unfamiliar_prompts(encoder, known + foreign, captions)] == foreign


def test_generate_warns_of_a_prompt_the_model_cannot_read(monkeypatch, capsys, tmp_path):
    from difusion.cli import main

    out = tmp_path / "g.png"
    args = ["generate", "ein roter Kreis", "-n", "1", "--steps", "1", "-o", str(out)]
    monkeypatch.setattr(sys, "argv", ["difusion", *args])
    with pytest.warns(UserWarning, match="'ein roter Kreis' is far from every caption this "
                      "model was trained on"), pytest.raises(SystemExit) as exit_info:  # fmt: skip
        main()
    assert exit_info.value.code == 0 and out.exists()
