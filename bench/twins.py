"""Our models and their diffusers twins: the same architecture holding the same weights.

Our U-Net's state-dict keys are diffusers' (see `difusion.nn.unet`), so a twin is diffusers'
model built from `UNetConfig.to_diffusers_kwargs()` and loaded strictly with our weights.
Our layout map has no diffusers counterpart: `without_layout_map` gives the model that both
libraries can run.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from difusion.model import DiffusionModel, ModelConfig
from difusion.nn.unet import UNet

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def diffusers_twin(unet: UNet) -> nn.Module:
    """diffusers' UNet2DConditionModel (text-conditioned) or UNet2DModel holding `unet`'s
    weights, in its dtype and train/eval mode."""
    cfg = unet.config
    cls = UNet2DConditionModel if cfg.context_dim is not None else UNet2DModel
    twin = cls(**cfg.to_diffusers_kwargs())
    twin.load_state_dict(unet.state_dict(), strict=True)
    dtype = next(unet.parameters()).dtype
    # nn.Module's `to`: diffusers' own warns of float32-only modules, of which this has none
    return nn.Module.to(twin, dtype).train(unet.training)


def without_layout_map(model: DiffusionModel) -> DiffusionModel:
    """`model` without its layout map (a different function once the map is trained): every
    other weight, the schedule and the text encoder the same."""
    if not model.config.unet.layout_map:
        return model
    unet_cfg = replace(model.config.unet, layout_map=False)
    with torch.device("meta"):
        unet = UNet(unet_cfg)
    state = {k: v for k, v in model.unet.state_dict().items() if "layout_" not in k}
    unet.load_state_dict(state, strict=True, assign=True)
    out = DiffusionModel(replace(model.config, unet=unet_cfg), unet, model.text_encoder)
    return out.to(memory_format=torch.channels_last).train(model.training)


def dpm_solver_scheduler(model: DiffusionModel) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++(2M) set up as our "dpmpp_2m" runs `model`: the same betas
    (zero terminal SNR kept finite as both libraries do), prediction and timestep spacing; the
    x0 clamp of pixel models (`clip_x0`) as thresholding at 1, which is a clamp to [-1, 1];
    a first-order last step to sigma 0."""
    config: ModelConfig = model.config
    return DPMSolverMultistepScheduler(
        num_train_timesteps=model.schedule.num_steps,
        trained_betas=model.schedule.betas.tolist(),
        rescale_betas_zero_snr=config.schedule.zero_terminal_snr,
        prediction_type=PREDICTION_TYPES[config.prediction],
        timestep_spacing=config.spacing,
        steps_offset=config.steps_offset,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=config.clip_x0,
        sample_max_value=1.0,
        final_sigmas_type="zero",
        lower_order_final=True,
    )
