"""The same training command under torchrun: two processes on the CPU (gloo).

What it proves: the processes split each global batch between them (each image of an epoch
once, none skipped: tests/test_loader.py counts them), draw the same timesteps, noise and
condition dropout that one process would for the whole batch, average their gradients, and
so reach the weights of one process training on the whole batch (to float rounding, 1e-5),
accumulated batches included; the logged loss is the mean over the processes; rank 0 alone
writes the run folder."""

import json
import os
import subprocess
import sys

import torch
from test_train import outputs_of

from difusion.model import DiffusionModel

COMMON = [
    "train", "--data", "digits", "--size", "8", "--steps", "4", "--channels", "16",
    "--channel-mult", "1,2", "--attention", "4", "--layers-per-block", "1",
    "--checkpoint-every", "2", "--cond", "label", "--cond-drop", "0.3", "--warmup", "2",
]  # fmt: skip


def run(args, tmp_path, name, processes=1):
    out = tmp_path / name
    launcher = [sys.executable, "-m", "difusion"]
    if processes > 1:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(processes), "-m", "difusion",
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, *COMMON, "--out", str(out), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


def test_two_processes_on_half_batches_reach_one_process_weights(tmp_path):
    one, _ = run(["--batch-size", "8"], tmp_path, "one")
    two, stdout = run(["--batch-size", "2", "--grad-accum", "2"], tmp_path, "two", processes=2)
    assert "x2 processes" in stdout
    assert "global batch 8 (2 per batch x 2 processes x 2 accumulated batches), lr 0.0002" in stdout
    # what the networks compute (their weights differ where they have no gradient)
    torch.testing.assert_close(outputs_of(one), outputs_of(two), atol=1e-5, rtol=0)
    logs = [
        [json.loads(line) for line in (p / "log.jsonl").read_text().splitlines()]
        for p in (one, two)
    ]
    assert [r["step"] for r in logs[1]] == [4]  # the last step, logged once: rank 0 alone writes
    assert abs(logs[0][0]["loss"] - logs[1][0]["loss"]) < 1e-6  # the mean over both processes
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    model = DiffusionModel.load(two / "model.safetensors")
    assert model.sample(1, steps=2, cond=model.label_cond([3])[0]).shape == (1, 1, 8, 8)
