"""ComfyUI's sampler and scheduler names, each mapped to a diffusers scheduler configuration.

Named for what it holds: the translation table into diffusers' scheduler classes (the nodes are
in ksampler.py, the loop that drives a scheduler in denoise.py). A later sampling core is to
replace this table, the loop and the nodes' use of them together.

ComfyUI splits a sampler (the solver) from a scheduler (the spacing of noise levels); diffusers
folds both into one scheduler class plus flags. The mapping follows diffusers' own table
(docs/source/en/api/schedulers/overview.md). Outputs are not bit-exact with ComfyUI's k-diffusion
samplers; they are the same methods.
"""

from __future__ import annotations

import inspect
from typing import Any

# sampler_name -> (diffusers class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    # diffusers' own pipelines turn clip_sample off for SD: latents are not in -1..1.
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "deis": ("DEISMultistepScheduler", {}),
    # Deterministic DDIM is the Euler step of the same ODE in sigma space, which is how ComfyUI
    # runs "ddim" too; diffusers' DDIMScheduler assumes an even timestep stride, which the
    # "normal" (linspace) spacing breaks.
    "ddim": ("EulerDiscreteScheduler", {}),
    # bh1's last step divides by a zero sigma; ending at sigma_min keeps it finite.
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
}

# scheduler -> config flags. "normal" spaces timesteps evenly over the whole range, "simple" and
# "sgm_uniform" count back from the last training step, "ddim_uniform" from the first.
SCHEDULERS: dict[str, dict[str, Any]] = {
    # Sigma schedules span the whole range (sigma_max to sigma_min) as ComfyUI's do; with a
    # checkpoint's "leading" spacing diffusers would start them far below sigma_max.
    "normal": {"timestep_spacing": "linspace"},
    "karras": {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    "exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    "beta": {"use_beta_sigmas": True, "timestep_spacing": "linspace"},
    "simple": {"timestep_spacing": "trailing"},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "ddim_uniform": {"timestep_spacing": "leading"},
}

SIGMA_SCHEDULES = ("karras", "exponential", "beta")
# diffusers' classes for these samplers work on timesteps and take no sigma schedule.
NO_SIGMA_SCHEDULES = frozenset({"euler_ancestral", "ddpm"})
# Longest schedule (steps / denoise) a sampler's diffusers class can lay out: DDPM steps over
# training timesteps one stride at a time; every schedule is capped to keep memory sane.
MAX_SCHEDULE = {"ddpm": 500}
MAX_SCHEDULE_ANY = 10000


def check_combination(sampler_name: str, scheduler: str, schedule_length: int = 1) -> str | None:
    """The reason a sampler/scheduler pair (over a schedule of that many steps) cannot run,
    or None when it can."""
    if scheduler in SIGMA_SCHEDULES and sampler_name in NO_SIGMA_SCHEDULES:
        usable = ", ".join(s for s in SCHEDULERS if s not in SIGMA_SCHEDULES)
        return (
            f"scheduler {scheduler!r} needs a sigma schedule, which sampler {sampler_name!r} "
            f"({SAMPLERS[sampler_name][0]}) does not take; use one of {usable}"
        )
    limit = MAX_SCHEDULE.get(sampler_name, MAX_SCHEDULE_ANY)
    if schedule_length > limit:
        return (
            f"a schedule of {schedule_length} steps (steps / denoise) is longer than sampler "
            f"{sampler_name!r} allows ({limit})"
        )
    return None


def make_scheduler(sampler_name: str, scheduler: str, base_config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler for the pair, built on the checkpoint's noise schedule."""
    import diffusers

    reason = check_combination(sampler_name, scheduler)
    if reason:
        raise ValueError(reason)
    class_name, extra = SAMPLERS[sampler_name]
    cls = getattr(diffusers, class_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in base_config.items() if not k.startswith("_") and k in accepted}
    config.update({k: v for k, v in {**extra, **SCHEDULERS[scheduler]}.items() if k in accepted})
    return cls(**config)


def takes_generator(scheduler: Any) -> bool:
    """Whether the scheduler's step() draws noise (ancestral and SDE samplers do)."""
    return "generator" in inspect.signature(scheduler.step).parameters
