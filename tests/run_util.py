"""Checks that tests of training runs share."""

import torch
from safetensors.torch import load_file


def assert_same_training_state(a, b) -> None:
    """Two run folders hold the same bits: weights and optimiser state, and EMA weights."""
    state_a, state_b = (load_file(run / "train_state.safetensors") for run in (a, b))
    for key in state_a:
        if key.startswith(("model.", "opt.")):
            assert torch.equal(state_a[key], state_b[key]), key
    ema_a, ema_b = (load_file(run / "model.safetensors") for run in (a, b))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
