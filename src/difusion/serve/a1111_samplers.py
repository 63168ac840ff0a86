"""AUTOMATIC1111's sampler and scheduler names -> the nearest of the project's samplers and
sigma spacings. Every name its web UI has listed (1.0 to 1.10: the k-diffusion samplers, with
and without " Karras", and DDIM, PLMS, UniPC, LCM) is served; the answer reports what ran."""

from __future__ import annotations

import re

from ..samplers import SAMPLERS
from .errors import APIError

# AUTOMATIC1111's name -> (ours, its k-diffusion aliases, what differs where it is not the
# same method)
SAMPLER_NAMES: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "DPM++ 2M": ("dpmpp_2m", ("k_dpmpp_2m",), None),
    "Euler a": ("euler_ancestral", ("k_euler_a", "k_euler_ancestral"), None),
    "Euler": ("euler", ("k_euler",), None),
    "Heun": ("heun", ("k_heun",), None),
    "DDIM": ("ddim", (), None),
    "LCM": ("lcm", ("k_lcm",), None),
    "LMS": ("dpmpp_2m", ("k_lms",), "a linear multistep ODE solver: DPM++ 2M is one"),
    "PLMS": ("dpmpp_2m", (), "a linear multistep ODE solver: DPM++ 2M is one"),
    "UniPC": ("dpmpp_2m", (), "a multistep predictor-corrector: DPM++ 2M is the multistep"),
    "DPM2": ("heun", ("k_dpm_2",), "a second-order ODE step: Heun's is one"),
    "DPM2 a": ("euler_ancestral", ("k_dpm_2_a",), "a second-order ancestral step"),
    "DPM++ 2S a": ("euler_ancestral", ("k_dpmpp_2s_a",), "a second-order ancestral step"),
    "DPM++ SDE": ("euler_ancestral", ("k_dpmpp_sde",), "fresh noise at every step"),
    "DPM++ 2M SDE": ("dpmpp_2m", ("k_dpmpp_2m_sde",), "DPM++ 2M without the added noise"),
    "DPM++ 2M SDE Heun": ("dpmpp_2m", ("k_dpmpp_2m_sde_heun",), "DPM++ 2M, no added noise"),
    "DPM++ 3M SDE": ("dpmpp_2m", ("k_dpmpp_3m_sde",), "DPM++ 2M, one order lower, no noise"),
    "DPM fast": ("dpmpp_2m", ("k_dpm_fast",), "DPM-Solver at fixed steps: DPM++ 2M"),
    "DPM adaptive": ("dpmpp_2m", ("k_dpm_ad",), "DPM-Solver, fixed steps instead of adaptive"),
    "Restart": ("heun", ("restart",), "Heun's steps without the restarts"),
    "DDIM CFG++": ("ddim", (), "DDIM with plain classifier-free guidance"),
}
# AUTOMATIC1111's schedulers (1.9 on; before, a " Karras" or " Exponential" suffix on the
# sampler's name) -> our sigma spacings; None: the model's own
SCHEDULERS: dict[str, str | None] = {
    "Automatic": None,
    "Karras": "karras",
    "Exponential": "karras",  # log-even sigmas: Karras's with rho -> infinity; ours has rho 7
    "Polyexponential": "karras",
    "Uniform": "linspace",
    "Normal": "linspace",
    "SGM Uniform": "trailing",
    "Simple": "trailing",
    "DDIM": "leading",
}


def key(name: str) -> str:
    return re.sub(r"\s+", " ", name).strip().casefold()


BY_KEY = {key(n): n for n in SAMPLER_NAMES} | {
    key(a): n for n, (_, aliases, _) in SAMPLER_NAMES.items() for a in aliases
}
SCHEDULER_BY_KEY = {key(n): n for n in SCHEDULERS}


def resolve(
    name: str | None, scheduler: str | None, field: str = "sampler_name"
) -> tuple[str | None, str | None, str | None]:
    """A client's sampler (and scheduler) -> (our sampler, our spacing, a note on what ran
    for the answer's info); None for both: the model's own. A name none of these matches is a
    422 that repeats it and lists the names accepted."""
    spacing, note = None, None
    if scheduler is not None and key(scheduler) not in SCHEDULER_BY_KEY:
        raise APIError(
            422, f"unknown scheduler {scheduler!r}; this server takes {', '.join(SCHEDULERS)}",
            "scheduler",
        )  # fmt: skip
    if scheduler is not None:
        spacing = SCHEDULERS[SCHEDULER_BY_KEY[key(scheduler)]]
    if not name:
        return None, spacing, None
    if name in SAMPLERS:  # the project's own names pass as they are
        return name, spacing, None
    wanted = key(name)
    for suffix in (" karras", " exponential"):
        if wanted.endswith(suffix) and wanted.removesuffix(suffix) in BY_KEY:
            wanted, spacing = wanted.removesuffix(suffix), "karras"
    if wanted not in BY_KEY:
        raise APIError(
            422, f"unknown sampler {name[:60]!r}; this server takes {', '.join(SAMPLER_NAMES)} "
            "(any case; each also with ' Karras' for Karras sigmas)", field,
        )  # fmt: skip
    a1111 = BY_KEY[wanted]
    ours, _, differs = SAMPLER_NAMES[a1111]
    note = f"{ours}" + (f" ({differs})" if differs else "")
    if spacing is not None:
        note += f", {spacing} sigmas"
    return ours, spacing, note


def listing() -> list[dict]:
    """GET /sdapi/v1/samplers: each name with its aliases and what it runs here."""
    return [
        {"name": n, "aliases": [ours, *aliases], "options": {"runs": ours, **(
            {"differs": differs} if differs else {})}}
        for n, (ours, aliases, differs) in SAMPLER_NAMES.items()
    ]  # fmt: skip


def scheduler_listing() -> list[dict]:
    """GET /sdapi/v1/schedulers."""
    return [
        {"name": n.lower().replace(" ", "_"), "label": n, "aliases": None,
         "default_rho": 7.0 if spacing == "karras" else -1, "need_inner_model": False,
         "runs": spacing or "the model's own"}
        for n, spacing in SCHEDULERS.items()
    ]  # fmt: skip
