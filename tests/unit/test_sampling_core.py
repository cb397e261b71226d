"""The sampling core against an oracle, through the KSampler nodes themselves.

The oracle is a UNet that predicts the noise exactly for known clean latents C: shown the model
input for a sample x at sigma, it returns (x - C) / sigma. Any consistent sampling path must
then end at C (up to float error): txt2img, denoise < 1, stopping early without noise, a
leftover-noise chain of two KSamplerAdvanced, and a noise mask. A schedule off by one step, a
wrong noise scaling or a stale solver history shows up here as a large error, where "the image
looks different" tests cannot see it.

So that the oracle knows sigma exactly, the model runs with a continuous-time schedule
(ModelSamplingContinuousEDM, eps; its time input is 0.25 log sigma, no rounding) over SD1.5's
sigma range; schedulers, samplers and the KSampler paths are the ones every model uses.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from plinth.nodes.core.context import ModelHandle
from plinth.nodes.core.types import ConditioningEntry, DiffusionModel, Latent
from plinth.nodes.ksampler import KSampler, KSamplerAdvanced
from plinth.nodes.sampling.run import initial_noise, model_sampling_of
from plinth.nodes.sampling.samplers import SAMPLERS
from plinth.nodes.sampling.schedulers import SCHEDULERS, calculate_sigmas

SCALE = 0.18215
SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642
# Samplers whose result depends on the seed beyond the initial noise.
STOCHASTIC = {
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "dpm_2_ancestral",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
}


class Oracle(torch.nn.Module):
    """eps such that the sample it is shown denoises exactly to `clean` (+ leak * input, which
    makes it imperfect on purpose for the seed tests)."""

    def __init__(self, clean: torch.Tensor, leak: float = 0.0) -> None:
        super().__init__()
        self.clean, self.leak = clean, leak
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the loop a dtype
        self.config = types.SimpleNamespace(in_channels=4)

    def forward(self, sample, t, encoder_hidden_states=None, **kwargs):
        sigma = torch.exp(t.float() / 0.25).reshape(-1, 1, 1, 1)
        x = sample * (sigma**2 + 1) ** 0.5
        clean = self.clean.repeat(sample.shape[0] // self.clean.shape[0], 1, 1, 1) + self.leak * sample
        return types.SimpleNamespace(sample=(x - clean) / sigma)


class Context:
    def __init__(self, sd) -> None:
        self.sd, self.device, self.dtype = sd, torch.device("cpu"), torch.float32
        self.unet_forward = None
        self.steps: list[tuple[int, int]] = []

    def model(self, handle):
        return self.sd

    def progress(self, step, total):
        self.steps.append((step, total))

    def check_cancelled(self):
        pass


def make(leak: float = 0.0):
    torch.manual_seed(0)
    clean = torch.randn(1, 4, 8, 8) * 0.8
    sd = types.SimpleNamespace(
        unet=Oracle(clean, leak), latent_channels=4, latent_scale=SCALE, scheduler_config={}, vae_scale=8
    )
    model = DiffusionModel(ModelHandle("oracle", lambda: None)).with_sampling(
        ("continuous_edm", "eps", SIGMA_MIN, SIGMA_MAX)
    )
    return Context(sd), model, clean


COND = [ConditioningEntry(torch.zeros(1, 77, 8))]


def ksampler(ctx, model, sampler, scheduler, latent, seed=3, steps=8, denoise=1.0):
    (out,) = KSampler().run(ctx, model, seed, steps, 1.0, sampler, scheduler, COND, COND, latent, denoise)
    return out


def advanced(ctx, model, sampler, scheduler, latent, start, end, add_noise, leftover, seed=3, steps=8):
    (out,) = KSamplerAdvanced().run(
        ctx,
        model,
        "enable" if add_noise else "disable",
        seed,
        steps,
        1.0,
        sampler,
        scheduler,
        COND,
        COND,
        latent,
        start,
        end,
        "enable" if leftover else "disable",
    )
    return out


# DPM-Solver fast and adaptive run, as in ComfyUI, from the first sigma to the last nonzero one
# and return the sample there, noise and all: see test_dpm_solver_stops_at_the_last_nonzero_sigma.
STOP_SHORT = {"dpm_fast", "dpm_adaptive"}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - STOP_SHORT))
def test_every_path_ends_at_the_clean_latent(sampler, scheduler):
    ctx, model, clean = make()
    empty = Latent(torch.zeros(1, 4, 8, 8))
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1

    def error(out: Latent) -> float:
        return float((out.samples * SCALE - clean).abs().max())

    errors = {
        "txt2img": error(ksampler(ctx, model, sampler, scheduler, empty)),
        "denoise 0.5": error(ksampler(ctx, model, sampler, scheduler, Latent(clean / SCALE), denoise=0.5)),
        "stop early, clean": error(advanced(ctx, model, sampler, scheduler, empty, 0, 5, True, False)),
        "noise mask": error(ksampler(ctx, model, sampler, scheduler, Latent(clean / SCALE, mask), denoise=0.6)),
    }
    first = advanced(ctx, model, sampler, scheduler, empty, 0, 5, True, True)
    errors["leftover chain"] = error(advanced(ctx, model, sampler, scheduler, first, 5, 10000, False, False))
    # ComfyUI's iPNDM-v weights do not sum to 1 where the step ratio jumps (linear_quadratic's
    # knee; samplers_multistep.variable_step_weights), kept for ComfyUI's pixels.
    tolerance = 0.05 if (sampler, scheduler) == ("ipndm_v", "linear_quadratic") else 1e-4
    assert max(errors.values()) < tolerance, errors


@pytest.mark.parametrize("scheduler", ["karras", "normal", "simple"])
@pytest.mark.parametrize("sampler", sorted(STOP_SHORT))
def test_dpm_solver_stops_at_the_last_nonzero_sigma(sampler, scheduler):
    """On the oracle's ODE, eps = (x - C) / sigma is constant along the path, so an exact solver
    from x_T at sigma_T to sigma_end lands at C + sigma_end (x_T - C) / sigma_T."""
    ctx, model, clean = make()
    sigmas = calculate_sigmas(model_sampling_of(ctx, model), scheduler, 8)
    first, last = float(sigmas[0]), float(sigmas[-2])
    x_t = initial_noise((1, 4, 8, 8), 3) * (1 + first**2) ** 0.5
    expected = clean + last * (x_t - clean) / first
    out = ksampler(ctx, model, sampler, scheduler, Latent(torch.zeros(1, 4, 8, 8)))
    assert float((out.samples * SCALE - expected).abs().max()) < 1e-3
    assert float((out.samples * SCALE - clean).abs().max()) > last  # not at C: noise of size ~last left


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC & set(SAMPLERS)))
def test_stochastic_samplers_are_deterministic_per_seed_and_differ_across_seeds(sampler):
    """From one already-noisy latent (add_noise off), so only the sampler's own noise depends
    on the seed; torch's global generator must not matter."""
    ctx, model, _ = make(leak=0.3)
    noisy = Latent(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * SIGMA_MAX / SCALE)

    def run(seed: int) -> torch.Tensor:
        return advanced(ctx, model, sampler, "karras", noisy, 0, 10000, False, False, seed=seed).samples

    torch.manual_seed(1)
    first = run(10)
    torch.manual_seed(2)
    assert torch.equal(first, run(10))
    assert (first - run(11)).abs().max() > 1e-3


# dpm_adaptive takes as many steps as its error control needs; dpm_fast reports its own plan
# of third-, second- and first-order steps, not the schedule's steps.
@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - STOP_SHORT))
def test_progress_counts_every_step(sampler):
    ctx, model, _ = make()
    ksampler(ctx, model, sampler, "normal", Latent(torch.zeros(1, 4, 8, 8)), steps=6)
    assert [s for s, _ in ctx.steps] == list(range(1, 7)) and {t for _, t in ctx.steps} == {6}


def test_the_unet_sees_sd_times_on_the_checkpoints_own_schedule():
    """With the checkpoint's own (discrete) schedule the UNet gets integer training steps, from
    999 at the top of every full schedule."""
    ctx, model, _ = make()
    model = DiffusionModel(model.checkpoint)
    seen: list[torch.Tensor] = []
    forward = ctx.sd.unet.forward

    def record(sample, t, *args, **kwargs):
        seen.append(t)
        return types.SimpleNamespace(sample=torch.zeros_like(sample))

    ctx.sd.unet.forward = record
    for scheduler in SCHEDULERS:
        seen.clear()
        ksampler(ctx, model, "euler", scheduler, Latent(torch.zeros(1, 4, 8, 8)), steps=4)
        assert seen[0].dtype == torch.int64
        if scheduler not in ("ddim_uniform", "linear_quadratic"):
            assert int(seen[0]) == 999, scheduler
    ctx.sd.unet.forward = forward


def test_dpm_2_and_uni_pc_lay_out_one_more_step_and_drop_the_second_to_last_sigma():
    """ComfyUI's DISCARD_PENULTIMATE_SIGMA_SAMPLERS: KSampler computes steps + 1 and drops the
    sigma before 0, so `steps` model steps still run but none is spent just above 0."""
    ctx, model, _ = make()
    ms = model_sampling_of(ctx, model)
    longer = calculate_sigmas(ms, "karras", 9)
    dropped = calculate_sigmas(ms, "karras", 8, discard_penultimate=True)
    assert torch.equal(dropped, torch.cat([longer[:-2], longer[-1:]]))
    flagged = {name for name, sampler in SAMPLERS.items() if sampler.discard_penultimate_sigma}
    assert flagged == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
    seen = []
    ctx.sd.unet.forward = lambda sample, t, **kw: (  # record the times the UNet is shown
        seen.append(float(t.flatten()[0])) or Oracle.forward(ctx.sd.unet, sample, t, **kw)
    )
    ksampler(ctx, model, "uni_pc", "karras", Latent(torch.zeros(1, 4, 8, 8)))
    assert [s for s, _ in ctx.steps] == list(range(1, 9))
    assert math.isclose(math.exp(seen[-1] / 0.25), float(dropped[-2]), rel_tol=1e-4)


def test_cfg_pp_samplers_compute_the_negative_even_at_cfg_1():
    """ComfyUI's disable_cfg1_optimization: the CFG++ samplers step along the negative's estimate,
    so it is computed at cfg 1, where other samplers skip it."""
    ctx, model, _ = make()
    batches = []
    unet = ctx.sd.unet
    unet.forward = lambda sample, t, **kw: batches.append(sample.shape[0]) or Oracle.forward(unet, sample, t, **kw)
    ksampler(ctx, model, "euler", "normal", Latent(torch.zeros(1, 4, 8, 8)), steps=2)
    plain = list(batches)
    batches.clear()
    ksampler(ctx, model, "euler_cfg_pp", "normal", Latent(torch.zeros(1, 4, 8, 8)), steps=2)
    assert plain == [1, 1] and batches == [2, 2]
    assert all(SAMPLERS[n].needs_uncond == n.endswith("_cfg_pp") for n in SAMPLERS)
