"""The multistep samplers (iPNDM, iPNDM-v, DEIS, RES multistep, gradient estimation) against
references written out here from the published formulas (UniPC's are in test_samplers_unipc.py),
and all of them, UniPC included, against an oracle: a denoiser that always answers C, where
every consistent sampler must end, on epsilon and flow schedules, long and short. The reference
denoisers are in support/sampling_fakes.py."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate
from support.sampling_fakes import X0, FakeDenoise, guided, karras, oracle, phis, run_sampler, unguided

from plinth.nodes.sampling.base import SamplerRun
from plinth.nodes.sampling.samplers_multistep import SAMPLERS as MULTISTEP
from plinth.nodes.sampling.samplers_multistep import variable_step_weights
from plinth.nodes.sampling.samplers_unipc import SAMPLERS as UNIPC

SAMPLERS = MULTISTEP | UNIPC
NAMES = [
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
ANCESTRAL = ["res_multistep_ancestral", "res_multistep_ancestral_cfg_pp"]


# --- References: each returns the samples after the first `n` steps. ---


def ref_linear_multistep(sigmas: list[float], n: int, weights) -> list[torch.Tensor]:
    """x_{i+1} = x_i + sum_k w(i)[k] d_{i-k} with d = (x - D) / sigma."""
    x, ds, out = X0, [], []
    for i in range(n):
        ds.insert(0, (x - guided(x, sigmas[i])) / sigmas[i])
        x = x + sum(w * d for w, d in zip(weights(i), ds, strict=False))
        out.append(x)
    return out


AB = [[1.0], [1.5, -0.5], [23 / 12, -4 / 3, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -3 / 8]]


def ref_ipndm(s, n):
    return ref_linear_multistep(s, n, lambda i: [(s[i + 1] - s[i]) * w for w in AB[i]])


def ref_ipndm_v(s, n):
    def weights(i):
        h = [s[i + 1 - k] - s[i - k] for k in range(i + 1)]  # h_n, h_{n-1}, ...
        if i == 0:
            return [h[0]]
        c = [1 + h[0] / (2 * h[1]), -h[0] / (2 * h[1])]
        if i >= 2:
            t1 = 0.5 - h[0] ** 2 / (6 * h[1] * (h[1] + h[2]))
            c = [c[0] + t1, c[1] - t1 * (h[1] + h[2]) / h[2], t1 * h[1] / h[2]]
        if i >= 3:
            a, b, e = h[0], h[0] + h[1], h[0] + h[1] + h[2]
            t2 = (0.5 - a / (6 * b) + (1 - a / (2 * b)) * a / (6 * e)) * a * b * e
            t2 /= h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3])
            g = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
            c = [c[0] + t2, c[1] - (1 + h[1] / h[2] + g) * t2, c[2] + (h[1] / h[2] + g + g * h[2] / h[3]) * t2]
            c.append(-t2 * g * h[1] / h[2])
        return [h[0] * w for w in c]

    return ref_linear_multistep(s, n, weights)


def ref_deis(s, n):
    """tAB: weights are integrals over the step, in the VP time tau, of dsigma/dtau times the
    Lagrange basis polynomials in tau (the VP schedule fitted to sigma 0.002..80 on tau 1e-3..1)."""
    beta_d = 2 * (math.log(1 + 0.002**2) / 1e-3 - math.log(1 + 80**2)) / (1e-3 - 1)
    beta_min = math.log(1 + 80**2) - beta_d / 2

    def tau(sigma):
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + sigma**2)) - beta_min) / beta_d

    def dsigma(t):
        e = math.exp(beta_d * t * t / 2 + beta_min * t)
        return (beta_d * t + beta_min) * e / (2 * math.sqrt(e - 1))

    def weights(i):
        nodes = [tau(s[i - k]) for k in range(min(i + 1, 3))]

        def basis(k, t):
            return math.prod((t - nodes[j]) / (nodes[k] - nodes[j]) for j in range(len(nodes)) if j != k)

        lo, hi = tau(s[i]), tau(s[i + 1])
        return [
            integrate.quad(lambda t, k=k: dsigma(t) * basis(k, t), lo, hi, epsabs=1e-13)[0] for k in range(len(nodes))
        ]

    return ref_linear_multistep(s, n, weights)


def ref_res(s, n, cfg_pp=False, eta=0.0, noise=None):
    """RES second order in t = -log sigma: x' = e^-h x + h phi1 E + h phi2 (E - E_prev) / r, with
    E the x0 estimate (unguided for CFG++, whose x also takes the guidance D - U first), r the
    previous step's length over h; the first step is Euler; ancestral steps go to sigma_down."""
    x, out, previous, previous_down = X0, [], None, None
    for i in range(n):
        d, u = guided(x, s[i]), unguided(x, s[i])
        e = u if cfg_pp else d
        up = min(s[i + 1], eta * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
        down = math.sqrt(s[i + 1] ** 2 - up**2)
        if previous is None:
            x = d + down * (x - u) / s[i] if cfg_pp else x + (down - s[i]) * (x - d) / s[i]
        else:
            h = math.log(s[i] / down)
            r = math.log(s[i - 1] / previous_down) / h
            p1, p2, _ = phis(-h)
            x = math.exp(-h) * (x + d - u if cfg_pp else x) + h * p1 * e + h * p2 * (e - previous) / r
        if eta:
            x = x + up * noise(None, None)
        previous, previous_down = e, down
        out.append(x)
    return out


def ref_gradient_estimation(s, n, cfg_pp=False, gamma=2.0):
    x, out, previous = X0, [], None
    for i in range(n):
        d_hat = guided(x, s[i])
        d = (x - (unguided(x, s[i]) if cfg_pp else d_hat)) / s[i]
        dt = s[i + 1] - s[i]
        x = d_hat + d * s[i + 1] if cfg_pp else x + d * dt
        if previous is not None:
            x = x + (gamma - 1) * (d - previous) * dt
        previous = d
        out.append(x)
    return out


REFERENCES = {
    "ipndm": lambda s: ref_ipndm(s, 4),
    "ipndm_v": lambda s: ref_ipndm_v(s, 4),
    "deis": lambda s: ref_deis(s, 3),
    "res_multistep": lambda s: ref_res(s, 3),
    "res_multistep_cfg_pp": lambda s: ref_res(s, 3, cfg_pp=True),
    "gradient_estimation": lambda s: ref_gradient_estimation(s, 3),
    "gradient_estimation_cfg_pp": lambda s: ref_gradient_estimation(s, 3, cfg_pp=True),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_first_steps_match_the_published_formulas(name):
    sigmas = karras(10, dtype=torch.float64)
    _, steps = run_sampler(SAMPLERS[name], FakeDenoise(guided, unguided), X0, sigmas)
    expected = REFERENCES[name](sigmas.tolist())
    for (i, x, _), want in zip(steps[: len(expected)], expected, strict=True):
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5, msg=f"{name}, step {i}")


@pytest.mark.parametrize("name", ANCESTRAL)
def test_ancestral_first_steps_match_the_published_formulas(name):
    sigmas = karras(10, dtype=torch.float64)
    _, steps = run_sampler(SAMPLERS[name], FakeDenoise(guided, unguided), X0, sigmas, seed=3)
    noise = SamplerRun(3).gaussian(X0)
    expected = ref_res(sigmas.tolist(), 3, cfg_pp=name.endswith("cfg_pp"), eta=1.0, noise=noise)
    for (i, x, _), want in zip(steps[: len(expected)], expected, strict=True):
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5, msg=f"{name}, step {i}")


def test_ipndm_v_is_ipndm_on_uniform_steps():
    """The variable-step weights reduce to Adams-Bashforth's when the steps are equal, up to
    order 3. At order 4 the published weights (diff-solvers, ComfyUI) are not AB4's even then:
    kept as published, so that ipndm_v runs as it does in ComfyUI."""
    sigmas = torch.cat([torch.linspace(10, 1, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    _, fixed = run_sampler(SAMPLERS["ipndm"], FakeDenoise(guided), X0, sigmas)
    _, variable = run_sampler(SAMPLERS["ipndm_v"], FakeDenoise(guided), X0, sigmas)
    for (_, a, _), (_, b, _) in zip(fixed[:3], variable[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert variable_step_weights([1.0] * 4) == pytest.approx([57 / 24, -65 / 24, 43 / 24, -11 / 24])


ORACLE = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
SCHEDULES = {
    "karras-10": (karras(10), False),
    "karras-3": (karras(3), False),
    "karras-1": (karras(1), False),
    "flow-10": (torch.cat([torch.linspace(1, 0.05, 10), torch.zeros(1)]), True),
    "flow-3": (torch.tensor([1.0, 0.6, 0.25, 0.0]), True),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", NAMES)
def test_a_denoiser_that_knows_the_answer_ends_there(name, schedule):
    sigmas, flow = SCHEDULES[schedule]
    model = oracle(ORACLE, flow)
    noise = torch.randn(ORACLE.shape, generator=torch.Generator().manual_seed(5))
    x = model.model_sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
    out, steps = run_sampler(SAMPLERS[name], model, x, sigmas)
    assert float((out - ORACLE).abs().max()) < 1e-4
    assert [i for i, _, _ in steps] == list(range(len(sigmas) - 1))
    assert model.calls == len(sigmas) - 1  # one model call a step
    torch.testing.assert_close(steps[-1][1], out, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_seed_reaches_only_the_ancestral_samplers(name):
    sigmas = karras(6)
    x = 14.6 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def estimate(x, s):
        return 0.5 * x / (1 + float(s))

    def sample(seed, global_seed):
        torch.manual_seed(global_seed)
        return run_sampler(SAMPLERS[name], FakeDenoise(estimate, estimate), x, sigmas, seed=seed)[0]

    first = sample(seed=1, global_seed=100)
    assert torch.equal(first, sample(seed=1, global_seed=200))
    assert torch.equal(first, sample(seed=2, global_seed=100)) == (name not in ANCESTRAL)


def test_registry_names_and_comfyui_defaults():
    assert sorted(SAMPLERS) == sorted(NAMES)
    assert all(sampler.name == name for name, sampler in SAMPLERS.items())
    options = {name: dict(sampler.options) for name, sampler in SAMPLERS.items()}
    assert options["ipndm"] == options["ipndm_v"] == {"max_order": 4}
    assert options["deis"] == {"max_order": 3}
    assert options["res_multistep"] == options["res_multistep_cfg_pp"] == {}
    assert options["res_multistep_ancestral"] == {"eta": 1.0, "s_noise": 1.0}
    assert options["gradient_estimation_cfg_pp"] == {"ge_gamma": 2.0}
    assert options["uni_pc"] == options["uni_pc_bh2"] == {}


def test_out_of_range_order_is_named():
    with pytest.raises(ValueError, match="deis: max_order must be 1 to 4, got 5"):
        SAMPLERS["deis"].fn(FakeDenoise(guided), X0, karras(4, dtype=torch.float64), SamplerRun(0), max_order=5)
