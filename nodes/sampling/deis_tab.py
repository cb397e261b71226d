"""DEIS's "tAB" coefficients (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
Exponential Integrator"): Adams-Bashforth in a variance-preserving time.

DEIS integrates the sigma-space ODE dx/dsigma = eps(x, sigma) exactly over each step after
replacing eps by the polynomial through the last few eps values. The polynomial is fitted not
in sigma but in the time t of a linear-beta variance-preserving schedule, where eps varies
smoothly: sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1. As in ComfyUI (after the zju-pi
diff-solvers code it takes DEIS from), that schedule is fixed, fitted to EDM's range: sigma 0.002
at t = 1e-3 and 80 at t = 1, whatever the model. The weight of eps_{i-k} in step i is then
integral from sigma_i to sigma_{i+1} of L_k(t(sigma)) dsigma, L_k the Lagrange basis polynomial
in t over the step's nodes. ComfyUI sums 10,000 samples of the integrand in t; here Gauss-Legendre
quadrature in sigma, where the integrand is smooth, gives the integral to float64 precision.
"""

from __future__ import annotations

import math

import numpy as np

VP_EPSILON, VP_SIGMA_MIN, VP_SIGMA_MAX = 1e-3, 0.002, 80.0
QUADRATURE_POINTS = 32


def _vp_schedule() -> tuple[float, float]:
    """(beta_d, beta_min) of the linear-beta schedule through (VP_EPSILON, VP_SIGMA_MIN) and
    (1, VP_SIGMA_MAX)."""
    log_min, log_max = math.log1p(VP_SIGMA_MIN**2), math.log1p(VP_SIGMA_MAX**2)
    beta_d = 2 * (log_min / VP_EPSILON - log_max) / (VP_EPSILON - 1)
    return beta_d, log_max - beta_d / 2


def vp_time(sigma: np.ndarray) -> np.ndarray:
    """The schedule's time t at which its sigma is `sigma` (the root of a quadratic in t)."""
    beta_d, beta_min = _vp_schedule()
    return (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(sigma**2)) - beta_min) / beta_d


def tab_coefficients(sigmas: list[float], max_order: int) -> list[list[float]]:
    """weights[i][k]: the weight of the derivative of step i - k in step i, x_next = x +
    sum_k weights[i][k] d_{i-k}. Step i uses min(i + 1, max_order) derivatives; a step to sigma 0
    uses one (an Euler step, which lands on the x0 estimate)."""
    times = vp_time(np.asarray(sigmas, dtype=np.float64))
    abscissae, quadrature_weights = np.polynomial.legendre.leggauss(QUADRATURE_POINTS)
    weights = []
    for i in range(len(sigmas) - 1):
        start, end = sigmas[i], sigmas[i + 1]
        order = 1 if end <= 0 else min(i + 1, max_order)
        half = (end - start) / 2
        tau = vp_time((start + end) / 2 + half * abscissae)
        nodes = times[i - order + 1 : i + 1][::-1]  # t_i, t_{i-1}, ...
        row = []
        for k in range(order):
            basis = np.ones_like(tau)
            for j in range(order):
                if j != k:
                    basis *= (tau - nodes[j]) / (nodes[k] - nodes[j])
            row.append(float(half * np.dot(quadrature_weights, basis)))
        weights.append(row)
    return weights
