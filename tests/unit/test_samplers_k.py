"""k-diffusion's samplers against the published step formulas, written out here once more.

The denoiser is linear in x with a sigma-dependent offset (D = 0.3 x + b(sigma) c, and a different
unguided estimate for CFG++), so every term of a step matters; noise is scripted so ancestral
steps can be followed exactly. Each sampler runs a whole schedule (7 or 6 steps, ending at 0),
which covers its first step, its multistep start-up and its last step to sigma 0, and every
intermediate x must match the reference to 1e-5 (float64)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from support.sampling_fakes import FakeDenoise, ScriptedRun

from plinth.nodes.sampling.samplers_k import SAMPLERS

GEN = torch.Generator().manual_seed(1234)
C_GUIDED = torch.randn(2, 3, 4, 4, generator=GEN, dtype=torch.float64)
C_UNGUIDED = torch.randn(2, 3, 4, 4, generator=GEN, dtype=torch.float64)
NOISES = [torch.randn(2, 3, 4, 4, generator=GEN, dtype=torch.float64) for _ in range(16)]
START = torch.randn(2, 3, 4, 4, generator=GEN, dtype=torch.float64)
SIGMAS_EPS = [3.0, 2.2, 1.7, 1.2, 0.9, 0.6, 0.4, 0.0]
SIGMAS_FLOW = [1.0, 0.85, 0.7, 0.5, 0.3, 0.15, 0.0]


def D(x: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    return 0.3 * x + (1 + 0.5 * math.sin(float(s))) * C_GUIDED


def U(x: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    return 0.6 * x - 0.2 * (1 + 0.5 * math.cos(float(s))) * C_UNGUIDED


def deriv(x: torch.Tensor, s: float) -> torch.Tensor:
    return (x - D(x, s)) / s


def steps(sig: list[float]) -> Iterator[tuple[int, float, float]]:
    return ((i, sig[i], sig[i + 1]) for i in range(len(sig) - 1))


def ref_euler(x, sig, flow, noise):
    for _, s, t in steps(sig):
        yield (x := x + deriv(x, s) * (t - s))


def ref_heun(x, sig, flow, noise):
    for _, s, t in steps(sig):
        d = deriv(x, s)
        if t == 0:
            x = x + d * (t - s)
        else:
            x_2 = x + d * (t - s)
            x = x + (d + deriv(x_2, t)) / 2 * (t - s)
        yield x


def ref_dpm_2(x, sig, flow, noise):
    for _, s, t in steps(sig):
        d = deriv(x, s)
        if t == 0:
            x = x + d * (t - s)
        else:
            mid = math.sqrt(s * t)
            x = x + deriv(x + d * (mid - s), mid) * (t - s)
        yield x


def ref_heunpp2(x, sig, flow, noise):
    end, top = sig[-1], sig[0]
    for i, s, t in steps(sig):
        d = deriv(x, s)
        if t == end:
            x = x + d * (t - s)
        elif sig[i + 2] == end:
            d_2 = deriv(x + d * (t - s), t)
            x = x + ((1 - t / (2 * top)) * d + t / (2 * top) * d_2) * (t - s)
        else:
            u = sig[i + 2]
            x_2 = x + d * (t - s)
            d_2 = deriv(x_2, t)
            d_3 = deriv(x_2 + d_2 * (u - t), u)
            w_2, w_3 = t / (3 * top), u / (3 * top)
            x = x + ((1 - w_2 - w_3) * d + w_2 * d_2 + w_3 * d_3) * (t - s)
        yield x


def ref_lms(x, sig, flow, noise):
    """Adams-Bashforth on the actual sigma grid: each weight is the exact integral (numpy
    polynomials) of a Lagrange basis polynomial over the step."""
    ds = []
    for i, s, t in steps(sig):
        ds.append(deriv(x, s))
        if t == 0:
            x = D(x, s)
        else:
            nodes = [sig[i - j] for j in range(min(i + 1, 4))]
            for j, node in enumerate(nodes):
                others = [n for n in nodes if n != node]
                basis = np.poly1d(others, r=True) / np.prod([node - n for n in others])
                x = x + (basis.integ()(t) - basis.integ()(s)) * ds[i - j]
        yield x


def ve_split(s: float, t: float, eta: float) -> tuple[float, float]:
    """sigma_down, sigma_up of an ancestral step, k-diffusion's get_ancestral_step."""
    if t == 0 or eta == 0:
        return t, 0.0
    up = min(t, eta * math.sqrt(t**2 * (s**2 - t**2) / s**2))
    return math.sqrt(t**2 - up**2), up


def flow_split(s: float, t: float, eta: float) -> tuple[float, float, float]:
    """sigma_down, signal ratio, renoise of ComfyUI's rectified-flow ancestral step."""
    if t == 0:
        return 0.0, 1.0, 0.0
    down = t * (1 + (t / s - 1) * eta)
    ratio = (1 - t) / (1 - down)
    return down, ratio, math.sqrt(t**2 - down**2 * ratio**2)


def ref_euler_ancestral(x, sig, flow, noise):
    for _, s, t in steps(sig):
        if flow:
            down, ratio, renoise = flow_split(s, t, 1.0)
            x = down / s * x + (1 - down / s) * D(x, s)
            x = ratio * x + next(noise) * renoise if t > 0 else x
        else:
            down, up = ve_split(s, t, 1.0)
            x = D(x, s) if down == 0 else x + deriv(x, s) * (down - s) + next(noise) * up
        yield x


def ref_dpm_2_ancestral(x, sig, flow, noise):
    for _, s, t in steps(sig):
        if flow:
            down, ratio, up = flow_split(s, t, 1.0)
        else:
            (down, up), ratio = ve_split(s, t, 1.0), 1.0
        d = deriv(x, s)
        if down == 0:
            x = x - d * s
        else:
            mid = math.sqrt(s * down)
            x = x + deriv(x + d * (mid - s), mid) * (down - s)
            x = ratio * x + next(noise) * up
        yield x


def cfg_pp(eta: float) -> Callable:
    """CFG++ (Chung et al. 2024): x_t = alpha_t (D + sigma_down eps_uncond + sigma_up noise), the
    ancestral split taken on sigma / alpha (alpha = 1, or 1 - sigma for flow)."""

    def reference(x, sig, flow, noise):
        for _, s, t in steps(sig):
            if t == 0:
                x = D(x, s)
                yield x
                continue
            a_s, a_t = (1 - s, 1 - t) if flow else (1.0, 1.0)
            if not eta:
                down, up = t / a_t, 0.0
            elif a_s == 0:
                down, up = 0.0, t / a_t  # the split's limit as sigma / alpha grows without bound
            else:
                down, up = ve_split(s / a_s, t / a_t, eta)
            eps_uncond = (x - a_s * U(x, s)) / s
            x = a_t * (D(x, s) + down * eps_uncond) + (a_t * up * next(noise) if eta else 0)
            yield x

    return reference


def ref_ddpm(x, sig, flow, noise):
    """Ho et al. 2020, Algorithm 2, on x / sqrt(1 + sigma^2) with alpha_bar = 1 / (1 + sigma^2)."""
    for _, s, t in steps(sig):
        eps = (x - D(x, s)) / s
        ab, ab_prev = 1 / (1 + s**2), 1 / (1 + t**2)
        alpha = ab / ab_prev
        mean = (x / math.sqrt(1 + s**2) - (1 - alpha) / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)
        if t > 0:
            std = math.sqrt((1 - alpha) * (1 - ab_prev) / (1 - ab))
            x = (mean + std * next(noise)) * math.sqrt(1 + t**2)
        else:
            x = mean
        yield x


def ref_lcm(x, sig, flow, noise):
    for _, s, t in steps(sig):
        x = D(x, s)
        if t > 0:
            x = t * next(noise) + (1 - t) * x if flow else x + t * next(noise)
        yield x


REFERENCES = {
    "euler": ref_euler,
    "ddim": ref_euler,
    "heun": ref_heun,
    "heunpp2": ref_heunpp2,
    "dpm_2": ref_dpm_2,
    "lms": ref_lms,
    "euler_ancestral": ref_euler_ancestral,
    "dpm_2_ancestral": ref_dpm_2_ancestral,
    "euler_cfg_pp": cfg_pp(0.0),
    "euler_ancestral_cfg_pp": cfg_pp(1.0),
    "ddpm": ref_ddpm,
    "lcm": ref_lcm,
}
CASES = [(name, flow) for name in REFERENCES for flow in (False, True) if not (flow and name == "ddpm")]


def run_sampler(name: str, flow: bool, **options: float) -> tuple[list[torch.Tensor], int]:
    sigmas = torch.tensor(SIGMAS_FLOW if flow else SIGMAS_EPS, dtype=torch.float64)
    run = ScriptedRun(NOISES)
    sampler = SAMPLERS[name]
    sampler.fn(FakeDenoise(D, U, flow), START.clone(), sigmas, run, **{**dict(sampler.options), **options})
    return [x for _, x, _ in run.steps], run.draws


@pytest.mark.parametrize("name,flow", CASES)
def test_every_step_follows_the_published_formula(name, flow):
    got, draws = run_sampler(name, flow)
    noise = iter(NOISES)
    expected = list(REFERENCES[name](START.clone(), SIGMAS_FLOW if flow else SIGMAS_EPS, flow, noise))
    assert len(got) == len(expected)
    errors = [float((a - b).abs().max()) for a, b in zip(got, expected, strict=True)]
    assert max(errors) < 1e-5, errors
    assert draws == len(NOISES) - len(list(noise)), "the sampler drew another number of noises"


def test_churn_lifts_sigma_with_seeded_noise_inside_its_window():
    """Karras et al. 2022, Algorithm 2: sigma_hat = sigma (1 + gamma), gamma = min(churn / N,
    sqrt 2 - 1), x += sqrt(sigma_hat^2 - sigma^2) s_noise noise, only for s_tmin <= sigma <= s_tmax."""
    got, draws = run_sampler("euler", False, s_churn=2.0, s_tmax=2.0, s_noise=0.9)
    gamma = min(2.0 / 7, 2**0.5 - 1)
    x, noise = START.clone(), iter(NOISES)
    for (_, s, t), step in zip(steps(SIGMAS_EPS), got, strict=True):
        hat = s * (1 + gamma) if s <= 2.0 else s
        x = x + math.sqrt(hat**2 - s**2) * 0.9 * next(noise) if hat != s else x
        x = x + deriv(x, hat) * (t - hat)
        assert float((x - step).abs().max()) < 1e-5
    assert draws == 5  # sigmas 1.7 .. 0.4


def test_cfg_pp_without_an_unguided_estimate_is_plain_euler():
    sigmas = torch.tensor(SIGMAS_EPS, dtype=torch.float64)
    outs = [SAMPLERS[n](FakeDenoise(D), START.clone(), sigmas, ScriptedRun()) for n in ("euler_cfg_pp", "euler")]
    assert float((outs[0] - outs[1]).abs().max()) < 1e-12


def test_the_list_is_comfyuis_with_its_defaults():
    assert sorted(SAMPLERS) == sorted([*REFERENCES, "dpm_fast", "dpm_adaptive"])
    assert dict(SAMPLERS["euler_ancestral"].options) == {"eta": 1.0, "s_noise": 1.0}
    assert dict(SAMPLERS["heun"].options) == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    assert dict(SAMPLERS["lms"].options) == {"order": 4}
    assert SAMPLERS["ddim"].fn is SAMPLERS["euler"].fn  # ComfyUI's ddim is its Euler sampler
