"""Nodes that change how a MODEL samples: its parameterisation and noise schedule.

A checkpoint declares its own (scheduler_config.json: epsilon or v-prediction over SD's betas);
these override it for models whose file does not say (a v-prediction or LCM fine-tune, a
zero-terminal-SNR model, an EDM model). The weights stay shared; only the MODEL value changes.
"""

from __future__ import annotations

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Boolean, Choice, Float, Int, Link, Node, Output
from plinth.nodes.core.types import DiffusionModel

MAX_RESOLUTION = 16384


class ModelSamplingDiscrete(Node):
    """A discrete-time model's parameterisation: eps, v_prediction, lcm (the 50 distilled steps
    and LCM's consistency output), x0, img_to_img; zsnr rescales to zero terminal SNR."""

    CATEGORY = "advanced/model"
    OUTPUTS = (Output("MODEL"),)

    model = Link("MODEL")
    sampling = Choice(options=("eps", "v_prediction", "lcm", "x0", "img_to_img"), default="eps")
    zsnr = Boolean(default=False)

    def run(self, ctx: NodeContext, model: DiffusionModel, sampling: str, zsnr: bool) -> tuple[DiffusionModel]:
        return (model.with_sampling(("discrete", sampling, zsnr)),)


class ModelSamplingSD3(Node):
    """Sample the model as a rectified flow with SD3's resolution shift: sigma = shift t /
    (1 + (shift - 1) t) over 1000 steps (higher shift spends more steps at high noise)."""

    CATEGORY = "advanced/model"
    OUTPUTS = (Output("MODEL"),)

    model = Link("MODEL")
    shift = Float(default=3.0, min=0.0, max=100.0, step=0.01)

    def run(self, ctx: NodeContext, model: DiffusionModel, shift: float) -> tuple[DiffusionModel]:
        return (model.with_sampling(("discrete_flow", shift, 1000.0)),)


class ModelSamplingFlux(Node):
    """Sample the model as FLUX.1's flow, its shift set by the image size: mu runs linearly in
    the latent's 2x2 patch count from base_shift at 256 patches to max_shift at 4096 (1024x1024
    pixels), as ComfyUI computes it."""

    CATEGORY = "advanced/model"
    OUTPUTS = (Output("MODEL"),)

    model = Link("MODEL")
    max_shift = Float(default=1.15, min=0.0, max=100.0, step=0.01)
    base_shift = Float(default=0.5, min=0.0, max=100.0, step=0.01)
    width = Int(default=1024, min=16, max=MAX_RESOLUTION, step=8)
    height = Int(default=1024, min=16, max=MAX_RESOLUTION, step=8)

    def run(
        self, ctx: NodeContext, model: DiffusionModel, max_shift: float, base_shift: float, width: int, height: int
    ) -> tuple[DiffusionModel]:
        low, high = 256, 4096
        slope = (max_shift - base_shift) / (high - low)
        mu = width * height / (8 * 8 * 2 * 2) * slope + (base_shift - slope * low)
        return (model.with_sampling(("flux", mu)),)


class ModelSamplingContinuousEDM(Node):
    """A continuous-time model over log-spaced sigmas between sigma_min and sigma_max (EDM,
    Playground v2.5 with its latent statistics, Cosmos' rectified flow)."""

    CATEGORY = "advanced/model"
    OUTPUTS = (Output("MODEL"),)

    model = Link("MODEL")
    sampling = Choice(
        options=("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow"), default="v_prediction"
    )
    sigma_max = Float(default=120.0, min=0.0, max=1000.0, step=0.001, round=None)
    sigma_min = Float(default=0.002, min=0.0, max=1000.0, step=0.001, round=None)

    @classmethod
    def check_inputs(cls, inputs: dict) -> list[tuple[str, str, str]]:
        low, high = inputs.get("sigma_min", 0.002), inputs.get("sigma_max", 120.0)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)) and not 0 < low < high:
            return [("sigma_min", "value_not_in_range", f"need 0 < sigma_min < sigma_max, got {low} and {high}")]
        return []

    def run(
        self, ctx: NodeContext, model: DiffusionModel, sampling: str, sigma_max: float, sigma_min: float
    ) -> tuple[DiffusionModel]:
        return (model.with_sampling(("continuous_edm", sampling, sigma_min, sigma_max)),)
