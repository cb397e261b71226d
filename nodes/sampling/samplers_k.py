"""k-diffusion's deterministic ODE samplers (Karras et al. 2022) and the registry of its samplers.

Each solves the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma. That ODE is the same
for flow models (x = (1 - sigma) x0 + sigma noise: (x - x0) / sigma is the velocity noise - x0),
so these samplers serve both kinds unchanged, as in ComfyUI. Euler, Heun, Heun++ and DPM-2 take
Karras's optional "churn" (s_churn > 0: lift sigma a little with fresh noise before each step);
its noise comes from the run's seed, not torch's global generator.

SAMPLERS maps ComfyUI's sampler names of this family to Samplers with ComfyUI's defaults;
"ddim" is the Euler sampler, as ComfyUI maps it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import integrate

from plinth.nodes.sampling.base import Denoise, NoiseSampler, Sampler, SamplerRun, to_d
from plinth.nodes.sampling.samplers_dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from plinth.nodes.sampling.samplers_k_stochastic import (
    sample_ddpm,
    sample_dpm_2_ancestral,
    sample_euler_ancestral,
    sample_euler_ancestral_cfg_pp,
    sample_euler_cfg_pp,
    sample_lcm,
)

CHURN = (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", math.inf), ("s_noise", 1.0))
"""Karras's churn options and their defaults (no churn)."""


class _Churn:
    """Algorithm 2's stochastic lift: sigma_hat = sigma (1 + gamma), with noise making up the
    difference, for gamma = min(s_churn / steps, sqrt(2) - 1) inside [s_tmin, s_tmax]."""

    def __init__(
        self, run: SamplerRun, x: torch.Tensor, steps: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
    ) -> None:
        self.gamma = min(s_churn / steps, 2**0.5 - 1) if s_churn > 0 else 0.0
        self.s_tmin, self.s_tmax, self.s_noise = s_tmin, s_tmax, s_noise
        self.noise: NoiseSampler | None = run.gaussian(x) if self.gamma > 0 else None

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.noise is None or not self.s_tmin <= float(sigma) <= self.s_tmax:
            return x, sigma
        sigma_hat = sigma * (self.gamma + 1)
        lift = self.noise(sigma, sigma_next) * self.s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        return x + lift, sigma_hat


def sample_euler(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, **churn_options: float
) -> torch.Tensor:
    """Euler steps of the ODE (Karras et al. 2022, Algorithm 2 without the Heun correction)."""
    churn = _Churn(run, x, len(sigmas) - 1, **churn_options)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas[i], sigmas[i + 1])
        denoised = model(x, sigma_hat)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        run.step(i, x, denoised)
    return x


def sample_heun(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, **churn_options: float
) -> torch.Tensor:
    """Heun's second-order steps (Karras et al. 2022, Algorithm 2); the last step, to sigma 0,
    is an Euler step since the derivative is undefined there."""
    churn = _Churn(run, x, len(sigmas) - 1, **churn_options)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas[i], sigmas[i + 1])
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if float(sigmas[i + 1]) == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        run.step(i, x, denoised)
    return x


def sample_dpm_2(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, **churn_options: float
) -> torch.Tensor:
    """k-diffusion's DPM-2: a midpoint step whose midpoint is the geometric mean of the two sigmas
    (DPM-Solver-2 in sigma form); Euler for the last step to sigma 0."""
    churn = _Churn(run, x, len(sigmas) - 1, **churn_options)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas[i], sigmas[i + 1])
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        if float(sigmas[i + 1]) == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = (sigma_hat * sigmas[i + 1]) ** 0.5
            x_2 = x + d * (sigma_mid - sigma_hat)
            x = x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigmas[i + 1] - sigma_hat)
        run.step(i, x, denoised)
    return x


def sample_heunpp2(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, **churn_options: float
) -> torch.Tensor:
    """Heun++ (sd-webui-samplers-scheduler's heunpp2): the slope is a weighted mean of the
    derivatives at this sigma and the next two (the next one only, one step before the end;
    Euler for the last), weighted by sigma / (3 sigma_max) and sigma / (2 sigma_max)."""
    churn = _Churn(run, x, len(sigmas) - 1, **churn_options)
    sigma_end, sigma_max = float(sigmas[-1]), sigmas[0]
    for i in range(len(sigmas) - 1):
        x, sigma_hat = churn(x, sigmas[i], sigmas[i + 1])
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if float(sigmas[i + 1]) == sigma_end:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            if float(sigmas[i + 2]) == sigma_end:
                w_2 = sigmas[i + 1] / (2 * sigma_max)
                slope = (1 - w_2) * d + w_2 * d_2
            else:
                x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
                d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2]))
                w_2, w_3 = sigmas[i + 1] / (3 * sigma_max), sigmas[i + 2] / (3 * sigma_max)
                slope = (1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3
            x = x + slope * dt
        run.step(i, x, denoised)
    return x


def lms_coefficient(order: int, ts: np.ndarray, i: int, j: int) -> float:
    """The weight of the derivative at ts[i - j] in a linear multistep step from ts[i] to
    ts[i + 1]: the integral over the step of its Lagrange basis polynomial on ts[i - order + 1..i]."""

    def basis(tau: float) -> float:
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - ts[i - k]) / (ts[i - j] - ts[i - k])
        return product

    return float(integrate.quad(basis, ts[i], ts[i + 1], epsrel=1e-4)[0])


def sample_lms(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth with variable steps) over the last `order` derivatives;
    the last step to sigma 0 takes the x0 estimate."""
    ts = sigmas.detach().cpu().double().numpy()
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        history = [*history, to_d(x, sigmas[i], denoised)][-order:]
        if float(sigmas[i + 1]) == 0:
            x = denoised
        else:
            current = min(i + 1, order)
            x = x + sum(lms_coefficient(current, ts, i, j) * d for j, d in enumerate(reversed(history)))
        run.step(i, x, denoised)
    return x


ADAPTIVE_DEFAULTS = (
    ("order", 3),
    ("rtol", 0.05),
    ("atol", 0.0078),
    ("h_init", 0.05),
    ("pcoeff", 0.0),
    ("icoeff", 1.0),
    ("dcoeff", 0.0),
    ("accept_safety", 0.81),
    ("eta", 0.0),
    ("s_noise", 1.0),
)
"""dpm_adaptive's options as ComfyUI's SamplerDPMAdaptative node defaults them."""

ANCESTRAL = (("eta", 1.0), ("s_noise", 1.0))

SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler("euler", sample_euler, CHURN),
        Sampler("euler_cfg_pp", sample_euler_cfg_pp),
        Sampler("euler_ancestral", sample_euler_ancestral, ANCESTRAL),
        Sampler("euler_ancestral_cfg_pp", sample_euler_ancestral_cfg_pp, ANCESTRAL),
        Sampler("heun", sample_heun, CHURN),
        Sampler("heunpp2", sample_heunpp2, CHURN),
        Sampler("dpm_2", sample_dpm_2, CHURN),
        Sampler("dpm_2_ancestral", sample_dpm_2_ancestral, ANCESTRAL),
        Sampler("lms", sample_lms, (("order", 4),)),
        Sampler("dpm_fast", sample_dpm_fast),
        Sampler("dpm_adaptive", sample_dpm_adaptive, ADAPTIVE_DEFAULTS),
        Sampler("ddpm", sample_ddpm),
        Sampler("lcm", sample_lcm),
        Sampler("ddim", sample_euler, CHURN),
    )
}
