"""Schedulers: the sigmas a run steps through, made from a model's ModelSampling.

ComfyUI's nine scheduler names, with its definitions (so a workflow's "karras, 20 steps" means
the same noise levels here): every schedule runs from high to low noise and ends with 0.
- simple: evenly spaced entries of the model's own sigma table, counted back from the top.
- sgm_uniform / normal: evenly spaced model times from sigma_max to sigma_min (sgm_uniform
  leaves out the last point; normal keeps it, and drops the 0 when it is already there).
- karras: Karras et al. 2022, rho 7. exponential: evenly spaced in log sigma.
- ddim_uniform: every (table length / steps)-th table entry from the bottom, as DDIM spaces them.
- beta: table entries at quantiles of a Beta(0.6, 0.6) (Lee et al. 2024, "Beta Sampling is
  All You Need"), repeats dropped.
- linear_quadratic: linear then quadratic in 1 - sigma (Mochi's), scaled to sigma_max.
- kl_optimal: tan of evenly spaced arctan sigma (Sabour et al. 2024, "Align Your Steps").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from plinth.nodes.sampling.model_sampling import ModelSampling


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((high + ramp * (low - high)) ** rho)


def exponential(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    stride = len(ms.table) / steps
    return _with_zero(torch.stack([ms.table[-(1 + int(i * stride))] for i in range(steps)]))


def _normal(ms: ModelSampling, steps: int, sgm: bool) -> torch.Tensor:
    start = ms.timestep(torch.tensor(ms.sigma_max))
    end = ms.timestep(torch.tensor(ms.sigma_min))
    if sgm:
        times = torch.linspace(float(start), float(end), steps + 1)[:-1]
        return _with_zero(torch.stack([ms.sigma(t).float() for t in times]))
    ends_at_zero = math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5)
    times = torch.linspace(float(start), float(end), steps + 1 if ends_at_zero else steps)
    sigmas = torch.stack([ms.sigma(t).float() for t in times])
    return sigmas if ends_at_zero else _with_zero(sigmas)


def normal(ms: ModelSampling, steps: int) -> torch.Tensor:
    return _normal(ms, steps, sgm=False)


def sgm_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    return _normal(ms, steps, sgm=True)


def ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    stride = max(len(ms.table) // steps, 1)
    first = 0 if ms.flow else 1
    picked = [ms.table[i] for i in range(first, len(ms.table), stride)]
    return _with_zero(torch.stack(picked[::-1]))


def beta(ms: ModelSampling, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    import scipy.stats

    last = len(ms.table) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    indices = np.rint(scipy.stats.beta.ppf(quantiles, alpha, beta_) * last)
    picked: list[torch.Tensor] = []
    previous = -1.0
    for index in indices:
        if index != previous:
            picked.append(ms.table[int(index)])
        previous = index
    return _with_zero(torch.stack(picked))


def linear_quadratic(ms: ModelSampling, steps: int, threshold: float = 0.025, linear_steps: int | None = None):
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear = steps // 2 if linear_steps is None else linear_steps
        quadratic = steps - linear
        step_diff = linear - threshold * steps
        quad_coef = step_diff / (linear * quadratic**2)
        lin_coef = threshold / linear - 2 * step_diff / quadratic**2
        const = quad_coef * linear**2
        ramp = [i * threshold / linear for i in range(linear)]
        ramp += [quad_coef * i**2 + lin_coef * i + const for i in range(linear, steps)]
        schedule = [1.0 - x for x in [*ramp, 1.0]]
    return torch.tensor(schedule, dtype=torch.float32) * ms.sigma_max


def kl_optimal(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    fraction = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)
    sigmas = (fraction * math.atan(sigma_min) + (1 - fraction) * math.atan(sigma_max)).tan()
    return _with_zero(sigmas)


SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": lambda ms, n: karras(n, ms.sigma_min, ms.sigma_max),
    "exponential": lambda ms, n: exponential(n, ms.sigma_min, ms.sigma_max),
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": lambda ms, n: kl_optimal(n, ms.sigma_min, ms.sigma_max),
}


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int, discard_penultimate: bool = False) -> torch.Tensor:
    """The full schedule of `steps` steps (steps + 1 sigmas, last 0). discard_penultimate lays
    out steps + 1 steps and drops the second-to-last sigma, as ComfyUI's KSampler does for the
    samplers that ask for it (Sampler.discard_penultimate_sigma)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; one of {', '.join(SCHEDULERS)}")
    if not discard_penultimate:
        return SCHEDULERS[scheduler](ms, steps).float()
    sigmas = SCHEDULERS[scheduler](ms, steps + 1).float()
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def denoise_sigmas(
    ms: ModelSampling, scheduler: str, steps: int, denoise: float, discard_penultimate: bool = False
) -> torch.Tensor:
    """KSampler's and BasicScheduler's schedule: with denoise < 1, the last steps + 1 sigmas of a
    schedule of steps / denoise steps (so only the low-noise end runs); none at denoise 0."""
    if denoise > 0.9999:
        return calculate_sigmas(ms, scheduler, steps, discard_penultimate)
    if denoise <= 0.0:
        return torch.zeros(0)
    return calculate_sigmas(ms, scheduler, int(steps / denoise), discard_penultimate)[-(steps + 1) :]


def schedule_length(steps: int, denoise: float) -> int:
    """Steps of the full schedule KSampler lays out for (steps, denoise): the cost check's input."""
    return steps if denoise > 0.9999 or denoise <= 0 else int(steps / denoise)
