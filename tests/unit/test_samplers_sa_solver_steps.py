"""SA-Solver (Xue et al. 2023) against a reference written out here: the stochastic Adams
predictor and corrector of the paper's data-prediction form, with the integrals of its Lagrange
basis taken by Gauss-Legendre quadrature (the module integrates by parts, so the two agree only
if both are right), the orders ComfyUI uses near the end of a schedule, tau = eta on the middle
of the schedule, and PECE's extra evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.sampling_fakes import FakeModelSampling, ScriptedNoise, linear_denoiser

from plinth.nodes.sampling.base import SamplerRun
from plinth.nodes.sampling.samplers_sa_solver import SAMPLERS, adams_weights

SHAPE = (2, 3, 4, 4)
SCHEDULES = {
    (False, True): [14.6, 6.1, 2.4, 0.75, 0.0],
    (False, False): [14.6, 8.0, 4.5, 2.4, 1.2, 0.4],
    (True, True): [1.0, 0.83, 0.6, 0.31, 0.0],
    (True, False): [1.0, 0.9, 0.7, 0.5, 0.3, 0.15],
}


def lam(s: float, flow: bool) -> float:
    if s == 0:
        return math.inf
    return math.log((1 - s) / s) if flow else -math.log(s)


def quadrature_weights(nodes, lam_s, lam_t, tau):
    """(1 + tau^2) int_s^t e^((1 + tau^2)(l - lam_t)) L_j(l) dl, L_j the Lagrange basis on nodes."""
    c = 1 + tau**2
    points, weights = np.polynomial.legendre.leggauss(40)
    mid, half = (lam_s + lam_t) / 2, (lam_t - lam_s) / 2
    out = []
    for j, node in enumerate(nodes):
        total = 0.0
        for point, weight in zip(points, weights, strict=True):
            at = mid + half * point
            basis = math.prod((at - other) / (node - other) for k, other in enumerate(nodes) if k != j)
            total += weight * half * c * math.exp(c * (at - lam_t)) * basis
        out.append(total)
    return out


def simple_weights(nodes, lam_s, lam_t, tau, corrector):
    """The paper's simplified two-step rule (Appendix D), [older, newer]."""
    c, h = 1 + tau**2, lam_t - lam_s
    if corrector:
        return [1 - math.exp(-c * h) - c * h / 2, c * h / 2]
    older = c * h**2 / (2 * (nodes[0] - lam_s))
    return [older, 1 - math.exp(-c * h) - older]


def ref_sa_solver(x, sigmas, flow, eta, pece, simple, p_order, c_order):
    model, noise = linear_denoiser(SHAPE, flow), ScriptedNoise(SHAPE)
    if flow:
        sigmas, (high, low) = [0.9999, *sigmas[1:]], (0.8, 0.2)
    else:  # ComfyUI's percent_to_sigma for SD1.5: the sigma at timestep (1 - percent) * 999
        table = FakeModelSampling()
        high, low = (float(table.sigma(torch.tensor((1 - p) * 999.0))) for p in (0.2, 0.8))
    lams = [lam(s, flow) for s in sigmas]
    count, to_zero = len(sigmas) - 1, sigmas[-1] == 0

    def d(x_, s):
        return model(x_, torch.tensor(s, dtype=torch.float64))

    def adams(x_, ests, nodes, i, tau, corrector):
        """From sigmas[i] to sigmas[i + 1] with estimates at nodes."""
        if simple and len(nodes) == 2:
            w = simple_weights(nodes, lams[i], lams[i + 1], tau, corrector)
        else:
            w = quadrature_weights(nodes, lams[i], lams[i + 1], tau)
        s, s_next = sigmas[i], sigmas[i + 1]
        h = lams[i + 1] - lams[i]
        return (s_next / s) * math.exp(-(tau**2) * h) * x_ + (1 - s_next if flow else 1) * sum(
            wk * e for wk, e in zip(w, ests, strict=True)
        )

    out, ests = [], []
    x_pred = x_cur = x
    tau, step_noise = 0.0, 0
    for i in range(count):
        s, s_next = sigmas[i], sigmas[i + 1]
        est = d(x_pred, s)
        ests.append(est)
        p = min(p_order, len(ests))
        c = 0 if i == 0 or (s_next == 0 and not pece) else min(c_order, len(ests))
        if to_zero:
            p, c = min(p, count - 1 - i), min(c, count - i)
        if c == 0:
            x_cur = x_pred
        else:  # Adams-Moulton: the nodes include the new estimate; the predictor's noise again
            x_cur = adams(x_cur, ests[-c:], lams[i - c + 1 : i + 1], i - 1, tau, True) + step_noise
            if pece:
                est = ests[-1] = d(x_cur, s)
        if s_next == 0:
            x_pred = est
        else:  # Adams-Bashforth over the last p estimates, then fresh noise
            tau = eta if low <= s_next <= high else 0.0
            x_pred = adams(x_cur, ests[-p:], lams[i - p + 1 : i + 1], i, tau, False)
            step_noise = 0
            if tau > 0:
                h = lams[i + 1] - lams[i]
                step_noise = noise(s, s_next) * s_next * math.sqrt(1 - math.exp(-2 * tau**2 * h))
                x_pred = x_pred + step_noise
        out.append(x_pred)
    return out


CASES = {
    "sa_solver": {},
    "sa_solver_pece": {},
    "sa_solver simple_order_2": {"simple_order_2": True},
    "sa_solver orders 1/1": {"predictor_order": 1, "corrector_order": 1},
    "sa_solver_pece orders 2/3 eta 0.6": {"predictor_order": 2, "corrector_order": 3, "eta": 0.6},
}


@pytest.mark.parametrize("to_zero", [True, False], ids=["to 0", "partial"])
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_step_matches_the_stochastic_adams_reference(case, flow, to_zero):
    sampler = SAMPLERS[case.split()[0]]
    options = dict(sampler.options) | CASES[case]
    sigmas = SCHEDULES[flow, to_zero]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = x if flow else x * sigmas[0]
    expected = ref_sa_solver(
        x,
        sigmas,
        flow,
        options["eta"],
        options["use_pece"],
        options["simple_order_2"],
        options["predictor_order"],
        options["corrector_order"],
    )
    seen: list[torch.Tensor] = []
    run = SamplerRun(seed=0, on_step=lambda i, x_, d: seen.append(x_))
    model = linear_denoiser(SHAPE, flow)
    sampler.fn(model, x, torch.tensor(sigmas, dtype=torch.float64), run, noise_sampler=ScriptedNoise(SHAPE), **options)
    assert len(seen) == len(expected) == len(sigmas) - 1
    errors = [float((got - want).abs().max()) for got, want in zip(seen, expected, strict=True)]
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("tau", [0.0, 1.0])
@pytest.mark.parametrize("order", range(1, 7))
def test_the_adams_weights_are_the_integrals_of_the_lagrange_basis(order, tau):
    nodes = [2.0 - 0.45 * k for k in range(order)][::-1]
    for lam_s, lam_t in ((nodes[-1], nodes[-1] + 0.6), (nodes[-1], nodes[-1] + 3.0)):
        nodes_, lam_s_, lam_t_ = (torch.tensor(v, dtype=torch.float64) for v in (nodes, lam_s, lam_t))
        got = adams_weights(nodes_, lam_s_, lam_t_, tau)
        want = quadrature_weights(nodes, lam_s, lam_t, tau)
        assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
