"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) as ComfyUI offers it: the single-step 2S with
ancestral noise, the stochastic dpmpp_sde, the multistep 2M, and the CFG++ forms of 2S and 2M.

For data prediction with a constant x0 estimate the exact step from sigma to sigma' is
x' = x0 + (sigma' / sigma) (x - x0) for epsilon and flow models alike; 2S and 2M are that step
towards a corrected estimate, so they are written in that form. CFG++ (Chung et al. 2024) moves
towards the guided estimate but takes the noise direction from the unguided one
(model.last_uncond). dpmpp_sde works in the half-log-SNR lambda (flow-aware, base.half_log_snr)
and draws its noise from the seeded Brownian tree; 2S draws fresh Gaussian noise per step.
"""

from __future__ import annotations

from functools import partial

import torch

from plinth.nodes.sampling.base import (
    Denoise,
    NoiseSampler,
    Sampler,
    SamplerRun,
    ancestral_step,
    flow_ancestral_step,
    half_log_snr,
    sigma_of_half_log_snr,
    signal_scale,
)
from plinth.nodes.sampling.snr import offset_first_sigma

FLOW_START_MIDPOINT = 0.9999  # 2S's midpoint from sigma = 1 of a flow model, where lambda is -inf


def unguided_estimate(model: Denoise, sampler: str) -> torch.Tensor:
    """The unguided x0 estimate of the model's last call, which the CFG++ samplers step along."""
    if model.last_uncond is None:
        raise ValueError(f"sampler {sampler!r} needs the unguided estimate (last_uncond) the guider did not set")
    return model.last_uncond


def towards(x: torch.Tensor, x0: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """x0 + ratio (x - x0): the exact step to sigma' = ratio * sigma for a constant estimate x0."""
    return x0 + ratio * (x - x0)


def sample_dpmpp_2s_ancestral(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    cfg_pp: bool = False,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2S): a midpoint evaluation halfway in lambda to the ancestral step's
    sigma_down, then the step with the midpoint's estimate, then fresh noise back up to sigma'."""
    flow = model.model_sampling.flow
    name = "dpmpp_2s_ancestral_cfg_pp" if cfg_pp else "dpmpp_2s_ancestral"
    noise = noise_sampler or run.gaussian(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        target = unguided_estimate(model, name) if cfg_pp else denoised
        if flow:
            sigma_down, alpha_ratio, sigma_up = flow_ancestral_step(sigma, sigma_next, eta)
        else:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            alpha_ratio = torch.ones_like(sigma)
        if float(sigma_down) == 0:
            x_next = target
        else:
            if flow and float(sigma) >= 1:
                sigma_mid = sigma.new_tensor(FLOW_START_MIDPOINT)
            else:
                lam_mid = (half_log_snr(sigma, flow) + half_log_snr(sigma_down, flow)) / 2
                sigma_mid = sigma_of_half_log_snr(lam_mid, flow)
            mid_denoised = model(towards(x, target, sigma_mid / sigma), sigma_mid)
            if cfg_pp:
                mid_denoised = unguided_estimate(model, name)
            x_next = towards(x, mid_denoised, sigma_down / sigma)
        if float(sigma_next) > 0 and eta > 0:
            x_next = alpha_ratio * x_next + noise(sigma, sigma_next) * s_noise * sigma_up
        if cfg_pp:
            x_next = x_next + signal_scale(sigma_next, flow) * (denoised - target)
        x = x_next
        run.step(i, x, denoised)
    return x


def ancestral_substep(
    x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_to: torch.Tensor, eta: float, flow: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dpmpp_sde's first-order step from sigma to sigma_to towards x0, going only as far as the
    ancestral step's sigma_down (taken in sigma / alpha, the variance-exploding noise level).
    Returns the new x and the scale of the noise to add to it."""
    lam, lam_to = half_log_snr(sigma, flow), half_log_snr(sigma_to, flow)
    sigma_down, sigma_up = ancestral_step(torch.exp(-lam), torch.exp(-lam_to), eta)
    h = -torch.log(sigma_down) - lam
    alpha, alpha_to = signal_scale(sigma, flow), signal_scale(sigma_to, flow)
    return (alpha_to / alpha) * torch.exp(-h) * x - alpha_to * torch.expm1(-h) * x0, alpha_to * sigma_up


def sample_dpmpp_sde(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2S) as an SDE: an evaluation at the fraction r of the step in lambda, then
    the step with the estimates mixed 1 - 1/(2r) : 1/(2r), each stage with ancestral noise."""
    if len(sigmas) <= 1:
        return x
    model_sampling = model.model_sampling
    flow = model_sampling.flow
    noise = noise_sampler or run.brownian(x, sigmas)
    sigmas = offset_first_sigma(sigmas, model_sampling)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if float(sigma_next) == 0:
            x = denoised
        else:
            lam, lam_next = half_log_snr(sigma, flow), half_log_snr(sigma_next, flow)
            sigma_mid = sigma_of_half_log_snr(lam + r * (lam_next - lam), flow)
            x_mid, mid_up = ancestral_substep(x, denoised, sigma, sigma_mid, eta, flow)
            if inject:
                x_mid = x_mid + noise(sigma, sigma_mid) * s_noise * mid_up
            mid_denoised = model(x_mid, sigma_mid)
            mixed = torch.lerp(denoised, mid_denoised, 1 / (2 * r))
            x, up = ancestral_substep(x, mixed, sigma, sigma_next, eta, flow)
            if inject:
                x = x + noise(sigma, sigma_next) * s_noise * up
        run.step(i, x, denoised)
    return x


def sample_dpmpp_2m(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, *, cfg_pp: bool = False
) -> torch.Tensor:
    """DPM-Solver++(2M): after the first step, the estimate is extrapolated linearly in lambda =
    -log sigma from the last step's, with weight h / (2 h_last) (k-diffusion's form, used by
    ComfyUI for every parameterisation)."""
    previous: torch.Tensor | None = None  # the estimate the last step stepped along
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        target = unguided_estimate(model, "dpmpp_2m_cfg_pp") if cfg_pp else denoised
        if float(sigma_next) == 0:
            x = denoised
        else:
            ratio = sigma_next / sigma
            x_next = denoised + ratio * (x - target)
            if previous is not None:
                h, h_last = torch.log(sigma / sigma_next), torch.log(sigmas[i - 1] / sigma)
                x_next = x_next + (1 - ratio) * h / (2 * h_last) * (denoised - previous)
            x = x_next
        previous = target
        run.step(i, x, denoised)
    return x


ANCESTRAL = (("eta", 1.0), ("s_noise", 1.0))
SAMPLERS: dict[str, Sampler] = {
    "dpmpp_2s_ancestral": Sampler("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral, ANCESTRAL),
    "dpmpp_2s_ancestral_cfg_pp": Sampler(
        "dpmpp_2s_ancestral_cfg_pp", partial(sample_dpmpp_2s_ancestral, cfg_pp=True), ANCESTRAL
    ),
    "dpmpp_sde": Sampler("dpmpp_sde", sample_dpmpp_sde, (*ANCESTRAL, ("r", 0.5))),
    "dpmpp_sde_gpu": Sampler("dpmpp_sde_gpu", sample_dpmpp_sde, (*ANCESTRAL, ("r", 0.5))),
    "dpmpp_2m": Sampler("dpmpp_2m", sample_dpmpp_2m),
    "dpmpp_2m_cfg_pp": Sampler("dpmpp_2m_cfg_pp", partial(sample_dpmpp_2m, cfg_pp=True)),
}
