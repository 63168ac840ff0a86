"""The model that ships with the package keeps drawing what it is asked for.

Guards measured when it was committed (3,240 steps on 2 CPU cores): on this fixed prompt
set it satisfied 33 of 36 one-object prompts, and its two-object images held 2.0 whole
palette shapes on average while satisfying almost none strictly. A change that breaks
sampling, conditioning or loading drops both to ~0. The issue's targets (95% one-object,
75% two-object prompts) are not reached yet: see README, "Text to image".
"""

import pytest

from difusion import Pipeline
from difusion.alignment import detect, prompt_set, score_batch
from difusion.pipeline import default_model_path


@pytest.fixture(scope="module")
def drawn():
    pipe = Pipeline.from_pretrained("default")
    prompts = prompt_set(36, 24, seed=123)
    return prompts, pipe.sample(prompts, steps=20, seed=0)


def test_default_model_is_small_and_records_its_encoder():
    assert default_model_path().stat().st_size < 25 * 2**20
    config = Pipeline.from_pretrained("default").model.config
    assert config.text_encoder["name"] == "minilm" and config.image_size == 32


def test_default_model_satisfies_one_object_prompts(drawn):
    prompts, x = drawn
    assert score_batch(x, prompts)["pass_rate_single"] >= 0.75


def test_default_model_draws_two_shapes_for_two_object_prompts(drawn):
    prompts, x = drawn
    counts = [len([o for o in detect(im) if o.whole]) for im in x[36:]]
    assert sum(counts) / len(counts) >= 1.5
