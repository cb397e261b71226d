"""What every k-diffusion sampler owes the sampling core, over real schedules: a denoiser that
knows the answer C is followed exactly to C (epsilon models over SD1.5's Karras schedule, flow
models over 1 -> 0); noise comes only from the run's seed; run.step reports each step once."""

from __future__ import annotations

import pytest
import torch
from support.sampling_fakes import FakeDenoise, ScriptedRun, flow_schedule, karras, oracle

from plinth.nodes.sampling.base import SamplerRun
from plinth.nodes.sampling.samplers_k import SAMPLERS

STOPS_EARLY = {"dpm_fast", "dpm_adaptive"}  # ComfyUI runs DPM-Solver down to the last nonzero sigma
NOT_FOR_FLOW = {"ddpm"}  # its variance-preserving step assumes an epsilon model, as in ComfyUI
FIXED_STEPS = sorted(set(SAMPLERS) - STOPS_EARLY)


def sd15_karras() -> torch.Tensor:
    """Ten Karras steps from SD1.5's sigma_max."""
    return karras(sigma_max=14.6146)


CASES = [(name, flow) for name in sorted(SAMPLERS) for flow in (False, True) if not (flow and name in NOT_FOR_FLOW)]


@pytest.mark.parametrize("name,flow", CASES)
def test_a_denoiser_that_knows_the_answer_is_followed_to_it(name, flow):
    gen = torch.Generator().manual_seed(7)
    clean, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    sigmas = flow_schedule() if flow else sd15_karras()
    model = oracle(clean, flow)
    x = model.model_sampling.noise_scaling(sigmas[0], noise, clean)
    out = SAMPLERS[name](model, x, sigmas, SamplerRun(seed=3))
    if name in STOPS_EARLY:  # the exact ODE solution at the last nonzero sigma
        expected = clean + (x - clean) * sigmas[-2] / sigmas[0]
    else:
        expected = clean
    assert float((out - expected).abs().max()) < 1e-4


def linear_model(flow: bool) -> FakeDenoise:
    direction = torch.linspace(-1, 1, 2 * 4 * 8 * 8).reshape(2, 4, 8, 8)
    return FakeDenoise(lambda x, s: 0.5 * x + direction, lambda x, s: 0.2 * x - direction, flow)


CHURN = {"s_churn": 2.0}
STOCHASTIC = [
    ("euler_ancestral", {}),
    ("euler_ancestral_cfg_pp", {}),
    ("dpm_2_ancestral", {}),
    ("ddpm", {}),
    ("lcm", {}),
    ("dpm_adaptive", {"eta": 0.5}),
    *((name, CHURN) for name in ("euler", "ddim", "heun", "heunpp2", "dpm_2")),
]
FLOW_STOCHASTIC = [(name, options) for name, options in STOCHASTIC if name not in NOT_FOR_FLOW | {"dpm_adaptive"}]


def sample(name: str, flow: bool, seed: int, global_seed: int, **options: float) -> torch.Tensor:
    torch.manual_seed(global_seed)
    sampler = SAMPLERS[name]
    sigmas = flow_schedule() if flow else sd15_karras()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11)) * float(sigmas[0])
    return sampler.fn(linear_model(flow), x, sigmas, SamplerRun(seed), **{**dict(sampler.options), **options})


@pytest.mark.parametrize(
    "name,options,flow", [(*case, False) for case in STOCHASTIC] + [(*case, True) for case in FLOW_STOCHASTIC]
)
def test_noise_comes_from_the_runs_seed_alone(name, options, flow):
    """Same seed, whatever torch's global generator holds: the same sample; another seed: another."""
    first = sample(name, flow, seed=5, global_seed=1, **options)
    assert torch.equal(first, sample(name, flow, seed=5, global_seed=2, **options))
    assert float((first - sample(name, flow, seed=6, global_seed=1, **options)).abs().max()) > 1e-3


@pytest.mark.parametrize(
    "name", ["euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "lms", "dpm_fast", "dpm_adaptive"]
)
def test_deterministic_samplers_ignore_the_seed(name):
    assert torch.equal(sample(name, False, seed=5, global_seed=1), sample(name, False, seed=6, global_seed=2))


MODEL_CALLS_FOR_10_STEPS = {"heun": 19, "dpm_2": 19, "dpm_2_ancestral": 19, "heunpp2": 3 * 8 + 2 + 1}


@pytest.mark.parametrize("name", FIXED_STEPS)
def test_each_step_is_reported_once_in_order(name):
    model, run = linear_model(False), ScriptedRun([torch.randn(2, 4, 8, 8) for _ in range(10)])
    SAMPLERS[name](model, torch.randn(2, 4, 8, 8) * 14.6, sd15_karras(), run)
    assert [i for i, _, _ in run.steps] == list(range(10))
    assert model.calls == MODEL_CALLS_FOR_10_STEPS.get(name, 10)


def test_dpm_solver_reports_progress_in_model_calls():
    """dpm_fast's steps take 3, 3, 3 and 1 calls for 10 sigma steps: it reports after each, as
    the model-call count so far less one; dpm_adaptive reports its accepted steps from 0."""
    model, run = linear_model(False), ScriptedRun()
    SAMPLERS["dpm_fast"](model, torch.randn(2, 4, 8, 8) * 14.6, sd15_karras(), run)
    assert [i for i, _, _ in run.steps] == [2, 5, 8, 9]
    assert model.calls == 10
    run = ScriptedRun()
    SAMPLERS["dpm_adaptive"](linear_model(False), torch.randn(2, 4, 8, 8) * 14.6, sd15_karras(), run)
    assert [i for i, _, _ in run.steps] == list(range(len(run.steps))) and len(run.steps) > 3


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_schedule_cut_short_ends_on_the_path_at_its_last_sigma(name):
    """KSamplerAdvanced with leftover noise hands over sigmas that stop above 0: the sample must
    then be on the exact path at that sigma (stochastic samplers: at C plus noise of that size)."""
    gen = torch.Generator().manual_seed(8)
    clean, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    sigmas = sd15_karras()[:6]
    x = clean + noise * sigmas[0]
    out = SAMPLERS[name](oracle(clean), x, sigmas, SamplerRun(seed=3))
    deviation = (out - clean) / sigmas[-1]
    if name in ("euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "ddpm", "lcm"):
        assert 0.5 < float(deviation.std()) < 1.5
    else:
        assert float((deviation - noise).abs().max()) < 1e-3
