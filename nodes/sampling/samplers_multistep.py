"""Linear multistep samplers of the sigma-space ODE, and the registry of this module's family.

iPNDM, iPNDM-v and DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
Integrator") step dx/dsigma = d = (x - D(x, sigma)) / sigma with a weighted sum of the current
and up to three earlier derivatives, one model call a step; the first steps warm up at lower
order (Euler, then two points, ...). iPNDM takes the fixed Adams-Bashforth weights, iPNDM-v the
variable-step weights of the zju-pi diff-solvers code ComfyUI uses (they equal Adams-Bashforth on
uniform steps up to third order), DEIS integrates a polynomial in a variance-preserving time
(deis_tab.py). Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving
Diffusion Models from an Optimization Perspective") adds (gamma - 1) times the change of d to
each Euler step. The ODE is the same for flow models ((x - x0) / sigma is their velocity), so
these serve both kinds unchanged, as in ComfyUI.

SAMPLERS maps ComfyUI's names of these samplers and of res_multistep's family to Samplers with
ComfyUI's defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plinth.nodes.sampling.base import Denoise, Sampler, SamplerRun, to_d
from plinth.nodes.sampling.deis_tab import tab_coefficients
from plinth.nodes.sampling.samplers_res_multistep import SAMPLERS as RES_MULTISTEP_SAMPLERS
from plinth.nodes.sampling.samplers_res_multistep import unguided

ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
"""Adams-Bashforth weights by order, newest derivative first."""

Weights = Callable[[int, int], list[float]]
"""weights(i, order) -> the absolute weights (step length included) of d_i, d_{i-1}, ..."""


def _check_order(name: str, max_order: int) -> None:
    if not 1 <= max_order <= 4:
        raise ValueError(f"{name}: max_order must be 1 to 4, got {max_order}")


def _multistep(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, max_order: int, weights: Weights
) -> torch.Tensor:
    """x_next = x + sum_k weights(i, order)[k] d_{i-k} with order = min(i + 1, max_order); the
    step to sigma 0 lands on the x0 estimate."""
    history: list[torch.Tensor] = []  # d_i, d_{i-1}, ...
    s = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        history.insert(0, to_d(x, sigmas[i], denoised))
        del history[max_order:]
        if s[i + 1] == 0:
            x = denoised
        else:
            step = weights(i, min(i + 1, max_order))
            x = x + sum(w * d for w, d in zip(step, history, strict=False))
        run.step(i, x, denoised)
    return x


def variable_step_weights(h: list[float]) -> tuple[float, ...]:
    """iPNDM-v's weights (relative to h[0]) for steps h = [h_n, h_{n-1}, ...] in sigma, by as many
    derivatives as h has steps, as the diff-solvers code (and ComfyUI) define them.

    The fourth-order weights keep upstream's last factor h[1] / h[2] where the divided
    difference asks for h[2] / h[3]: they then sum to 1 + tau_2 q (h[2] / h[3] - h[1] / h[2]),
    not 1, wherever the step ratio changes (linear_quadratic's knee). Kept so that ComfyUI's
    workflows give ComfyUI's pixels; the error is a few thousandths of the latent's scale."""
    if len(h) == 1:
        return (1.0,)
    r = h[0] / h[1]
    if len(h) == 2:
        return (1 + r / 2, -r / 2)
    ratio_1 = h[1] / h[2]
    tau_1 = (1 - h[0] ** 2 / (3 * h[1] * (h[1] + h[2]))) / 2
    if len(h) == 3:
        return (1 + r / 2 + tau_1, -r / 2 - (1 + ratio_1) * tau_1, tau_1 * ratio_1)
    h0, h01, h012 = h[0], h[0] + h[1], h[0] + h[1] + h[2]
    ratio_2 = h[2] / h[3]
    q = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    tau_2 = ((1 - h0 / (3 * h01)) / 2 + (1 - h0 / (2 * h01)) * h0 / (6 * h012)) * (
        h0 * h01 * h012 / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3]))
    )
    return (
        1 + r / 2 + tau_1 + tau_2,
        -r / 2 - (1 + ratio_1) * tau_1 - (1 + ratio_1 + q) * tau_2,
        tau_1 * ratio_1 + (ratio_1 + q * (1 + ratio_2)) * tau_2,
        -tau_2 * q * ratio_1,
    )


def sample_ipndm(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, max_order: int = 4
) -> torch.Tensor:
    """iPNDM: Adams-Bashforth steps in sigma with a lower-order warm start."""
    _check_order("ipndm", max_order)
    s = sigmas.tolist()
    return _multistep(
        model, x, sigmas, run, max_order, lambda i, order: [(s[i + 1] - s[i]) * w for w in ADAMS_BASHFORTH[order - 1]]
    )


def sample_ipndm_v(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, max_order: int = 4
) -> torch.Tensor:
    """iPNDM-v: iPNDM with weights that follow the schedule's uneven step lengths."""
    _check_order("ipndm_v", max_order)
    s = sigmas.tolist()

    def weights(i: int, order: int) -> list[float]:
        h = [s[i + 1 - k] - s[i - k] for k in range(order)]
        return [h[0] * w for w in variable_step_weights(h)]

    return _multistep(model, x, sigmas, run, max_order, weights)


def sample_deis(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, max_order: int = 3
) -> torch.Tensor:
    """DEIS with its tAB coefficients (ComfyUI's default deis_mode "tab")."""
    _check_order("deis", max_order)
    table = tab_coefficients(sigmas.tolist(), max_order)
    return _multistep(model, x, sigmas, run, max_order, lambda i, order: table[i])


def sample_gradient_estimation(
    model: Denoise,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    run: SamplerRun,
    ge_gamma: float = 2.0,
    cfg_pp: bool = False,
) -> torch.Tensor:
    """Euler steps plus (ge_gamma - 1) (d_i - d_{i-1}) dt from the second step on; the CFG++ form
    takes d from the unguided estimate and steps from the guided one."""
    previous_d: torch.Tensor | None = None
    s = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], unguided(model, denoised) if cfg_pp else denoised)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * s[i + 1] if cfg_pp else x + d * dt
            if previous_d is not None:
                x = x + (ge_gamma - 1) * (d - previous_d) * dt
        previous_d = d
        run.step(i, x, denoised)
    return x


def sample_gradient_estimation_cfg_pp(
    model: Denoise, x: torch.Tensor, sigmas: torch.Tensor, run: SamplerRun, ge_gamma: float = 2.0
) -> torch.Tensor:
    return sample_gradient_estimation(model, x, sigmas, run, ge_gamma=ge_gamma, cfg_pp=True)


SAMPLERS: dict[str, Sampler] = {
    sampler.name: sampler
    for sampler in (
        Sampler("ipndm", sample_ipndm, (("max_order", 4),)),
        Sampler("ipndm_v", sample_ipndm_v, (("max_order", 4),)),
        Sampler("deis", sample_deis, (("max_order", 3),)),
        Sampler("gradient_estimation", sample_gradient_estimation, (("ge_gamma", 2.0),)),
        Sampler("gradient_estimation_cfg_pp", sample_gradient_estimation_cfg_pp, (("ge_gamma", 2.0),)),
    )
} | RES_MULTISTEP_SAMPLERS
