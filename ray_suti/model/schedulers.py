"""Samplers: any of diffusers' own scheduler classes, chosen by name from an allow-list.

Names are diffusers' class names (``EulerAncestralDiscreteScheduler``) or the short aliases below;
nothing outside the allow-list is ever imported, so a name from an HTTP request or a command line
cannot reach arbitrary code. Switching keeps the noise schedule the model was trained with (beta
schedule, prediction type, timestep spacing): only the solver changes.
"""
from __future__ import annotations

from .presets import SuTIConfig

# SuTIPipeline's guidance_mode: three branches a step, or two (interleaved; Re-Imagen's literal rule)
GUIDANCE_MODES = ("branches", "interleaved", "reimagen")

# diffusers' schedulers for UNet2DConditionModel pipelines (KarrasDiffusionSchedulers and kin)
SCHEDULER_CLASSES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler", "EDMEulerScheduler",
    "TCDScheduler", "LCMScheduler",
)
ALIASES = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
           "euler-a": "EulerAncestralDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
           "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler", "heun": "HeunDiscreteScheduler",
           "lms": "LMSDiscreteScheduler", "deis": "DEISMultistepScheduler"}
SCHEDULER_NAMES = tuple(ALIASES) + SCHEDULER_CLASSES


def check_scheduler(name: str) -> str:
    """An allowed scheduler name -> diffusers' class name; ValueError listing the choices otherwise.
    Imports no diffusers: drivers check a name before any work starts without paying for it."""
    class_name = ALIASES.get(name, name)
    if class_name not in SCHEDULER_CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return class_name


def scheduler_class(name: str):
    """An allowed scheduler name -> its diffusers class; ValueError listing the choices otherwise."""
    import diffusers

    return getattr(diffusers, check_scheduler(name))


def _overrides(class_name: str, latent: bool) -> dict:
    if class_name == "DDIMScheduler":
        return dict(clip_sample=not latent, set_alpha_to_one=False)
    if class_name == "DPMSolverMultistepScheduler":
        return dict(algorithm_type="dpmsolver++", solver_order=2)
    return {}


def make_scheduler(name: str, config: SuTIConfig):
    """A fresh scheduler on the preset's noise schedule."""
    cls = scheduler_class(name)
    return cls(num_train_timesteps=1000, beta_schedule=config.beta_schedule, prediction_type=config.prediction_type,
               timestep_spacing="trailing", **_overrides(cls.__name__, config.latent))


def switch_scheduler(current, name: str, latent: bool):
    """Another sampler on ``current``'s noise schedule."""
    cls = scheduler_class(name)
    return cls.from_config(current.config, **_overrides(cls.__name__, latent))
