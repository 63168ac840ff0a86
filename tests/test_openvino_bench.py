"""bench/openvino_peer.py's OpenVINO side: its conversion of diffusers' U-Net agrees with
diffusers at f32, and its self-check refuses a conversion that does not."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import openvino_peer as peer  # noqa: E402
from sd_unet import build, step_inputs  # noqa: E402

TOLERANCE = 1e-5  # relative; f32 in both, summed in a different order
SIZE = 8


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    unet = build("diffusers", peer.TINY_UNET)
    x, context = step_inputs(SIZE, peer.TINY_UNET)
    t = torch.full((2,), peer.TIMESTEP)
    with torch.no_grad():
        ref = peer.Traceable(unet, sinusoid=False)(x, t, context)
    return unet, x, t, context, ref


@pytest.fixture(scope="module")
def converted(case):
    unet, x, t, context, _ = case
    return {
        c: peer.convert(unet, x, t, context, c, peer.TINY_UNET) for c in ("timestep", "sinusoid")
    }


def run(model, conversion, x, t, context, precision="f32") -> torch.Tensor:
    compiled = peer.compile_cpu(model, precision)
    return peer.openvino_step(compiled, conversion, peer.TINY_UNET, x, t, context)()


@pytest.mark.parametrize("conversion", ["timestep", "sinusoid"])
def test_f32_conversion_equals_diffusers_and_passes_the_check(case, converted, conversion):
    unet, x, t, context, ref = case
    y = run(converted[conversion], conversion, x, t, context)
    assert y.shape == ref.shape
    assert peer.relative_error(y, ref) < TOLERANCE
    assert peer.check(y, ref, conversion) < TOLERANCE
    # the patched time embedding was for the conversion only
    with torch.no_grad():
        again = peer.Traceable(unet, sinusoid=False)(x, t, context)
    assert torch.equal(again, ref)


def test_check_refuses_wrong_weights(case):
    _, x, t, context, ref = case
    other = build("diffusers", peer.TINY_UNET)
    with torch.no_grad():
        other.conv_in.weight.mul_(1.1)
    model = peer.convert(other, x, t, context, "timestep", peer.TINY_UNET)
    with pytest.raises(ValueError, match="conversion is wrong, not timing it"):
        peer.check(run(model, "timestep", x, t, context), ref, "OpenVINO")


def test_check_refuses_wrong_inputs(case, converted):
    _, x, t, context, ref = case
    y = run(converted["timestep"], "timestep", x, t, context.flip(0))  # contexts swapped
    with pytest.raises(ValueError, match="conversion is wrong"):
        peer.check(y, ref, "OpenVINO")
    with pytest.raises(ValueError, match="output shape"):
        peer.check(y[:1], ref, "OpenVINO")


def test_bf16_sinusoid_fed_in_keeps_the_timestep(case, converted):
    """OpenVINO's bf16 rounds the timestep inside the graph (981 -> 980); the sinusoid made in
    float32 outside it keeps bf16's error at bf16's rounding of the activations."""
    _, x, t, context, ref = case
    err = {c: peer.relative_error(run(m, c, x, t, context, "bf16"), ref)
           for c, m in converted.items()}  # fmt: skip
    assert err["sinusoid"] < 5e-2
    assert err["sinusoid"] < err["timestep"]


def test_report_sets_eager_and_compiled_against_openvinos_fastest_conversion():
    from report import summary

    variants = {
        "OpenVINO bf16": {"seconds": 4.6, "rel_err": 0.14},
        "OpenVINO bf16, sinusoid fed in f32": {"seconds": 4.4, "rel_err": 0.016},
    }
    record = {"kind": "openvino_unet_step", "precision": "bf16", "weights": "bf16", "size": 64,
              "flops": 1.6e12, "ours_s": 5.5, "ours_rel_err": 0.017, "ours_compiled_s": 4.0,
              "ours_compiled_rel_err": 0.012, "variants": variants}  # fmt: skip
    rows = summary([{"records": [record]}]).splitlines()[2:]
    assert len(rows) == 2
    eager, compiled = (row.split(" | ") for row in rows)
    assert eager[0] == "| SD 1.5 U-Net step, ours / OpenVINO (4x64x64)"
    assert compiled[0] == "| SD 1.5 U-Net step, ours compiled / OpenVINO (4x64x64)"
    assert eager[1] == compiled[1] == "bf16 weights"
    assert (eager[2], compiled[2]) == (f"{4.4 / 5.5:.2f}", f"{4.4 / 4.0:.2f}")  # the fastest
    assert compiled[5].startswith("1e-02 / 2e-02")  # its error beside
