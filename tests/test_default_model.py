"""The model that ships with the package keeps drawing what it is asked for.

Guards measured when it was committed (2,663 steps of batch 256 on an H100, then 11,712
steps of batch 32 fine-tuned on a 2-core CPU; default guidance 2): on this fixed prompt set
it satisfied 35 of 36 one-object and 8 of 24 two-object prompts, and its two-object images
held 1.92 whole palette shapes on average. A change that breaks sampling, conditioning or
loading drops all three to ~0. The issue's targets (95% one-object, 75% two-object prompts)
are not reached yet for two objects: see README, "Text to image".
"""

import pytest

from difusion import Pipeline
from difusion.alignment import detect, prompt_set, score_batch
from difusion.model import default_model_path, resolve_checkpoint


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
    assert score_batch(x, prompts)["pass_rate_single"] >= 0.85


def test_default_model_draws_two_shapes_for_two_object_prompts(drawn):
    prompts, x = drawn
    assert score_batch(x[36:], prompts[36:])["pass_rate_double"] >= 0.2
    counts = [len([o for o in detect(im) if o.whole]) for im in x[36:]]
    assert sum(counts) / len(counts) >= 1.8


def test_default_resolves_to_the_shipped_file():
    assert resolve_checkpoint("default") == default_model_path()
