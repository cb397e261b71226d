"""DPM-Solver fast and adaptive (Lu et al. 2022) against the paper's update rules written out
here: steps in lambda = -log(sigma) on eps = (x - D) / sigma, between the first sigma and the
last nonzero one. The adaptive reference repeats k-diffusion's embedded-pair error and PID step
control, so accepted steps, rejections and step sizes all have to agree."""

from __future__ import annotations

import math

import pytest
import torch
from support.sampling_fakes import FakeDenoise, ScriptedRun

from plinth.nodes.sampling.samplers_k import SAMPLERS

GEN = torch.Generator().manual_seed(99)
C = torch.randn(1, 3, 4, 4, generator=GEN, dtype=torch.float64)
START = 3.0 * torch.randn(1, 3, 4, 4, generator=GEN, dtype=torch.float64)
NOISES = [torch.randn(1, 3, 4, 4, generator=GEN, dtype=torch.float64) for _ in range(200)]


def D(x: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    return 0.4 * x + (0.5 + math.sin(3 * float(s))) * C


def eps(x: torch.Tensor, lam: float) -> torch.Tensor:
    sigma = math.exp(-lam)
    return (x - D(x, sigma)) / sigma


def solver_1(x, s, t):
    return x - math.exp(-t) * math.expm1(t - s) * eps(x, s)


def solver_2(x, s, t, r1=0.5):
    """DPM-Solver-2, Lu et al. 2022 Algorithm 4 (alpha = 1)."""
    h = t - s
    e = eps(x, s)
    u = x - math.exp(-(s + r1 * h)) * math.expm1(r1 * h) * e
    return x - math.exp(-t) * math.expm1(h) * e - math.exp(-t) / (2 * r1) * math.expm1(h) * (eps(u, s + r1 * h) - e)


def solver_3(x, s, t):
    """DPM-Solver-3, Lu et al. 2022 Algorithm 5 (r1 = 1/3, r2 = 2/3, alpha = 1)."""
    h, r1, r2 = t - s, 1 / 3, 2 / 3
    e = eps(x, s)
    u_1 = x - math.exp(-(s + r1 * h)) * math.expm1(r1 * h) * e
    d_1 = eps(u_1, s + r1 * h) - e
    sig_2 = math.exp(-(s + r2 * h))
    u_2 = x - sig_2 * math.expm1(r2 * h) * e - sig_2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * d_1
    d_2 = eps(u_2, s + r2 * h) - e
    return x - math.exp(-t) * math.expm1(h) * e - math.exp(-t) / r2 * (math.expm1(h) / h - 1) * d_2


def run(name: str, sigmas: list[float], noises=(), **options):
    sampler, model, scripted = SAMPLERS[name], FakeDenoise(D), ScriptedRun(noises)
    out = sampler.fn(model, START.clone(), torch.tensor(sigmas, dtype=torch.float64), scripted, **options)
    return out, scripted, model


PLANS = {1: [1], 2: [2], 3: [2, 1], 4: [3, 1], 6: [3, 2, 1], 7: [3, 3, 1], 8: [3, 3, 2]}


@pytest.mark.parametrize("calls", sorted(PLANS))
def test_fast_spends_one_model_call_per_sigma_step_on_orders_3_2_1(calls):
    sigmas = [3.0 * 0.7**k for k in range(calls)] + [0.0]
    out, scripted, model = run("dpm_fast", sigmas)
    orders = PLANS[calls]
    lam = [-math.log(3.0) + (math.log(3.0) - math.log(sigmas[-2])) * k / len(orders) for k in range(len(orders) + 1)]
    x = START.clone()
    for k, order in enumerate(orders):
        x = (solver_1, solver_2, solver_3)[order - 1](x, lam[k], lam[k + 1])
        assert float((scripted.steps[k][1] - x).abs().max()) < 1e-9
    assert float((out - x).abs().max()) < 1e-9
    assert [i for i, _, _ in scripted.steps] == [sum(orders[: k + 1]) - 1 for k in range(len(orders))]
    assert model.calls == calls


def reference_adaptive(sigmas, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise):
    """k-diffusion's dpm_solver_adaptive: the step factor is 1 + atan(f - 1) for the PID product
    f = e_n^((p + i + d) / k) e_(n-1)^(-(p + 2d) / k) e_(n-2)^(d / k) of the inverse errors of
    this and the last two accepted steps (k the order, 1.5 with noise); accepted at accept_safety."""
    k = 1.5 if eta else order
    powers = ((pcoeff + icoeff + dcoeff) / k, -(pcoeff + 2 * dcoeff) / k, dcoeff / k)
    inverse_errors: list[float] = []
    s, t_end = -math.log(sigmas[0]), -math.log(sigmas[-2] if sigmas[-1] == 0 else sigmas[-1])
    x, x_prev, h, accepted, rejected, noise = START.clone(), START.clone(), h_init, [], 0, iter(NOISES)
    while s < t_end - 1e-5:
        t = min(t_end, s + h)
        t_down, up = t, 0.0
        if eta:
            sf, st = math.exp(-s), math.exp(-t)
            sigma_up = min(st, eta * math.sqrt(st**2 * (sf**2 - st**2) / sf**2))
            t_down = min(t_end, -math.log(math.sqrt(st**2 - sigma_up**2)))
            up = math.sqrt(st**2 - math.exp(-t_down) ** 2)
        if order == 2:
            low, high = solver_1(x, s, t_down), solver_2(x, s, t_down)
        else:
            low, high = solver_2(x, s, t_down, r1=1 / 3), solver_3(x, s, t_down)
        scale = torch.clamp(rtol * torch.maximum(low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((low - high) / scale)) / math.sqrt(x.numel())
        inverse_errors = [1 / (error + 1e-8)] + (inverse_errors[1:] or [1 / (error + 1e-8)] * 2)
        factor = 1 + math.atan(math.prod(e**p for e, p in zip(inverse_errors, powers, strict=True)) - 1)
        h *= factor
        if factor >= accept_safety:
            inverse_errors = [inverse_errors[0], *inverse_errors[:2]]
            x_prev, x, s = low, high + (up * s_noise * next(noise) if eta else 0), t
            accepted.append(x)
        else:
            rejected += 1
    return accepted, rejected


ADAPTIVE_CASES = {
    "defaults": {},
    "order 2": {"order": 2},
    "tight tolerances": {"rtol": 1e-4, "atol": 1e-5, "h_init": 0.5},
    "stochastic": {"eta": 0.5, "s_noise": 0.8},
    "PID": {"pcoeff": 0.3, "icoeff": 0.6, "dcoeff": 0.2, "accept_safety": 0.9},
}


@pytest.mark.parametrize("case", sorted(ADAPTIVE_CASES))
def test_adaptive_follows_the_embedded_pair_and_its_step_controller(case):
    options = {**dict(SAMPLERS["dpm_adaptive"].options), **ADAPTIVE_CASES[case]}
    sigmas = [3.0, 2.0, 1.1, 0.6, 0.4, 0.0]
    out, scripted, model = run("dpm_adaptive", sigmas, NOISES, **options)
    expected, rejected = reference_adaptive(sigmas, **options)
    assert [i for i, _, _ in scripted.steps] == list(range(len(expected)))
    errors = [float((got - want).abs().max()) for (_, got, _), want in zip(scripted.steps, expected, strict=True)]
    assert max(errors) < 1e-9, errors
    assert float((out - expected[-1]).abs().max()) < 1e-9
    # A rejected step keeps its first model call for the retry.
    assert model.calls == options["order"] * (len(expected) + rejected) - rejected
    assert rejected > 0 or case != "tight tolerances", "the rejection path went untested"


def test_bad_ranges_and_orders_are_named():
    with pytest.raises(ValueError, match="dpm_fast"):
        run("dpm_fast", [0.0, 0.0])
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        run("dpm_adaptive", [3.0, 0.0], order=4)
