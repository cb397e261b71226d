"""RES multistep: the second-order multistep exponential integrator of Zhang, Song and Chen,
"Improved Order Analysis and Design of Exponential Integrator for Diffusion Models Sampling"
(RES, arXiv 2308.02157), as ComfyUI runs it.

In the half-log-SNR time t = -log(sigma) the probability-flow ODE has the exact solution
x(t + h) = e^(-h) x(t) + integral over the step of e^(-(t + h - u)) D(u) du, D the x0 estimate;
taking D linear through the current and previous estimates gives x_next = e^(-h) x + h (b1 D + b2 D_prev) with
b1 = phi1(-h) - phi2(-h) / c2, b2 = phi2(-h) / c2, c2 the previous step's length in units of h
(negative: it lies behind). The first step, and the step to sigma 0, are first order.

The ancestral variants step deterministically to sigma_down and add sigma_up of fresh noise
(eta, s_noise); the plain ones draw none (ComfyUI's take s_noise but multiply their noise by 0).
The CFG++ variants (Chung et al. 2024) renoise with the unguided estimate: the step uses the
unguided x0 estimate U where plain samplers use the guided D, plus the guidance D - U. ComfyUI
runs these with t = -log(sigma) and the variance-exploding ancestral split for every model, flow
models included, and so does this module: for a flow model that first-order step is still exact
(x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D).
"""

from __future__ import annotations

import math

import torch

from plinth.nodes.sampling.base import Denoise, Sampler, SamplerRun, ancestral_step, phi


def unguided(model: Denoise, denoised: torch.Tensor) -> torch.Tensor:
    """The unguided x0 estimate of the last call (CFG++); where the guider has none (no negative
    or cfg 1), the guided estimate is also the unguided one."""
    return denoised if model.last_uncond is None else model.last_uncond


def _multistep_weights(h: float, c2: float) -> tuple[float, float]:
    """(h b1, h b2): the weights of the current and previous x0 estimates over a step of length h
    in t = -log(sigma), the previous estimate lying c2 * h away."""
    neg_h = torch.tensor(-h, dtype=torch.float64)
    phi1, phi2 = float(phi(1, neg_h)), float(phi(2, neg_h))
    return h * (phi1 - phi2 / c2), h * phi2 / c2


def res_multistep(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    eta: float = 0.0,
    s_noise: float = 1.0,
    cfg_pp: bool = False,
) -> torch.Tensor:
    """RES second-order multistep steps; eta > 0 makes them ancestral, cfg_pp the CFG++ form."""
    noise = run.gaussian(x) if eta > 0 and s_noise > 0 else None
    s = sigmas.tolist()
    previous: torch.Tensor | None = None  # the last step's x0 estimate (unguided with CFG++)
    previous_sigma_down = 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        estimate = unguided(model, denoised) if cfg_pp else denoised
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        down = float(sigma_down)
        if down == 0 or previous is None:
            if cfg_pp:
                x = denoised + (x - estimate) * (down / s[i])
            else:
                x = x + (x - denoised) * ((down - s[i]) / s[i])
        else:
            h = math.log(s[i] / down)
            c2 = math.log(previous_sigma_down / s[i - 1]) / h
            w1, w2 = _multistep_weights(h, c2)
            if cfg_pp:
                x = x + (denoised - estimate)
            x = x * math.exp(-h) + w1 * estimate + w2 * previous
        if noise is not None and s[i + 1] > 0:
            x = x + noise(sigma, sigma_next) * (s_noise * float(sigma_up))
        previous, previous_sigma_down = estimate, down
        run.step(i, x, denoised)
    return x


def sample_res_multistep(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
    return res_multistep(model, x, sigmas, run)


def sample_res_multistep_cfg_pp(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
    return res_multistep(model, x, sigmas, run, cfg_pp=True)


def sample_res_multistep_ancestral(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, eta: float = 1.0, s_noise: float = 1.0
) -> torch.Tensor:
    return res_multistep(model, x, sigmas, run, eta=eta, s_noise=s_noise)


def sample_res_multistep_ancestral_cfg_pp(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, eta: float = 1.0, s_noise: float = 1.0
) -> torch.Tensor:
    return res_multistep(model, x, sigmas, run, eta=eta, s_noise=s_noise, cfg_pp=True)


SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler("res_multistep", sample_res_multistep),
        Sampler("res_multistep_cfg_pp", sample_res_multistep_cfg_pp),
        Sampler("res_multistep_ancestral", sample_res_multistep_ancestral, (("eta", 1.0), ("s_noise", 1.0))),
        Sampler(
            "res_multistep_ancestral_cfg_pp", sample_res_multistep_ancestral_cfg_pp, (("eta", 1.0), ("s_noise", 1.0))
        ),
    )
}
