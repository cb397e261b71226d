"""Every step of the DPM-Solver++ family, ER-SDE and SEEDS against references written out here
from the published update rules (Lu et al. 2022; k-diffusion's SDE forms as ComfyUI uses them;
Cui et al. 2023; Gonzalez et al. 2023), in scalar math and float64. The denoiser's estimates are
linear in x with sigma-dependent offsets, so each coefficient of a step shows in the result, and
the noise is scripted from each call's arguments, so the noise's intervals and order count too.
SA-Solver's reference is in test_samplers_sa_solver_steps.py."""

from __future__ import annotations

import math

import pytest
import torch
from support.sampling_fakes import ScriptedNoise, linear_denoiser

from plinth.nodes.sampling import samplers_dpmpp, samplers_sde, samplers_seeds
from plinth.nodes.sampling.base import SamplerRun

SHAPE = (2, 3, 4, 4)
SCHEDULES = {False: [14.6, 6.1, 2.4, 0.75, 0.0], True: [1.0, 0.83, 0.6, 0.31, 0.0]}


def lam(s: float, flow: bool) -> float:
    return math.log((1 - s) / s) if flow else -math.log(s)


def sig(lam_: float, flow: bool) -> float:
    return 1 / (1 + math.exp(lam_)) if flow else math.exp(-lam_)


def alpha(s: float, flow: bool) -> float:
    return 1 - s if flow else 1.0


def start(sigmas: list[float], flow: bool) -> list[float]:
    """The half-log-SNR solvers begin a flow schedule at percent 1e-4 (0.9999) instead of 1."""
    return [0.9999, *sigmas[1:]] if flow and sigmas[0] >= 1 else sigmas


def ve_ancestral(s: float, s_next: float, eta: float) -> tuple[float, float]:
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - up**2), up


class Reference:
    """The fake denoiser and scripted noise a reference steps with, taking floats for sigmas."""

    def __init__(self, flow: bool) -> None:
        self.model, self.noise = linear_denoiser(SHAPE, flow), ScriptedNoise(SHAPE)

    def d(self, x: torch.Tensor, s: float) -> torch.Tensor:
        return self.model(x, torch.tensor(s, dtype=torch.float64))


def ref_2s_ancestral(ref, x, sigmas, flow, eta, s_noise, cfg_pp):
    out = []
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        d0 = ref.d(x, s)
        g0 = ref.model.last_uncond if cfg_pp else d0
        if flow:
            sd = s_next * (1 + (s_next / s - 1) * eta)
            renoise = math.sqrt(max(s_next**2 - sd**2 * (1 - s_next) ** 2 / (1 - sd) ** 2, 0.0))
        else:
            sd, renoise = ve_ancestral(s, s_next, eta)
        if sd == 0:
            x_new = g0
        elif flow:  # DDIM-style substeps in sigma (ComfyUI's RF form)
            s_mid = 0.9999 if s == 1 else sig((lam(s, True) + lam(sd, True)) / 2, True)
            d1 = ref.d((s_mid / s) * x + (1 - s_mid / s) * g0, s_mid)
            g1 = ref.model.last_uncond if cfg_pp else d1
            x_new = (sd / s) * x + (1 - sd / s) * g1
        else:  # DPM-Solver++(2S), r = 1/2, in t = -log sigma
            t, t_next = -math.log(s), -math.log(sd)
            h = t_next - t
            s_mid = math.exp(-(t + h / 2))
            d1 = ref.d((s_mid / s) * x - math.expm1(-h / 2) * g0, s_mid)
            g1 = ref.model.last_uncond if cfg_pp else d1
            x_new = (sd / s) * x - math.expm1(-h) * g1
        if s_next > 0:
            ratio = (1 - s_next) / (1 - sd) if flow else 1.0
            x_new = ratio * x_new + ref.noise(s, s_next) * s_noise * renoise
        if cfg_pp:
            x_new = x_new + alpha(s_next, flow) * (d0 - g0)
        x = x_new
        out.append(x)
    return out


def ref_dpmpp_sde(ref, x, sigmas, flow, eta, s_noise, r):
    out = []
    sigmas = start(sigmas, flow)
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        d0 = ref.d(x, s)
        if s_next == 0:
            x = d0
        else:
            ls, lt = lam(s, flow), lam(s_next, flow)
            l1 = ls + r * (lt - ls)
            s1 = sig(l1, flow)
            # stage 1: to s1 with ancestral noise in sigma / alpha = exp(-lambda)
            down, up = ve_ancestral(math.exp(-ls), math.exp(-l1), eta)
            h_ = -math.log(down) - ls
            x1 = alpha(s1, flow) / alpha(s, flow) * math.exp(-h_) * x - alpha(s1, flow) * math.expm1(-h_) * d0
            x1 = x1 + alpha(s1, flow) * ref.noise(s, s1) * s_noise * up
            d1 = ref.d(x1, s1)
            fac = 1 / (2 * r)
            down, up = ve_ancestral(math.exp(-ls), math.exp(-lt), eta)
            h_ = -math.log(down) - ls
            mix = (1 - fac) * d0 + fac * d1
            x = alpha(s_next, flow) / alpha(s, flow) * math.exp(-h_) * x - alpha(s_next, flow) * math.expm1(-h_) * mix
            x = x + alpha(s_next, flow) * ref.noise(s, s_next) * s_noise * up
        out.append(x)
    return out


def ref_2m(ref, x, sigmas, cfg_pp):
    out, old = [], None
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:], strict=False)):
        d = ref.d(x, s)
        u = ref.model.last_uncond if cfg_pp else d
        if s_next == 0:
            x = d
        else:
            h = math.log(s / s_next)
            if old is None:
                correction = 0 * d
            else:
                r = math.log(sigmas[i - 1] / s) / h
                correction = (d - old) / (2 * r)
            if cfg_pp:  # CFG++: renoise along the unguided estimate
                x = d + math.exp(-h) * (x - u) - math.expm1(-h) * correction
            else:  # DPM-Solver++(2M): D = (1 + 1/2r) d - 1/2r d_old
                x = (s_next / s) * x - math.expm1(-h) * (d + correction)
        old = u
        out.append(x)
    return out


def ref_multistep_sde(ref, x, sigmas, flow, eta, s_noise, kind):
    out, ds, hs = [], [], []
    sigmas = start(sigmas, flow)
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        d = ref.d(x, s)
        h = lam(s_next, flow) - lam(s, flow) if s_next > 0 else math.inf
        if s_next == 0:
            x = d
        else:
            he = h * (eta + 1)
            a = alpha(s_next, flow)
            x = (s_next / s) * math.exp(-h * eta) * x - a * math.expm1(-he) * d
            phi_2 = math.expm1(-he) / he + 1
            if ds and (kind != "3m" or len(ds) == 1):
                d1 = (d - ds[-1]) * h / hs[-1]
                x = x + (-0.5 * a * math.expm1(-he) if kind == "midpoint" else a * phi_2) * d1
            elif ds:
                r0, r1 = hs[-1] / h, hs[-2] / h
                d1_0, d1_1 = (d - ds[-1]) / r0, (ds[-1] - ds[-2]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + a * phi_2 * d1 - a * (phi_2 / he - 0.5) * d2
            x = x + ref.noise(s, s_next) * s_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        ds, hs = (ds + [d])[-2:], (hs + [h])[-2:]
        out.append(x)
    return out


def ref_er_sde(ref, x, sigmas, flow, s_noise, max_stage, scaler):
    """ER-SDE-Solver-3 in t = sigma / alpha with noise scale function `scaler`; its integrals
    of 1 / scaler by the 200-point left sum from t_next that ComfyUI uses."""
    out, ds, slopes = [], [], []
    sigmas = start(sigmas, flow)
    ts = [s / alpha(s, flow) for s in sigmas]
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:], strict=False)):
        d = ref.d(x, s)
        if s_next == 0:
            x = d
        else:
            t, tn, a = ts[i], ts[i + 1], alpha(s_next, flow)
            ratio = scaler(tn) / scaler(t)
            x = a / alpha(s, flow) * ratio * x + a * (1 - ratio) * d
            stages = min(max_stage, i + 1)
            dt = tn - t
            points = [tn - k * dt / 200 for k in range(200)]
            if stages >= 2:
                slope = (d - ds[-1]) / (t - ts[i - 1])
                s_1 = sum(1 / scaler(p) for p in points) * (-dt / 200)
                x = x + a * (dt + s_1 * scaler(tn)) * slope
                if stages >= 3:
                    s_u = sum((p - t) / scaler(p) for p in points) * (-dt / 200)
                    x = x + a * (dt**2 / 2 + s_u * scaler(tn)) * (slope - slopes[-1]) / ((t - ts[i - 2]) / 2)
                slopes.append(slope)
            x = x + a * ref.noise(s, s_next) * s_noise * math.sqrt(max(tn**2 - t**2 * ratio**2, 0.0))
        ds.append(d)
        out.append(x)
    return out


def hphi2(z):
    return (math.expm1(z) - z) / z


def ref_seeds(ref, x, sigmas, flow, eta, s_noise, stages, solver_type):
    """SEEDS-2 (r = 1/2) and SEEDS-3 (1/3, 2/3) written stage by stage."""
    out = []
    sigmas = start(sigmas, flow)
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        d = ref.d(x, s)
        if s_next == 0:
            x = d
            out.append(x)
            continue
        ls = lam(s, flow)
        h = lam(s_next, flow) - ls
        he = h * (eta + 1)

        r1 = 0.5 if stages == 2 else 1 / 3
        s1 = sig(ls + r1 * h, flow)
        n1 = math.sqrt(-math.expm1(-2 * r1 * h * eta)) * ref.noise(s, s1)
        x1 = (s1 / s) * math.exp(-r1 * h * eta) * x - alpha(s1, flow) * math.expm1(-r1 * he) * d + n1 * s1 * s_noise
        d1 = ref.d(x1, s1)
        if stages == 3:
            r2 = 2 / 3
            s2 = sig(ls + r2 * h, flow)
            a32 = r2 / r1 * hphi2(-r2 * he)
            seg = (r1 - r2) * h * eta
            n2 = n1 * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * ref.noise(s1, s2)
            x2 = (
                (s2 / s) * math.exp(-r2 * h * eta) * x
                - alpha(s2, flow) * ((math.expm1(-r2 * he) - a32) * d + a32 * d1)
                + n2 * s2 * s_noise
            )
            d_last, r_last, n_last, s_last = ref.d(x2, s2), r2, n2, s2
        else:
            d_last, r_last, n_last, s_last = d1, r1, n1, s1
        if solver_type == "phi_1":
            x = (s_next / s) * math.exp(-h * eta) * x - alpha(s_next, flow) * math.expm1(-he) * (
                d + (d_last - d) / (2 * r_last)
            )
        else:
            b = hphi2(-he) / r_last
            x = (s_next / s) * math.exp(-h * eta) * x - alpha(s_next, flow) * ((math.expm1(-he) - b) * d + b * d_last)
        seg = (r_last - 1) * h * eta
        n = n_last * math.exp(seg) + math.sqrt(-math.expm1(2 * seg)) * ref.noise(s_last, s_next)
        x = x + n * s_next * s_noise
        out.append(x)
    return out


def er_default(t):
    return t * (math.exp(t**0.3) + 10)


CASES = {
    "dpmpp_2s_ancestral": (samplers_dpmpp.SAMPLERS, lambda *a: ref_2s_ancestral(*a, 1.0, 1.0, False)),
    "dpmpp_2s_ancestral eta 0.5": (samplers_dpmpp.SAMPLERS, lambda *a: ref_2s_ancestral(*a, 0.5, 1.0, False)),
    "dpmpp_2s_ancestral_cfg_pp": (samplers_dpmpp.SAMPLERS, lambda *a: ref_2s_ancestral(*a, 1.0, 1.0, True)),
    "dpmpp_sde": (samplers_dpmpp.SAMPLERS, lambda *a: ref_dpmpp_sde(*a, 1.0, 1.0, 0.5)),
    "dpmpp_sde r 0.3 s_noise 0.7": (samplers_dpmpp.SAMPLERS, lambda *a: ref_dpmpp_sde(*a, 1.0, 0.7, 0.3)),
    "dpmpp_2m": (samplers_dpmpp.SAMPLERS, lambda ref, x, sig_, flow: ref_2m(ref, x, sig_, False)),
    "dpmpp_2m_cfg_pp": (samplers_dpmpp.SAMPLERS, lambda ref, x, sig_, flow: ref_2m(ref, x, sig_, True)),
    "dpmpp_2m_sde": (samplers_sde.SAMPLERS, lambda *a: ref_multistep_sde(*a, 1.0, 1.0, "midpoint")),
    "dpmpp_2m_sde_heun": (samplers_sde.SAMPLERS, lambda *a: ref_multistep_sde(*a, 1.0, 1.0, "heun")),
    "dpmpp_3m_sde": (samplers_sde.SAMPLERS, lambda *a: ref_multistep_sde(*a, 1.0, 1.0, "3m")),
    "dpmpp_3m_sde eta 0.4": (samplers_sde.SAMPLERS, lambda *a: ref_multistep_sde(*a, 0.4, 1.0, "3m")),
    "er_sde": (samplers_sde.SAMPLERS, lambda *a: ref_er_sde(*a, 1.0, 3, er_default)),
    "er_sde max_stage 2, t^2 scaler": (samplers_sde.SAMPLERS, lambda *a: ref_er_sde(*a, 1.0, 2, lambda t: t**2)),
    "seeds_2": (samplers_seeds.SAMPLERS, lambda *a: ref_seeds(*a, 1.0, 1.0, 2, "phi_1")),
    "seeds_2 phi_2": (samplers_seeds.SAMPLERS, lambda *a: ref_seeds(*a, 1.0, 1.0, 2, "phi_2")),
    "seeds_3": (samplers_seeds.SAMPLERS, lambda *a: ref_seeds(*a, 1.0, 1.0, 3, "phi_2")),
    "seeds_3 eta 0.5": (samplers_seeds.SAMPLERS, lambda *a: ref_seeds(*a, 0.5, 1.0, 3, "phi_2")),
}
OPTIONS = {
    "dpmpp_2s_ancestral eta 0.5": {"eta": 0.5},
    "dpmpp_sde r 0.3 s_noise 0.7": {"r": 0.3, "s_noise": 0.7},
    "dpmpp_3m_sde eta 0.4": {"eta": 0.4},
    "er_sde max_stage 2, t^2 scaler": {"max_stage": 2, "noise_scaler": lambda t: t**2},
    "seeds_2 phi_2": {"solver_type": "phi_2"},
    "seeds_3 eta 0.5": {"eta": 0.5},
}


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_step_matches_the_published_update(case, flow):
    samplers, reference = CASES[case]
    sampler = samplers[case.split()[0]]
    sigmas = SCHEDULES[flow]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x if flow else x * sigmas[0]
    expected = reference(Reference(flow), x, sigmas, flow)
    seen: list[torch.Tensor] = []
    run = SamplerRun(seed=0, on_step=lambda i, x_, d: seen.append(x_))
    options = dict(sampler.options) | OPTIONS.get(case, {})
    if sampler.name not in ("dpmpp_2m", "dpmpp_2m_cfg_pp"):  # the samplers that draw noise take it scripted
        options["noise_sampler"] = ScriptedNoise(SHAPE)
    sampler.fn(linear_denoiser(SHAPE, flow), x, torch.tensor(sigmas, dtype=torch.float64), run, **options)
    assert len(seen) == len(expected) == len(sigmas) - 1
    errors = [float((got - want).abs().max()) for got, want in zip(seen, expected, strict=True)]
    assert max(errors) < 1e-5, errors
