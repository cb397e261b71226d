"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), multistep, in data prediction, in sigma space, as ComfyUI runs it.

Time is lambda = -log(sigma); a step of length h = lambda_next - lambda from the newest x0
estimate m0 starts from the first-order (DDIM) step x_lin = (sigma_next / sigma) x -
expm1(-h) m0 and subtracts B(h) times a combination of the divided differences
D_k = (m_k - m0) / r_k of earlier estimates (r_k: their distance in units of h). The predictor
UniP combines the history's differences; the corrector UniC redoes the same step once the model
has been called at the predicted point, with that new estimate as one more difference. Each
model call thus serves both the corrector of one step and the predictor of the next: one call
a step. The weights rho solve R rho = b, R_ik = r_k^(i-1), b_i = i! h phi_{i+1}(-h) / B(h), except
that order 2's predictor and order 1's corrector take rho = 1/2. B(h) = -h is variant "bh1"
(sampler uni_pc), B(h) = expm1(-h) is "bh2" (uni_pc_bh2); they differ only where rho = 1/2.

As in ComfyUI, the order of the step landing on sigma_i is min(i, 3, steps + 1 - i): it warms
up from 1 and falls again over the last steps (lower_order_final), and the last step, which has
no corrector, is first order. (ComfyUI also caps the order at steps - 1, which that rule already
implies, except with one step: there ComfyUI's order 0 hands the sample back unchanged, and
this module takes one first-order step.) Where the schedule ends at sigma 0, ComfyUI stops at
sigma 0.001 instead and returns that sample, its noise included; this module takes the last
step to 0, which lands on the x0 estimate. The time is -log(sigma) for flow models too, as in
ComfyUI; there the first-order step is still exact.
"""

from __future__ import annotations

import math

import torch

from plinth.nodes.sampling.base import Denoise, Sampler, SamplerRun, phi

VARIANTS = ("bh1", "bh2")
MAX_ORDER = 3


class _UniPCStep:
    """The coefficients of one step from sigma to sigma_next over the last `order` estimates,
    whose lambdas are `history` (newest last)."""

    def __init__(self, sigma: float, sigma_next: float, history: list[float], order: int, variant: str) -> None:
        h = math.log(sigma / sigma_next)
        self.ratio = sigma_next / sigma  # e^(-h)
        self.first_order = -math.expm1(-h)  # weight of m0 in x_lin
        self.b_h = -h if variant == "bh1" else math.expm1(-h)
        self.r = [(history[-1 - k] - history[-1]) / h for k in range(1, order)]
        neg_h = torch.tensor(-h, dtype=torch.float64)
        # B(h) b_i: the right-hand side scaled so that B(h) rho solves it whatever the variant.
        self.rhs = [math.factorial(i) * -h * float(phi(i + 1, neg_h)) for i in range(1, order + 1)]
        self.order = order

    def _solve(self, nodes: list[float], size: int) -> list[float]:
        """B(h) rho for R rho = b over the first `size` rows."""
        matrix = torch.tensor([[node**row for node in nodes] for row in range(size)], dtype=torch.float64)
        return torch.linalg.solve(matrix, torch.tensor(self.rhs[:size], dtype=torch.float64)).tolist()

    def predictor(self) -> list[float]:
        """The weights of D_1 .. D_{order-1} (B(h) included)."""
        if self.order == 1:
            return []
        if self.order == 2:
            return [0.5 * self.b_h]
        return self._solve(self.r, self.order - 1)

    def corrector(self) -> list[float]:
        """The weights of D_1 .. D_{order-1} and of the new estimate's difference (B(h) included)."""
        if self.order == 1:
            return [0.5 * self.b_h]
        return self._solve([*self.r, 1.0], self.order)


def _differences(estimates: list[torch.Tensor], step: _UniPCStep) -> list[torch.Tensor]:
    """D_k = (m_k - m0) / r_k for the earlier estimates, newest first."""
    return [(estimates[-1 - k] - estimates[-1]) / step.r[k - 1] for k in range(1, step.order)]


def _predict(x: torch.Tensor, estimates: list[torch.Tensor], step: _UniPCStep) -> torch.Tensor:
    x_lin = step.ratio * x + step.first_order * estimates[-1]
    return x_lin - sum(w * d for w, d in zip(step.predictor(), _differences(estimates, step), strict=True))


def _correct(x: torch.Tensor, estimates: list[torch.Tensor], new: torch.Tensor, step: _UniPCStep) -> torch.Tensor:
    x_lin = step.ratio * x + step.first_order * estimates[-1]
    differences = [*_differences(estimates, step), new - estimates[-1]]
    return x_lin - sum(w * d for w, d in zip(step.corrector(), differences, strict=True))


def sample_uni_pc(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, variant: str = "bh1"
) -> torch.Tensor:
    """Multistep UniPC (UniP predictor, UniC corrector) in data prediction."""
    if variant not in VARIANTS:
        raise ValueError(f"uni_pc: variant must be one of {VARIANTS}, got {variant!r}")
    s = sigmas.tolist()
    steps = len(s) - 1

    def order_of(i: int) -> int:
        """The order of the step that lands on sigma_i (warm-up, then lower_order_final)."""
        return min(i, MAX_ORDER, steps + 1 - i)

    estimates: list[torch.Tensor] = []  # the last MAX_ORDER x0 estimates, newest last
    lambdas: list[float] = []
    corrected = x  # the sample at sigma_i after the corrector
    for i in range(steps):
        denoised = model(x, sigmas[i])
        if i > 0:
            step = _UniPCStep(s[i - 1], s[i], lambdas, order_of(i), variant)
            corrected = _correct(corrected, estimates, denoised, step)
        estimates.append(denoised)
        lambdas.append(-math.log(s[i]))
        del estimates[:-MAX_ORDER], lambdas[:-MAX_ORDER]
        if s[i + 1] == 0:
            x = denoised
        else:
            x = _predict(corrected, estimates, _UniPCStep(s[i], s[i + 1], lambdas, order_of(i + 1), variant))
        run.step(i, x, denoised)
    return x


def sample_uni_pc_bh2(model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun) -> torch.Tensor:
    return sample_uni_pc(model, x, sigmas, run, variant="bh2")


SAMPLERS: dict[str, Sampler] = {
    "uni_pc": Sampler("uni_pc", sample_uni_pc),
    "uni_pc_bh2": Sampler("uni_pc_bh2", sample_uni_pc_bh2),
}
