"""UniPC (uni_pc: B(h) = h, "bh1"; uni_pc_bh2: B(h) = e^h - 1) against references written out
here from the paper's formulas (Zhao et al. 2023, data prediction, lambda = -log sigma): the
first three steps in closed form, and whole runs with the order schedule ComfyUI uses (warm-up
from order 1 to min(3, steps - 1), lowered again over the last steps) from the paper's linear
systems, on long, short, one-step and not-to-zero schedules. The oracle test is in
test_samplers_multistep.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.sampling_fakes import X0, FakeDenoise, guided, karras, phis, run_sampler

from plinth.nodes.sampling.base import SamplerRun
from plinth.nodes.sampling.samplers_unipc import SAMPLERS

VARIANTS = {"uni_pc": "bh1", "uni_pc_bh2": "bh2"}


def b_of(h: float, variant: str) -> float:
    """B(h) at the data-prediction step variable -h."""
    return -h if variant == "bh1" else math.expm1(-h)


def phi(k: int, z: float) -> float:
    """phi_k(z) = (e^z - sum_{m<k} z^m / m!) / z^k."""
    return (math.exp(z) - sum(z**m / math.factorial(m) for m in range(k))) / z**k


def solve(nodes: list[float], rhs: list[float]) -> list[float]:
    """rho with sum_k nodes_k^(j-1) rho_k = rhs_j, j = 1..len(nodes)."""
    return np.linalg.solve(np.vander(nodes, len(nodes), increasing=True).T, rhs[: len(nodes)]).tolist()


def ref_first_steps(s: list[float], variant: str) -> list[torch.Tensor]:
    """UniPC, data prediction, lambda = -log sigma, max order 3 (10 steps): step 0 predicts at
    order 1; step 1 corrects at order 1 (rho 1/2) and predicts at order 2 (rho 1/2); step 2
    corrects at order 2 and predicts at order 3 (rho from the 2x2 systems)."""
    lam = [-math.log(v) for v in s[:-1]]

    def base(x, m0, a, b):
        return (s[b] / s[a]) * x + (1 - s[b] / s[a]) * m0

    def g(h):  # (1! B b_1, 2! B b_2) = (z phi_2(z), 2 z phi_3(z)) at z = -h
        _, p2, p3 = phis(-h)
        return -h * p2, -2 * h * p3

    out, x = [], X0
    m = [guided(x, s[0])]
    xp = base(x, m[0], 0, 1)
    out.append(xp)
    m.append(guided(xp, s[1]))
    h1 = lam[1] - lam[0]
    xc = base(x, m[0], 0, 1) - b_of(h1, variant) * 0.5 * (m[1] - m[0])
    h2 = math.log(s[1] / s[2])
    r = (lam[0] - lam[1]) / h2
    xp = base(xc, m[1], 1, 2) - b_of(h2, variant) * 0.5 * (m[0] - m[1]) / r
    out.append(xp)
    m.append(guided(xp, s[2]))
    g1, g2 = g(h2)
    rho1 = (g2 - g1) / (r - 1)
    xc = base(xc, m[1], 1, 2) - rho1 * (m[0] - m[1]) / r - (g1 - rho1) * (m[2] - m[1])
    h3 = math.log(s[2] / s[3])
    r1, r2 = (lam[1] - lam[2]) / h3, (lam[0] - lam[2]) / h3
    g1, g2 = g(h3)
    rho1 = (g2 - r2 * g1) / (r1 - r2)
    out.append(base(xc, m[2], 2, 3) - rho1 * (m[1] - m[2]) / r1 - (g1 - rho1) * (m[0] - m[2]) / r2)
    return out


def ref_whole_run(s: list[float], variant: str) -> list[torch.Tensor]:
    """Every step: UniC corrects the sample at sigma_i with the new estimate, UniP predicts the
    next. The step landing on sigma_i has order p_i = min(i, K, N + 1 - i), K = min(3, N - 1) (at
    least 1); with p estimates m (newest last) and r_k = (lambda_{i-1-k} - lambda_{i-1}) / h:
    x_i = (sigma_i / sigma_{i-1}) x + (1 - sigma_i / sigma_{i-1}) m_0 - sum_k B rho_k D_k,
    D_k = (m_k - m_0) / r_k, rho solving sum_k r_k^(j-1) rho_k = j! (-h) phi_{j+1}(-h) / B (j = 1..);
    UniP over the p - 1 earlier estimates (p = 2: rho = 1/2), UniC adds the new one with r = 1
    (p = 1: rho = 1/2). The step to sigma 0 lands on the newest estimate."""
    n = len(s) - 1
    top = max(1, min(3, n - 1))
    lam = [-math.log(v) if v > 0 else math.inf for v in s]

    def step(x, i, estimates, new=None):
        p = min(i, top, n + 1 - i)
        if s[i] == 0:
            return estimates[-1]
        h = lam[i] - lam[i - 1]
        m = estimates[-p:]
        r = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)]
        diffs = [(m[-1 - k] - m[-1]) / r[k - 1] for k in range(1, p)]
        rhs = [math.factorial(j) * -h * phi(j + 1, -h) for j in range(1, p + 1)]  # B b_j
        if new is None:  # UniP
            nodes = r
            weights = [] if p == 1 else [0.5 * b_of(h, variant)] if p == 2 else solve(nodes, rhs)
        else:  # UniC
            nodes, diffs = [*r, 1.0], [*diffs, new - m[-1]]
            weights = [0.5 * b_of(h, variant)] if p == 1 else solve(nodes, rhs)
        x_lin = (s[i] / s[i - 1]) * x + (1 - s[i] / s[i - 1]) * m[-1]
        return x_lin - sum(w * d for w, d in zip(weights, diffs, strict=True))

    estimates, out, x, corrected = [], [], X0, X0
    for i in range(n):
        denoised = guided(x, s[i])
        if i > 0:
            corrected = step(corrected, i, estimates, denoised)
        estimates.append(denoised)
        x = step(corrected, i + 1, estimates)
        out.append(x)
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_first_steps_match_the_closed_forms(name):
    sigmas = karras(10, dtype=torch.float64)
    _, steps = run_sampler(SAMPLERS[name], FakeDenoise(guided), X0, sigmas)
    for (i, x, _), want in zip(steps, ref_first_steps(sigmas.tolist(), VARIANTS[name]), strict=False):
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5, msg=f"{name}, step {i}")


SCHEDULES = {
    "karras-10": karras(10, dtype=torch.float64),
    "karras-5-not-to-zero": karras(6, dtype=torch.float64)[:-1],
    "karras-4": karras(4, dtype=torch.float64),
    "karras-2": karras(2, dtype=torch.float64),
    "karras-1": karras(1, dtype=torch.float64),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_whole_runs_match_the_paper(name, schedule):
    sigmas = SCHEDULES[schedule]
    out, steps = run_sampler(SAMPLERS[name], FakeDenoise(guided), X0, sigmas)
    expected = ref_whole_run(sigmas.tolist(), VARIANTS[name])
    assert len(steps) == len(expected)
    for (i, x, _), want in zip(steps, expected, strict=True):
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5, msg=f"{name}, {schedule}, step {i}")
    torch.testing.assert_close(out, expected[-1], rtol=1e-5, atol=1e-5)


def test_an_unknown_variant_is_named():
    with pytest.raises(ValueError, match="uni_pc: variant must be one of"):
        SAMPLERS["uni_pc"].fn(FakeDenoise(guided), X0, karras(4, dtype=torch.float64), SamplerRun(0), variant="bh3")
