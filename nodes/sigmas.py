"""SIGMAS nodes: schedules made on their own (BasicScheduler, KarrasScheduler, ...) and the
operations ComfyUI offers on them (split, flip, set the first). A SIGMAS value is a 1-d float
tensor running from high to low noise, usually ending at 0; sampling/schedulers.py makes them.
"""

from __future__ import annotations

from typing import Any

import torch

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Choice, Float, Int, Link, Node, Output
from plinth.nodes.core.types import DiffusionModel
from plinth.nodes.ksampler import check_schedule
from plinth.nodes.sampling import schedulers
from plinth.nodes.sampling.run import model_sampling_of

CATEGORY = "sampling/custom_sampling/schedulers"


def sigma_input(default: float) -> Float:
    return Float(default=default, min=0.0, max=5000.0, step=0.01, round=None)


class BasicScheduler(Node):
    """A named scheduler's sigmas for the model; denoise < 1 keeps the low-noise end of a
    longer schedule, as KSampler does."""

    CATEGORY = CATEGORY
    OUTPUTS = (Output("SIGMAS"),)

    model = Link("MODEL")
    scheduler = Choice(options=tuple(schedulers.SCHEDULERS), default="simple")
    steps = Int(default=20, min=1, max=10000, limit="steps")
    denoise = Float(default=1.0, min=0.0, max=1.0, step=0.01)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
        return check_schedule(inputs.get("steps", 1), inputs.get("denoise", 1.0))

    def run(self, ctx: NodeContext, model: DiffusionModel, scheduler: str, steps: int, denoise: float):
        return (schedulers.denoise_sigmas(model_sampling_of(ctx, model), scheduler, steps, denoise),)


class KarrasScheduler(Node):
    """Karras et al.'s schedule between two sigmas (rho 7 spaces steps towards low noise)."""

    CATEGORY = CATEGORY
    OUTPUTS = (Output("SIGMAS"),)

    steps = Int(default=20, min=1, max=10000, limit="steps")
    sigma_max = sigma_input(14.614642)
    sigma_min = sigma_input(0.0291675)
    rho = Float(default=7.0, min=0.0, max=100.0, step=0.01, round=None)

    def run(self, ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float, rho: float):
        return (schedulers.karras(steps, sigma_min, sigma_max, rho).float(),)


class ExponentialScheduler(Node):
    """Sigmas evenly spaced in log sigma between two sigmas."""

    CATEGORY = CATEGORY
    OUTPUTS = (Output("SIGMAS"),)

    steps = Int(default=20, min=1, max=10000, limit="steps")
    sigma_max = sigma_input(14.614642)
    sigma_min = sigma_input(0.0291675)

    def run(self, ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float):
        return (schedulers.exponential(steps, sigma_min, sigma_max).float(),)


class SDTurboScheduler(Node):
    """SD-Turbo's few-step schedule: model times 999, 899, ..., starting lower for denoise < 1."""

    CATEGORY = CATEGORY
    OUTPUTS = (Output("SIGMAS"),)

    model = Link("MODEL")
    steps = Int(default=1, min=1, max=10)
    denoise = Float(default=1.0, min=0.0, max=1.0, step=0.01)

    def run(self, ctx: NodeContext, model: DiffusionModel, steps: int, denoise: float):
        start = 10 - int(10 * denoise)
        times = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start : start + steps]
        sigmas = model_sampling_of(ctx, model).sigma(times).float()
        return (torch.cat([sigmas, sigmas.new_zeros(1)]),)


class BetaSamplingScheduler(Node):
    """The beta schedule with its two shape parameters exposed."""

    CATEGORY = CATEGORY
    OUTPUTS = (Output("SIGMAS"),)

    model = Link("MODEL")
    steps = Int(default=20, min=1, max=10000, limit="steps")
    alpha = Float(default=0.6, min=0.0, max=50.0, step=0.01, round=None)
    beta = Float(default=0.6, min=0.0, max=50.0, step=0.01, round=None)

    def run(self, ctx: NodeContext, model: DiffusionModel, steps: int, alpha: float, beta: float):
        return (schedulers.beta(model_sampling_of(ctx, model), steps, alpha, beta).float(),)


class SplitSigmas(Node):
    """Split at a step: the first step + 1 sigmas, and the rest from that step on (they share
    the sigma at the split, so two samplers chain)."""

    CATEGORY = "sampling/custom_sampling/sigmas"
    OUTPUTS = (Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas"))

    sigmas = Link("SIGMAS")
    step = Int(default=0, min=0, max=10000)

    def run(self, ctx: NodeContext, sigmas: torch.Tensor, step: int):
        return sigmas[: step + 1], sigmas[step:]


class SplitSigmasDenoise(Node):
    """Split so the low part holds the last denoise fraction of the steps."""

    CATEGORY = "sampling/custom_sampling/sigmas"
    OUTPUTS = (Output("SIGMAS", "high_sigmas"), Output("SIGMAS", "low_sigmas"))

    sigmas = Link("SIGMAS")
    denoise = Float(default=1.0, min=0.0, max=1.0, step=0.01)

    def run(self, ctx: NodeContext, sigmas: torch.Tensor, denoise: float):
        steps = max(len(sigmas) - 1, 0)
        low_steps = round(steps * denoise)
        # As ComfyUI slices (sigmas[:-n]): with no low steps the high part is empty too.
        high = sigmas[: len(sigmas) - low_steps] if low_steps else sigmas[:0]
        return high, sigmas[len(sigmas) - low_steps - 1 :]


class FlipSigmas(Node):
    """Reverse the schedule (low to high noise, for unsampling); a leading 0 becomes 1e-4."""

    CATEGORY = "sampling/custom_sampling/sigmas"
    OUTPUTS = (Output("SIGMAS"),)

    sigmas = Link("SIGMAS")

    def run(self, ctx: NodeContext, sigmas: torch.Tensor):
        if len(sigmas) == 0:
            return (sigmas,)
        flipped = sigmas.flip(0).clone()
        if float(flipped[0]) == 0:
            flipped[0] = 0.0001
        return (flipped,)


class SetFirstSigma(Node):
    """Replace the first sigma."""

    CATEGORY = "sampling/custom_sampling/sigmas"
    OUTPUTS = (Output("SIGMAS"),)

    sigmas = Link("SIGMAS")
    sigma = Float(default=136.0, min=0.0, max=20000.0, step=0.001, round=None)

    def run(self, ctx: NodeContext, sigmas: torch.Tensor, sigma: float):
        changed = sigmas.clone()
        if len(changed):
            changed[0] = sigma
        return (changed,)
