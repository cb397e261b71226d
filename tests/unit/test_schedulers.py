"""Schedulers against ComfyUI's definitions, recomputed here in numpy from the formulas for
SD1.5's noise schedule (beta_start 0.00085, beta_end 0.012, 1000 steps, betas linear in sqrt),
10 steps, within 1e-4; plus the nodes that make and cut SIGMAS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from plinth.nodes.sampling.model_sampling import discrete, from_scheduler_config, scaled_linear_sigmas
from plinth.nodes.sampling.schedulers import SCHEDULERS, calculate_sigmas, denoise_sigmas
from plinth.nodes.sigmas import FlipSigmas, SetFirstSigma, SplitSigmas, SplitSigmasDenoise

BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
ALPHA_BAR = np.cumprod(1 - BETAS)
TABLE = np.sqrt((1 - ALPHA_BAR) / ALPHA_BAR).astype(np.float32).astype(np.float64)  # kept as float32
LOG = np.log(TABLE)
SMIN, SMAX = TABLE[0], TABLE[-1]


def sigma_at(t: float) -> float:
    """Log-linear interpolation in the table at fractional training step t."""
    t = min(max(t, 0), 999)
    low, high = math.floor(t), math.ceil(t)
    w = t - low
    return math.exp((1 - w) * LOG[low] + w * LOG[high])


def nearest_step(sigma: float) -> int:
    return int(np.abs(np.log(sigma) - LOG).argmin())


def reference(name: str, n: int) -> list[float]:
    if name == "simple":
        return [TABLE[-(1 + int(i * 1000 / n))] for i in range(n)] + [0.0]
    if name == "karras":
        ramp = np.linspace(0, 1, n)
        return list((SMAX ** (1 / 7) + ramp * (SMIN ** (1 / 7) - SMAX ** (1 / 7))) ** 7) + [0.0]
    if name == "exponential":
        return list(np.exp(np.linspace(math.log(SMAX), math.log(SMIN), n))) + [0.0]
    if name == "normal":
        return [sigma_at(t) for t in np.linspace(999, 0, n)] + [0.0]
    if name == "sgm_uniform":
        return [sigma_at(t) for t in np.linspace(999, 0, n + 1)[:-1]] + [0.0]
    if name == "ddim_uniform":
        return [TABLE[i] for i in range(1, 1000, 1000 // n)][::-1] + [0.0]
    if name == "beta":
        steps = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999)
        return [TABLE[int(s)] for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]] + [0.0]
    if name == "kl_optimal":
        f = np.arange(n) / (n - 1)
        return list(np.tan(f * math.atan(SMIN) + (1 - f) * math.atan(SMAX))) + [0.0]
    if name == "linear_quadratic":
        lin = n // 2
        quad = n - lin
        diff = lin - 0.025 * n
        qc = diff / (lin * quad**2)
        lc = 0.025 / lin - 2 * diff / quad**2
        ramp = [i * 0.025 / lin for i in range(lin)] + [qc * i**2 + lc * i + qc * lin**2 for i in range(lin, n)]
        return [(1 - x) * SMAX for x in [*ramp, 1.0]]
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sd15_sigmas_match_comfyuis_definitions(name):
    ms = from_scheduler_config({})
    ours = calculate_sigmas(ms, name, 10).double().numpy()
    expected = np.array(reference(name, 10))
    assert ours.shape == expected.shape, (ours, expected)
    assert np.abs(ours - expected).max() < 1e-4, (ours, expected)
    assert ours[-1] == 0 and (np.diff(ours) <= 0).all()


def test_the_table_is_sd15s():
    table = scaled_linear_sigmas(0.00085, 0.012).double().numpy()
    assert np.abs(table - TABLE).max() < 1e-6
    assert abs(SMAX - 14.6146) < 1e-4 and abs(SMIN - 0.0292) < 1e-4


def test_times_round_to_the_nearest_training_step():
    ms = from_scheduler_config({})
    for sigma in (0.05, 1.0, 7.3, 14.0):
        assert int(ms.timestep(torch.tensor(sigma))) == nearest_step(sigma)


def test_lcm_uses_the_50_distilled_steps():
    lcm = discrete("lcm", scaled_linear_sigmas(0.00085, 0.012))
    assert len(lcm.table) == 50 and abs(lcm.sigma_max - SMAX) < 1e-5 and abs(lcm.sigma_min - TABLE[19]) < 1e-5
    sigmas = calculate_sigmas(lcm, "simple", 4)
    assert [int(t) for t in lcm.timestep(sigmas[:-1])] == [999, 759, 499, 259]


def test_denoise_keeps_the_low_noise_end_of_a_longer_schedule():
    ms = from_scheduler_config({})
    full = calculate_sigmas(ms, "karras", 20)
    assert torch.equal(denoise_sigmas(ms, "karras", 10, 0.5), full[-11:])
    assert len(denoise_sigmas(ms, "karras", 10, 0.0)) == 0


def test_sigma_nodes_split_flip_and_set():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    high, low = SplitSigmas().run(None, sigmas, 2)
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = SplitSigmasDenoise().run(None, sigmas, 0.5)
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    (flipped,) = FlipSigmas().run(None, sigmas)
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 5.0, 10.0])
    (first,) = SetFirstSigma().run(None, sigmas, 136.0)
    assert first.tolist() == [136.0, 5.0, 2.0, 1.0, 0.0] and sigmas[0] == 10.0
