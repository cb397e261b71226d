"""SA-Solver: Stochastic Adams predictor-corrector (Xue et al. 2023, arXiv:2309.05019), data
prediction in lambda, as ComfyUI's sa_solver and sa_solver_pece.

The SDE dx = ... with stochasticity tau (tau = 0 is the probability-flow ODE) has the exact step
x_t = (sigma_t / sigma_s) e^(-tau^2 h) x_s
      + alpha_t (1 + tau^2) integral_s^t e^((1 + tau^2)(lambda - lambda_t)) x0(lambda) dlambda + noise.
The predictor replaces x0 by the Lagrange polynomial through the last estimates (an Adams-
Bashforth step), the corrector by the one that also passes through the estimate at the new
point (Adams-Moulton), reusing the predictor's noise. PECE evaluates the model again on the
corrected sample. tau is eta inside [sde_start_percent, sde_end_percent] of the schedule, else 0.
"""

from __future__ import annotations

import math

import torch

from plinth.nodes.sampling.base import Denoise, NoiseSampler, Sampler, SamplerRun, half_log_snr, signal_scale
from plinth.nodes.sampling.snr import offset_first_sigma, percent_to_sigma


def adams_weights(
    nodes: torch.Tensor,
    lam_s: torch.Tensor,
    lam_t: torch.Tensor,
    tau: float,
    simple_order_2: bool = False,
    corrector: bool = False,
) -> torch.Tensor:
    """w_j = (1 + tau^2) integral_s^t e^((1 + tau^2)(lambda - lambda_t)) L_j(lambda) dlambda for
    the Lagrange basis L_j over `nodes`, in float64 and in u = lambda - lambda_t (well scaled).

    The moments c int_{-h}^0 e^(cu) u^m du follow by parts; the basis's monomial coefficients
    from the Vandermonde matrix of the nodes. simple_order_2 is the paper's simplified two-node
    rule (its Appendix D)."""
    c = 1 + tau**2
    h = float(lam_t) - float(lam_s)
    decay = math.exp(-c * h)
    if simple_order_2 and len(nodes) == 2:
        if corrector:
            newer = c * h / 2
            return torch.tensor([1 - decay - newer, newer], dtype=torch.float64)
        older = c * h**2 / (2 * float(nodes[0] - lam_s))
        return torch.tensor([older, 1 - decay - older], dtype=torch.float64)
    moments: list[float] = []
    for m in range(len(nodes)):
        boundary = (1.0 if m == 0 else 0.0) - decay * (-h) ** m
        moments.append(boundary - m / c * moments[-1] if m else boundary)
    u = nodes.double() - float(lam_t)
    vandermonde = torch.vander(u, len(nodes), increasing=True)
    return torch.linalg.solve(vandermonde.T, torch.tensor(moments, dtype=torch.float64))


def adams_step(
    x: torch.Tensor,
    estimates: list[torch.Tensor],
    lambdas: torch.Tensor,
    sigmas: torch.Tensor,
    start: int,
    tau: float,
    flow: bool,
    simple_order_2: bool,
    corrector: bool,
) -> torch.Tensor:
    """The step from sigmas[start] to sigmas[start + 1] with the estimates at the last
    len(estimates) lambdas up to start (predictor) or start + 1 (corrector)."""
    end = start + 1 if corrector else start
    nodes = lambdas[end - len(estimates) + 1 : end + 1]
    lam_s, lam_t = lambdas[start], lambdas[start + 1]
    weights = adams_weights(nodes, lam_s, lam_t, tau, simple_order_2, corrector).to(x)
    h = lam_t - lam_s
    sigma, sigma_next = sigmas[start], sigmas[start + 1]
    x_next = sigma_next / sigma * torch.exp(-(tau**2) * h) * x
    combined = sum((w * e for w, e in zip(weights, estimates, strict=True)), torch.zeros_like(x))
    return x_next + signal_scale(sigma_next, flow) * combined


def sample_sa_solver(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    *,
    eta: float = 1.0,
    sde_start_percent: float = 0.2,
    sde_end_percent: float = 0.8,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Predictor of up to predictor_order steps, corrector of up to corrector_order; both drop
    to lower orders near the end of a schedule that ends at 0, as ComfyUI's does."""
    if len(sigmas) <= 1:
        return x
    model_sampling = model.model_sampling
    flow = model_sampling.flow
    noise = noise_sampler or run.gaussian(x)
    sigmas = offset_first_sigma(sigmas, model_sampling)
    lambdas = half_log_snr(sigmas, flow)
    top, bottom = percent_to_sigma(model_sampling, sde_start_percent), percent_to_sigma(model_sampling, sde_end_percent)

    def tau_at(sigma: torch.Tensor) -> float:
        return eta if eta > 0 and top >= float(sigma) >= bottom else 0.0

    count = len(sigmas) - 1
    ends_at_zero = float(sigmas[-1]) == 0
    estimates: list[torch.Tensor] = []  # the last max(orders) estimates, oldest first
    x_pred, tau, step_noise = x, 0.0, torch.zeros_like(x)
    for i in range(count):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x_pred, sigma)
        estimates = [*estimates, denoised][-max(predictor_order, corrector_order) :]
        predictor = min(predictor_order, len(estimates))
        last_without_pece = float(sigma_next) == 0 and not use_pece
        corrector = 0 if i == 0 or last_without_pece else min(corrector_order, len(estimates))
        if ends_at_zero:
            predictor, corrector = min(predictor, count - 1 - i), min(corrector, count - i)
        if corrector == 0:
            x = x_pred
        else:
            x = adams_step(x, estimates[-corrector:], lambdas, sigmas, i - 1, tau, flow, simple_order_2, True)
            if tau > 0 and s_noise > 0:
                x = x + step_noise
            if use_pece:
                denoised = model(x, sigma)
                estimates[-1] = denoised
        if float(sigma_next) == 0:
            x_pred = denoised
        else:
            tau = tau_at(sigma_next)
            x_pred = adams_step(x, estimates[-predictor:], lambdas, sigmas, i, tau, flow, simple_order_2, False)
            if tau > 0 and s_noise > 0:
                h = lambdas[i + 1] - lambdas[i]
                spread = torch.sqrt(-torch.expm1(-2 * tau**2 * h))
                step_noise = noise(sigma, sigma_next) * sigma_next * spread * s_noise
                x_pred = x_pred + step_noise
        run.step(i, x_pred, denoised)
    return x_pred


SA_SOLVER = (
    ("eta", 1.0),
    ("sde_start_percent", 0.2),
    ("sde_end_percent", 0.8),
    ("s_noise", 1.0),
    ("predictor_order", 3),
    ("corrector_order", 4),
    ("simple_order_2", False),
)
SAMPLERS: dict[str, Sampler] = {
    "sa_solver": Sampler("sa_solver", sample_sa_solver, (*SA_SOLVER, ("use_pece", False))),
    "sa_solver_pece": Sampler("sa_solver_pece", sample_sa_solver, (*SA_SOLVER, ("use_pece", True))),
}
