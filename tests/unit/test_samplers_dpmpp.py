"""The DPM-Solver++ family, ER-SDE, SEEDS and SA-Solver against the sampler contract: an oracle
denoiser ends at its answer, the deterministic settings stay exactly on the probability-flow ODE's
path, seeded noise is reproducible and independent of torch's global generator, and each
sampler reports every step once and calls the model as often as ComfyUI's does. The per-step
math against written-out references is in test_samplers_dpmpp_steps.py."""

from __future__ import annotations

import pytest
import torch
from support.sampling_fakes import FakeDenoise, flow_schedule, karras, oracle

from plinth.nodes.sampling import samplers_dpmpp, samplers_sa_solver, samplers_sde, samplers_seeds
from plinth.nodes.sampling.base import Sampler, SamplerRun

SAMPLERS: dict[str, Sampler] = {
    **samplers_dpmpp.SAMPLERS,
    **samplers_sde.SAMPLERS,
    **samplers_seeds.SAMPLERS,
    **samplers_sa_solver.SAMPLERS,
}
DETERMINISTIC = {"dpmpp_2m", "dpmpp_2m_cfg_pp"}
STOCHASTIC = sorted(set(SAMPLERS) - DETERMINISTIC)
# Options that turn each sampler's noise off, leaving its ODE solver.
ODE_OPTIONS = {name: {"eta": 0.0} for name in SAMPLERS if "eta" in dict(SAMPLERS[name].options)}
ODE_OPTIONS["er_sde"] = {"s_noise": 0.0, "noise_scaler": lambda t: t}
# Model calls for a schedule of n steps ending at 0 (the last step is a plain denoise).
CALLS = {"dpmpp_2s_ancestral": 2, "dpmpp_2s_ancestral_cfg_pp": 2, "dpmpp_sde": 2, "dpmpp_sde_gpu": 2}
CALLS |= {"seeds_2": 2, "seeds_3": 3, "sa_solver_pece": 2}


def noisy(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    return (1 - sigma) * clean + sigma * noise if flow else clean + sigma * noise


def test_the_modules_offer_these_comfyui_samplers():
    assert sorted(SAMPLERS) == sorted(
        "dpmpp_2s_ancestral dpmpp_2s_ancestral_cfg_pp dpmpp_sde dpmpp_sde_gpu dpmpp_2m dpmpp_2m_cfg_pp "
        "dpmpp_2m_sde dpmpp_2m_sde_gpu dpmpp_2m_sde_heun dpmpp_2m_sde_heun_gpu dpmpp_3m_sde dpmpp_3m_sde_gpu "
        "er_sde seeds_2 seeds_3 sa_solver sa_solver_pece".split()
    )
    assert all(sampler.name == name for name, sampler in SAMPLERS.items())
    for gpu in [name for name in SAMPLERS if name.endswith("_gpu")]:  # the same sampler, the tree on the CPU
        cpu = SAMPLERS[gpu.removesuffix("_gpu")]
        assert (SAMPLERS[gpu].fn, SAMPLERS[gpu].options) == (cpu.fn, cpu.options)


@pytest.mark.parametrize("flow", [False, True], ids=["karras", "flow"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_an_oracle_denoiser_ends_at_its_answer(name, flow):
    generator = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(2, 1, 4, 8, 8, generator=generator)
    sigmas = flow_schedule() if flow else karras()
    x = noisy(clean, noise, sigmas[0], flow)
    out = SAMPLERS[name](oracle(clean, flow), x, sigmas, SamplerRun(seed=3))
    assert float((out - clean).abs().max()) < 1e-4


@pytest.mark.parametrize("flow", [False, True], ids=["karras", "flow"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_without_noise_every_step_lands_on_the_ode_path(name, flow):
    """For a constant x0 estimate the probability-flow ODE's solution is x0 + sigma n (flow:
    (1 - sigma) x0 + sigma n), and exponential integrators in lambda are exact for it; an error
    in a step's coefficients or a multistep term shows at the step it happens."""
    generator = torch.Generator().manual_seed(2)
    clean, noise = torch.randn(2, 1, 3, 4, 4, generator=generator, dtype=torch.float64)
    sigmas = flow_schedule(start=0.9).double() if flow else karras().double()
    seen: list[tuple[int, torch.Tensor]] = []
    run = SamplerRun(seed=0, on_step=lambda i, x, d: seen.append((i, x)))
    options = dict(SAMPLERS[name].options) | ODE_OPTIONS.get(name, {})
    SAMPLERS[name].fn(oracle(clean, flow), noisy(clean, noise, sigmas[0], flow), sigmas, run, **options)
    errors = [float((x - noisy(clean, noise, sigmas[i + 1], flow)).abs().max()) for i, x in seen]
    assert max(errors) < 1e-9, errors


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeded_noise_is_reproducible_and_ignores_the_global_generator(name):
    denoiser = oracle(torch.zeros(1, 4, 8, 8))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 14.6
    sigmas = karras(6)

    def sample(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        seen: list[torch.Tensor] = []
        run = SamplerRun(seed=seed, on_step=lambda i, x, d: seen.append(x))
        SAMPLERS[name](denoiser, x, sigmas, run)
        assert torch.equal(torch.random.get_rng_state(), state), "the sampler drew from torch's global generator"
        return seen[-2]  # the last noisy sample: the final step only denoises

    first = sample(seed=11, global_seed=0)
    assert torch.equal(first, sample(seed=11, global_seed=12345))
    assert not torch.allclose(first, sample(seed=12, global_seed=0))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_each_step_is_reported_once_in_order_with_comfyuis_model_calls(name):
    denoiser = oracle(torch.zeros(1, 4, 8, 8))
    sigmas = karras(7)
    steps: list[int] = []
    SAMPLERS[name](
        denoiser, torch.randn(1, 4, 8, 8), sigmas, SamplerRun(seed=0, on_step=lambda i, x, d: steps.append(i))
    )
    assert steps == list(range(len(sigmas) - 1))
    assert denoiser.calls == CALLS.get(name, 1) * (len(sigmas) - 2) + 1


def test_cfg_pp_without_an_unguided_estimate_is_a_clear_error():
    clean = torch.zeros(1, 4, 8, 8)
    denoiser = FakeDenoise(lambda x, s: clean)
    with pytest.raises(ValueError, match="dpmpp_2m_cfg_pp.*last_uncond"):
        SAMPLERS["dpmpp_2m_cfg_pp"](denoiser, torch.randn(1, 4, 8, 8), karras(3), SamplerRun(seed=0))
