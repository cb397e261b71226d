"""What the half-log-SNR solvers need of a model's parameterisation beyond base.py's contract.

ModelSamplingLike offers timestep/sigma but no percent_to_sigma, and SA-Solver gives its
stochastic interval in percents of the schedule (as ComfyUI's SamplerSASolver does). And a flow
schedule starts at sigma = 1, where the signal is gone and lambda = log((1 - sigma) / sigma) is
-inf; the SDE solvers of the DPM-Solver family (dpmpp_sde, 2m/3m SDE, ER-SDE, SEEDS, SA-Solver)
then start from the sigma at percent 1e-4 instead, as ComfyUI's do.
"""

from __future__ import annotations

import math

import torch

from plinth.nodes.sampling.base import ModelSamplingLike

FIRST_SIGMA_PERCENT = 1e-4


def percent_to_sigma(model_sampling: ModelSamplingLike, percent: float) -> float:
    """The sigma `percent` of the way through the model's timesteps, 0 being the noisy end.

    Timesteps run linearly from timestep(sigma_max) down to the lowest one, mapped back through
    model_sampling.sigma: timestep(sigma_min) for discrete (0..999) and continuous EDM (0.25 log
    sigma) models, 0 (sigma 0) for flow models. That is ComfyUI's percent_to_sigma for each kind.
    """
    if percent <= 0:
        return 1.0 if model_sampling.flow else math.inf
    if percent >= 1:
        return 0.0
    top = model_sampling.timestep(torch.tensor(float(model_sampling.sigma_max))).double()
    if model_sampling.flow:
        bottom = torch.zeros_like(top)
    else:
        bottom = model_sampling.timestep(torch.tensor(float(model_sampling.sigma_min))).double()
    return float(model_sampling.sigma(bottom + (1 - percent) * (top - bottom)))


def offset_first_sigma(sigmas: torch.Tensor, model_sampling: ModelSamplingLike) -> torch.Tensor:
    """The schedule with a flow model's first sigma moved off 1, where lambda is -inf."""
    if not model_sampling.flow or len(sigmas) < 2 or float(sigmas[0]) < 1:
        return sigmas
    sigmas = sigmas.clone()
    sigmas[0] = percent_to_sigma(model_sampling, FIRST_SIGMA_PERCENT)
    return sigmas
