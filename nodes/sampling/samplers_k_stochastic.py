"""k-diffusion's samplers that add fresh noise each step (ancestral, DDPM, LCM) and the CFG++
Euler samplers.

An ancestral step goes deterministically to a lower sigma_down and adds noise back up to the
next sigma. Epsilon models do that in variance-exploding form (base.ancestral_step); flow models,
whose signal shrinks as noise grows, take ComfyUI's rectified-flow branch (base.flow_ancestral_step).
CFG++ (Chung et al. 2024) steps along the guided x0 estimate but re-noises with the unguided one,
which the denoiser leaves in `model.last_uncond`. All noise is drawn from the run's seed.
"""

from __future__ import annotations

import torch

from plinth.nodes.sampling.base import (
    Denoise,
    SamplerRun,
    ancestral_step,
    flow_ancestral_step,
    signal_scale,
    to_d,
)


def sample_euler_ancestral(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, eta: float = 1.0, s_noise: float = 1.0
) -> torch.Tensor:
    """Euler steps to sigma_down, then noise up to the next sigma."""
    noise = run.gaussian(x)
    flow = model.model_sampling.flow
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if flow:
            sigma_down, alpha_ratio, renoise = flow_ancestral_step(sigma, sigma_next, eta)
            x = sigma_down / sigma * x + (1 - sigma_down / sigma) * denoised
            if eta > 0 and float(sigma_next) > 0:
                x = alpha_ratio * x + noise(sigma, sigma_next) * s_noise * renoise
        else:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            if float(sigma_down) == 0:
                x = denoised
            else:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
                x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        run.step(i, x, denoised)
    return x


def sample_dpm_2_ancestral(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, eta: float = 1.0, s_noise: float = 1.0
) -> torch.Tensor:
    """DPM-2 midpoint steps to sigma_down, then noise up to the next sigma (flow models scale the
    signal down first, as in ComfyUI's rectified-flow branch)."""
    noise = run.gaussian(x)
    flow = model.model_sampling.flow
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if flow:
            sigma_down, alpha_ratio, sigma_up = flow_ancestral_step(sigma, sigma_next, eta)
        else:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            alpha_ratio = torch.ones_like(sigma)
        d = to_d(x, sigma, denoised)
        if float(sigma_down) == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = (sigma * sigma_down) ** 0.5
            x_2 = x + d * (sigma_mid - sigma)
            x = x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_down - sigma)
            if eta > 0:
                x = alpha_ratio * x + noise(sigma, sigma_next) * s_noise * sigma_up
        run.step(i, x, denoised)
    return x


def _unguided(model: Denoise, denoised: torch.Tensor) -> torch.Tensor:
    """The unguided x0 estimate of the last call; where the guider has none (no negative), the
    guided estimate is also the unguided one."""
    return denoised if model.last_uncond is None else model.last_uncond


def _ve_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """base.ancestral_step, also at an infinite sigma_from (a flow model's sigma 1 seen in
    variance-exploding form), where its limit is sigma_up = min(1, eta) sigma_to."""
    if not torch.isinf(sigma_from) or not eta:
        return ancestral_step(sigma_from, sigma_to, eta)
    sigma_up = sigma_to * min(1.0, eta)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral_cfg_pp(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, eta: float = 1.0, s_noise: float = 1.0
) -> torch.Tensor:
    """CFG++ Euler ancestral: x_next = alpha_next (D + sigma_down (x - alpha U) / sigma + sigma_up
    noise), with D the guided and U the unguided x0 estimate and the ancestral split taken in
    variance-exploding form (sigma / alpha)."""
    noise = run.gaussian(x)
    flow = model.model_sampling.flow
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if float(sigma_next) == 0:
            x = denoised
        else:
            alpha, alpha_next = signal_scale(sigma, flow), signal_scale(sigma_next, flow)
            d = to_d(x, sigma, alpha * _unguided(model, denoised))
            sigma_down, sigma_up = _ve_ancestral_step(sigma / alpha, sigma_next / alpha_next, eta)
            x = alpha_next * denoised + alpha_next * sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + alpha_next * noise(sigma, sigma_next) * s_noise * sigma_up
        run.step(i, x, denoised)
    return x


def sample_euler_cfg_pp(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
    """CFG++ Euler: the ancestral sampler without noise (eta 0)."""
    return sample_euler_ancestral_cfg_pp(model, x, sigmas, run, eta=0.0, s_noise=0.0)


def sample_ddpm(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
    """DDPM's ancestral step (Ho et al. 2020, Algorithm 2) between the variance-preserving forms
    of x at each sigma, with alpha_bar = 1 / (sigma^2 + 1) and the posterior variance
    (1 - alpha)(1 - alpha_bar_prev) / (1 - alpha_bar)."""
    noise = run.gaussian(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        eps = (x - denoised) / sigma
        alpha_bar, alpha_bar_prev = 1 / (sigma**2 + 1), 1 / (sigma_next**2 + 1)
        alpha = alpha_bar / alpha_bar_prev
        x_vp = x * alpha_bar**0.5
        mean = (x_vp - (1 - alpha) * eps / (1 - alpha_bar) ** 0.5) / alpha**0.5
        if float(sigma_next) > 0:
            spread = ((1 - alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5
            x = (mean + spread * noise(sigma, sigma_next)) / alpha_bar_prev**0.5
        else:
            x = mean
        run.step(i, x, denoised)
    return x


def sample_lcm(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
    """Latent consistency sampling (Luo et al. 2023): jump to the x0 estimate, then noise it
    afresh to the next sigma the way the model's parameterisation mixes noise in."""
    noise = run.gaussian(x)
    scaling = model.model_sampling.noise_scaling
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = denoised
        if float(sigmas[i + 1]) > 0:
            x = scaling(sigmas[i + 1], noise(sigmas[i], sigmas[i + 1]), x)
        run.step(i, x, denoised)
    return x
