"""The same training command under torchrun: two processes on the CPU (gloo)."""

import json
import os
import subprocess
import sys

from difusion.model import DiffusionModel


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "difusion.cli", "train", "--data", "digits", "--size", "8", "--out", str(out),
        "--steps", "3", "--batch-size", "4", "--channels", "16", "--channel-mult", "1,2",
        "--attention", "4", "--layers-per-block", "1", "--checkpoint-every", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x2 processes" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3]  # the last step, logged once: rank 0 alone writes
    model = DiffusionModel.load(out / "model.safetensors")
    assert model.sample(1, steps=2).shape == (1, 1, 8, 8)
