"""Sampling against an oracle: a fake UNet that predicts the noise exactly for known clean
latents C. Any consistent sampling path must then end at C (up to float error): txt2img,
denoise < 1, stopping early without noise, a leftover-noise chain of two samplers, and a
noise mask. A schedule off by one step, a wrong noise scaling or a stale solver history
shows up as a large error here, where "the image looks different" tests cannot see it."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from plinth.nodes import denoise as denoise_module
from plinth.nodes.core.context import ModelHandle
from plinth.nodes.core.types import ConditioningEntry, DiffusionModel, Latent
from plinth.nodes.denoise import Denoiser, SamplingPlan
from plinth.nodes.diffusers_schedulers import SAMPLERS, check_combination
from plinth.nodes.models.checkpoint import SD15_CONFIG

SCALE = 0.18215
BASE = json.loads((SD15_CONFIG / "scheduler" / "scheduler_config.json").read_text())


class Oracle(torch.nn.Module):
    """eps such that the sample it is shown denoises exactly to `clean`."""

    def __init__(self, clean: torch.Tensor) -> None:
        super().__init__()
        self.clean = clean
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the loop a dtype
        self.config = types.SimpleNamespace(in_channels=4)
        self.scheduler = None

    def forward(self, sample, t, encoder_hidden_states=None, **kwargs):
        scheduler = self.scheduler
        clean = self.clean.repeat(sample.shape[0] // self.clean.shape[0], 1, 1, 1)
        if scheduler.init_noise_sigma > 1:  # sigma space: the sample was divided by sqrt(sigma^2 + 1)
            ratio = float(scheduler.scale_model_input(torch.ones(1), t))
            sigma = math.sqrt(1 / ratio**2 - 1)
            eps = (sample / ratio - clean) / sigma
        else:  # variance preserving: sample = sqrt(ab) clean + sqrt(1 - ab) eps
            sigmas = getattr(scheduler, "sigmas", None)
            if sigmas is not None and len(sigmas) == len(scheduler.timesteps) + 1:
                index = scheduler.step_index if scheduler.step_index is not None else (scheduler.begin_index or 0)
                alpha_bar = 1 / (1 + float(sigmas[index]) ** 2)
            else:
                alpha_bar = float(scheduler.alphas_cumprod[int(t)])
            eps = (sample - math.sqrt(alpha_bar) * clean) / math.sqrt(1 - alpha_bar)
        return types.SimpleNamespace(sample=eps)


@pytest.fixture
def oracle(monkeypatch):
    torch.manual_seed(0)
    clean = torch.randn(1, 4, 8, 8) * 0.8
    unet = Oracle(clean)
    original = denoise_module.make_scheduler

    def make(*args):
        unet.scheduler = original(*args)
        return unet.scheduler

    monkeypatch.setattr(denoise_module, "make_scheduler", make)
    sd = types.SimpleNamespace(unet=unet, latent_channels=4, latent_scale=SCALE, scheduler_config=BASE, vae_scale=8)
    ctx = types.SimpleNamespace(
        device=torch.device("cpu"), dtype=torch.float32, progress=lambda i, n: None, unet_forward=None
    )
    model = DiffusionModel(ModelHandle("oracle", lambda: None))
    cond = [ConditioningEntry(torch.zeros(1, 77, 8))]

    def run(plan: SamplingPlan, latent: Latent) -> torch.Tensor:
        return Denoiser(ctx, sd, model, plan).run(latent, cond, cond, lambda i, n: None)

    def error(out: torch.Tensor) -> float:
        return float((out * SCALE - clean).abs().max())

    return types.SimpleNamespace(run=run, error=error, clean=clean, unet=unet)


PAIRS = [(s, k) for s in SAMPLERS for k in ("normal", "karras", "simple") if not check_combination(s, k)]


@pytest.mark.parametrize("sampler,scheduler", PAIRS)
def test_every_path_ends_at_the_clean_latent(oracle, sampler, scheduler):
    empty = Latent(torch.zeros(1, 4, 8, 8))
    image = Latent(oracle.clean / SCALE)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1

    def plan(**kw):
        return SamplingPlan(sampler, scheduler, 8, 1.0, 3, **kw)

    errors = {
        "txt2img": oracle.error(oracle.run(plan(), empty)),
        "denoise 0.5": oracle.error(oracle.run(plan(denoise=0.5), image)),
        "stop early, clean": oracle.error(oracle.run(plan(end_step=5), empty)),
        "noise mask": oracle.error(oracle.run(plan(denoise=0.6), Latent(oracle.clean / SCALE, mask))),
    }
    first = oracle.run(plan(end_step=5, leftover_noise=True), empty)
    errors["leftover chain"] = oracle.error(oracle.run(plan(start_step=5, add_noise=False), Latent(first)))
    assert max(errors.values()) < 1e-4, errors


SCHEDULES = ("normal", "karras", "exponential", "beta", "simple", "sgm_uniform")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_schedules_start_at_full_noise_with_the_shipped_config(oracle, sampler):
    """With the checkpoint's own ("leading") spacing, diffusers' sigma schedules started far
    below sigma_max; ComfyUI's always span the whole range."""
    seen: list[float] = []
    forward = oracle.unet.forward

    def record(sample, t, *args, **kwargs):
        seen.append(float(t))
        return forward(sample, t, *args, **kwargs)

    oracle.unet.forward = record
    for schedule in SCHEDULES:
        if check_combination(sampler, schedule):
            continue
        seen.clear()
        oracle.run(SamplingPlan(sampler, schedule, 4, 1.0, 3), Latent(torch.zeros(1, 4, 8, 8)))
        assert seen[0] >= 990, (schedule, seen)


def test_a_hint_of_another_shape_is_centre_cropped_not_squashed():
    from plinth.nodes.denoise import control_hint

    hint = torch.zeros(1, 64, 128, 3)
    hint[:, :, 32, :] = 1.0  # a vertical line a quarter of the way across a 2:1 hint
    fitted = control_hint(hint, 8, 8, 8)  # for a square 64x64 image
    assert fitted.shape == (1, 3, 64, 64)
    assert fitted[0, 0].sum(0).nonzero().flatten().tolist() == [0]  # 32 columns cut off each side
