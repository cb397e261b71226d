"""Multistep SDE solvers in the half-log-SNR lambda: DPM-Solver++(2M) SDE and (3M) SDE (Lu et
al. 2022, k-diffusion's SDE forms) and ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169).

Each step is first order towards the current x0 estimate, plus corrections from the divided
differences of earlier steps' estimates, plus noise. The DPM-Solver++ SDEs take their noise
from the seeded Brownian tree, ER-SDE fresh Gaussian noise per step, as in ComfyUI. All work
for flow models (lambda = log((1 - sigma) / sigma), the first sigma moved off 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plinth.nodes.sampling.base import Denoise, NoiseSampler, Sampler, SamplerRun, half_log_snr, signal_scale
from plinth.nodes.sampling.snr import offset_first_sigma

ER_SDE_INTEGRATION_POINTS = 200


def sample_dpmpp_2m_sde(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE; solver_type picks the second-order term's weight: "midpoint"
    (1 - e^-h) / 2 or "heun" 1 - (1 - e^-h) / h, with h = (1 + eta) times the lambda step."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', not {solver_type!r}")
    return multistep_sde(model, x, sigmas, run, eta, s_noise, noise_sampler, 2, solver_type == "midpoint")


def sample_dpmpp_3m_sde(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: first order, then (Heun-weighted) second, then third order as the
    history of estimates grows."""
    return multistep_sde(model, x, sigmas, run, eta, s_noise, noise_sampler, 3, False)


def multistep_sde(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    eta: float,
    s_noise: float,
    noise_sampler: NoiseSampler | None,
    order: int,
    midpoint: bool,
) -> torch.Tensor:
    if len(sigmas) <= 1:
        return x
    model_sampling = model.model_sampling
    flow = model_sampling.flow
    noise = noise_sampler or run.brownian(x, sigmas)
    sigmas = offset_first_sigma(sigmas, model_sampling)
    lambdas = half_log_snr(sigmas, flow)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # earlier (estimate, lambda step), newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        h = lambdas[i + 1] - lambdas[i]
        if float(sigma_next) == 0:
            x = denoised
        else:
            h_eta = h * (eta + 1)
            gain = -torch.expm1(-h_eta)  # 1 - e^-h_eta, the first-order weight of the estimate
            alpha_next = signal_scale(sigma_next, flow)
            x = sigma_next / sigma * torch.exp(-h * eta) * x + alpha_next * gain * denoised
            if history:
                x = x + alpha_next * higher_order_term(denoised, h, h_eta, gain, history, midpoint)
            if eta > 0 and s_noise > 0:
                x = x + noise(sigma, sigma_next) * sigma_next * torch.sqrt(-torch.expm1(-2 * h * eta)) * s_noise
        history = [(denoised, h), *history][: order - 1]
        run.step(i, x, denoised)
    return x


def higher_order_term(
    denoised: torch.Tensor,
    h: torch.Tensor,
    h_eta: torch.Tensor,
    gain: torch.Tensor,
    history: list[tuple[torch.Tensor, torch.Tensor]],
    midpoint: bool,
) -> torch.Tensor:
    """The correction from the estimates' first (and second) divided differences in lambda,
    scaled by the step h: the Taylor terms of the estimate integrated against e^(lambda - t)."""
    previous, h_1 = history[0]
    slope = (denoised - previous) * (h / h_1)
    phi_2 = 1 - gain / h_eta
    if len(history) == 1:
        return gain / 2 * slope if midpoint else phi_2 * slope
    earlier, h_2 = history[1]
    r_1, r_2 = h_1 / h, h_2 / h
    earlier_slope = (previous - earlier) / r_2
    first = slope + (slope - earlier_slope) * r_1 / (r_1 + r_2)
    second = (slope - earlier_slope) / (r_1 + r_2)
    return phi_2 * first - (phi_2 / h_eta - 0.5) * second


def er_sde_noise_scaler(t: torch.Tensor) -> torch.Tensor:
    """ER-SDE's default noise scale function of t = sigma / alpha (ComfyUI's: t (e^(t^0.3) + 10))."""
    return t * (torch.exp(t**0.3) + 10.0)


def sample_er_sde(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    s_noise: float = 1.0,
    max_stage: int = 3,
    noise_scaler: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """ER-SDE-Solver (VP, data prediction) of up to max_stage stages in t = sigma / alpha: the
    first-order step weighted by the noise scale function's ratio, then the slope and curvature
    of the estimates times the integrals of 1 / scaler, taken by a 200-point sum as ComfyUI does.
    noise_scaler = identity gives the probability-flow ODE."""
    model_sampling = model.model_sampling
    flow = model_sampling.flow
    scaler = noise_scaler or er_sde_noise_scaler
    noise = noise_sampler or run.gaussian(x)
    sigmas = offset_first_sigma(sigmas, model_sampling)
    times = torch.exp(-half_log_snr(sigmas, flow))
    offsets = torch.arange(ER_SDE_INTEGRATION_POINTS, dtype=sigmas.dtype, device=sigmas.device)
    estimates: list[torch.Tensor] = []  # earlier estimates, newest first
    slopes: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        stages = min(max_stage, i + 1)
        if float(sigma_next) == 0:
            x = denoised
        else:
            t, t_next = times[i], times[i + 1]
            alpha_next = signal_scale(sigma_next, flow)
            ratio = scaler(t_next) / scaler(t)
            x = alpha_next / signal_scale(sigma, flow) * ratio * x + alpha_next * (1 - ratio) * denoised
            if stages >= 2:
                dt = t_next - t
                step = -dt / ER_SDE_INTEGRATION_POINTS
                points = t_next + offsets * step
                scaled = scaler(points)
                slope = (denoised - estimates[0]) / (t - times[i - 1])
                x = x + alpha_next * (dt + torch.sum(1 / scaled) * step * scaler(t_next)) * slope
                if stages >= 3:
                    curvature = (slope - slopes[0]) / ((t - times[i - 2]) / 2)
                    integral = torch.sum((points - t) / scaled) * step
                    x = x + alpha_next * (dt**2 / 2 + integral * scaler(t_next)) * curvature
                slopes = [slope]
            if s_noise > 0:
                spread = torch.sqrt(t_next**2 - t**2 * ratio**2).nan_to_num(nan=0.0)
                x = x + alpha_next * noise(sigma, sigma_next) * s_noise * spread
        estimates = [denoised]
        run.step(i, x, denoised)
    return x


SDE = (("eta", 1.0), ("s_noise", 1.0))
SAMPLERS: dict[str, Sampler] = {
    **{
        name: Sampler(name, sample_dpmpp_2m_sde, (*SDE, ("solver_type", "midpoint")))
        for name in ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu")
    },
    **{
        name: Sampler(name, sample_dpmpp_2m_sde, (*SDE, ("solver_type", "heun")))
        for name in ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu")
    },
    **{name: Sampler(name, sample_dpmpp_3m_sde, SDE) for name in ("dpmpp_3m_sde", "dpmpp_3m_sde_gpu")},
    "er_sde": Sampler("er_sde", sample_er_sde, (("s_noise", 1.0), ("max_stage", 3))),
}
