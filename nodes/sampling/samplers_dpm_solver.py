"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) as k-diffusion offers it: "fast" (fixed steps
of orders 3, 2, 1 spending a budget of model calls) and "adaptive" (an embedded pair of orders
2/3 or 1/2 whose difference drives a PID step-size controller).

The solver works in t = -log(sigma) on the noise estimate eps = (x - D) / sigma; in that variable
the linear part of the ODE is solved exactly and only eps is approximated. Both samplers run
from sigmas[0] to the last nonzero sigma and stop there, as ComfyUI calls them: they do not take
a final step to sigma 0. They use no noise unless eta > 0 (adaptive only, as in ComfyUI).
"""

from __future__ import annotations

import math

import torch

from plinth.nodes.sampling.base import Denoise, SamplerRun, ancestral_step


def sigma_range(sigmas: torch.Tensor, name: str) -> tuple[float, float]:
    """(sigma_min, sigma_max) as ComfyUI hands them to DPM-Solver: the last nonzero sigma and
    the first."""
    sigma_min = float(sigmas[-1]) if float(sigmas[-1]) != 0 else float(sigmas[-2])
    sigma_max = float(sigmas[0])
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"{name}: sigmas must be positive apart from a final 0, got {sigmas.tolist()}")
    return sigma_min, sigma_max


def _sigma(t: float) -> float:
    return math.exp(-t)


class _Step:
    """One solver step from x at time t: the noise estimates of its stages, each made once and
    shared between the two solutions an adaptive step compares."""

    def __init__(
        self,
        model: Denoise,
        sigmas: torch.Tensor,
        x: torch.Tensor,
        t: float,
        start: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.sigmas, self.x, self.t = model, sigmas, x, t
        self.eps_0, self.denoised = start if start is not None else self._estimate(x, t)
        self.stages: dict[float, torch.Tensor] = {}

    def _estimate(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = _sigma(t)
        denoised = self.model(x, self.sigmas.new_tensor(sigma))
        return (x - denoised) / sigma, denoised

    def eps_at(self, r: float, u: torch.Tensor, h: float) -> torch.Tensor:
        """eps at the stage t + r h (u is x carried there)."""
        if r not in self.stages:
            self.stages[r] = self._estimate(u, self.t + r * h)[0]
        return self.stages[r]

    def first_order(self, t_next: float) -> torch.Tensor:
        """DPM-Solver-1 (a DDIM step): x_t = x_s - sigma_t (e^h - 1) eps_s."""
        return self.x - _sigma(t_next) * math.expm1(t_next - self.t) * self.eps_0

    def second_order(self, t_next: float, r1: float = 0.5) -> torch.Tensor:
        """DPM-Solver-2 with its intermediate stage at t + r1 h."""
        h = t_next - self.t
        u_1 = self.x - _sigma(self.t + r1 * h) * math.expm1(r1 * h) * self.eps_0
        eps_1 = self.eps_at(r1, u_1, h)
        scale = _sigma(t_next) * math.expm1(h)
        return self.x - scale * self.eps_0 - scale / (2 * r1) * (eps_1 - self.eps_0)

    def third_order(self, t_next: float, r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
        """DPM-Solver-3 with stages at t + r1 h and t + r2 h."""
        h = t_next - self.t
        u_1 = self.x - _sigma(self.t + r1 * h) * math.expm1(r1 * h) * self.eps_0
        eps_1 = self.eps_at(r1, u_1, h)
        sigma_2 = _sigma(self.t + r2 * h)
        phi_2 = math.expm1(r2 * h) / (r2 * h) - 1
        u_2 = self.x - sigma_2 * math.expm1(r2 * h) * self.eps_0 - sigma_2 * (r2 / r1) * phi_2 * (eps_1 - self.eps_0)
        eps_2 = self.eps_at(r2, u_2, h)
        sigma_next = _sigma(t_next)
        return (
            self.x
            - sigma_next * math.expm1(h) * self.eps_0
            - sigma_next / r2 * (math.expm1(h) / h - 1) * (eps_2 - self.eps_0)
        )

    def of_order(self, order: int, t_next: float) -> torch.Tensor:
        if order == 1:
            return self.first_order(t_next)
        return self.second_order(t_next) if order == 2 else self.third_order(t_next)


def fast_orders(calls: int) -> list[int]:
    """DPM-Solver-fast's plan: third-order steps, ending in 2 then 1 or in the remainder, so the
    orders add up to the number of model calls."""
    steps = calls // 3 + 1
    if calls % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [calls % 3]


def sample_dpm_fast(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
    """DPM-Solver-fast with len(sigmas) - 1 model calls over steps uniform in t. run.step is
    called after each solver step with the number of model calls so far, less one, as its index
    (the last is len(sigmas) - 2)."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = sigma_range(sigmas, "dpm_fast")
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    orders = fast_orders(len(sigmas) - 1)
    ts = [t_start + (t_end - t_start) * k / len(orders) for k in range(len(orders))] + [t_end]
    calls = 0
    for i, order in enumerate(orders):
        step = _Step(model, sigmas, x, ts[i])
        x = step.of_order(order, ts[i + 1])
        calls += order
        run.step(calls - 1, x, step.denoised)
    return x


class PIDStepSize:
    """A PID controller of the step size h (Söderlind 2003, as k-diffusion uses it): the step
    grows by the limited product of the last three inverse errors raised to the PID exponents,
    and is accepted when that factor reaches accept_safety."""

    def __init__(
        self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float
    ) -> None:
        self.h = h
        self.exponents = (
            (pcoeff + icoeff + dcoeff) / order,
            -(pcoeff + 2 * dcoeff) / order,
            dcoeff / order,
        )
        self.accept_safety = accept_safety
        self.inverse_errors: list[float] = []

    def propose(self, error: float) -> bool:
        """Scale h for the error just measured; True when the step that made it is accepted."""
        inverse = 1 / (error + 1e-8)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        factor = math.prod(e**b for e, b in zip(self.inverse_errors, self.exponents, strict=True))
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[1:] = self.inverse_errors[:2]
        self.h *= factor
        return accept


def sample_dpm_adaptive(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-12 (order 2) or -23 (order 3) with adaptive steps. The error is the RMS of the
    pair's difference over max(atol, rtol * |x|); run.step is called once per accepted step,
    indices counting up from 0. A rejected step keeps its first model call for the retry."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive: order must be 2 or 3, got {order}")
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = sigma_range(sigmas, "dpm_adaptive")
    s, t_end = -math.log(sigma_max), -math.log(sigma_min)
    forward = t_end > s
    if eta and not forward:
        raise ValueError("dpm_adaptive: eta must be 0 when sampling towards higher sigmas")
    noise = run.gaussian(x)
    pid = PIDStepSize(
        abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety
    )
    x_prev, start, accepted = x, None, 0
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        t = min(t_end, s + pid.h) if forward else max(t_end, s + pid.h)
        t_down, sigma_up = t, 0.0
        if eta:
            sigma_from, sigma_to = torch.tensor([_sigma(s), _sigma(t)], dtype=torch.float64)
            sigma_down = float(ancestral_step(sigma_from, sigma_to, eta)[0])
            t_down = min(t_end, -math.log(sigma_down))
            sigma_up = (_sigma(t) ** 2 - _sigma(t_down) ** 2) ** 0.5
        step = _Step(model, sigmas, x, s, start)
        if order == 2:
            x_low, x_high = step.first_order(t_down), step.second_order(t_down)
        else:
            x_low, x_high = step.second_order(t_down, r1=1 / 3), step.third_order(t_down)
        scale = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((x_low - x_high) / scale)) / x.numel() ** 0.5
        if pid.propose(error):
            x_prev, x = x_low, x_high
            if sigma_up:
                x = x + sigma_up * s_noise * noise(sigmas.new_tensor(_sigma(s)), sigmas.new_tensor(_sigma(t)))
            s, start = t, None
            run.step(accepted, x, step.denoised)
            accepted += 1
        else:
            start = (step.eps_0, step.denoised)
    return x
