"""ComfyUI's custom-sampling nodes: sampling taken apart into NOISE, GUIDER, SAMPLER and SIGMAS.

SamplerCustomAdvanced runs any guider with any sampler over any sigmas; KSampler is the same run
with a CFG guider, a named sampler and a named scheduler (ksampler.py), so the two give the same
pixels for the same settings. The sigma nodes are in sigmas.py.
"""

from __future__ import annotations

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Boolean, Choice, Float, Int, Link, Node, Output
from plinth.nodes.core.types import Conditioning, DiffusionModel, Latent
from plinth.nodes.sampling.base import Sampler
from plinth.nodes.sampling.guidance import Guider
from plinth.nodes.sampling.run import Noise, sample
from plinth.nodes.sampling.samplers import SAMPLERS


def cfg_input() -> Float:
    """A guidance scale input, as KSampler's cfg."""
    return Float(default=8.0, min=0.0, max=100.0, step=0.1, round=0.01)


class KSamplerSelect(Node):
    """A sampler by ComfyUI's name."""

    CATEGORY = "sampling/custom_sampling/samplers"
    OUTPUTS = (Output("SAMPLER"),)

    sampler_name = Choice(options=tuple(SAMPLERS), default="euler")

    def run(self, ctx: NodeContext, sampler_name: str) -> tuple[Sampler]:
        return (SAMPLERS[sampler_name],)


class RandomNoise(Node):
    """The seed's noise: the same seed gives the same noise as KSampler's."""

    CATEGORY = "sampling/custom_sampling/noise"
    OUTPUTS = (Output("NOISE"),)

    noise_seed = Int(default=0, min=0, max=2**64 - 1, control_after_generate=True)

    def run(self, ctx: NodeContext, noise_seed: int) -> tuple[Noise]:
        return (Noise(noise_seed),)


class DisableNoise(Node):
    """No noise: the latent is already noisy (a leftover-noise latent from another sampler)."""

    CATEGORY = "sampling/custom_sampling/noise"
    OUTPUTS = (Output("NOISE"),)

    def run(self, ctx: NodeContext) -> tuple[Noise]:
        return (Noise(0, enabled=False),)


class BasicGuider(Node):
    """The model guided by one conditioning, without classifier-free guidance."""

    CATEGORY = "sampling/custom_sampling/guiders"
    OUTPUTS = (Output("GUIDER"),)

    model = Link("MODEL")
    conditioning = Link("CONDITIONING")

    def run(self, ctx: NodeContext, model: DiffusionModel, conditioning: Conditioning) -> tuple[Guider]:
        return (Guider(model, conditioning, kind="basic"),)


class CFGGuider(Node):
    """Classifier-free guidance: negative + cfg * (positive - negative)."""

    CATEGORY = "sampling/custom_sampling/guiders"
    OUTPUTS = (Output("GUIDER"),)

    model = Link("MODEL")
    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    cfg = cfg_input()

    def run(
        self, ctx: NodeContext, model: DiffusionModel, positive: Conditioning, negative: Conditioning, cfg: float
    ) -> tuple[Guider]:
        return (Guider(model, positive, negative, cfg),)


class DualCFGGuider(Node):
    """Two guidance scales: cond2 over negative (cfg_cond2_negative), cond1 over cond2
    (cfg_conds); "nested" guides cond1 over cond2 first, then the result over negative."""

    CATEGORY = "sampling/custom_sampling/guiders"
    OUTPUTS = (Output("GUIDER"),)

    model = Link("MODEL")
    cond1 = Link("CONDITIONING")
    cond2 = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    cfg_conds = cfg_input()
    cfg_cond2_negative = cfg_input()
    style = Choice(options=("regular", "nested"), default="regular")

    def run(
        self,
        ctx: NodeContext,
        model: DiffusionModel,
        cond1: Conditioning,
        cond2: Conditioning,
        negative: Conditioning,
        cfg_conds: float,
        cfg_cond2_negative: float,
        style: str,
    ) -> tuple[Guider]:
        guider = Guider(
            model,
            cond1,
            negative,
            cfg_conds,
            "dual_cfg",
            middle=cond2,
            cfg2=cfg_cond2_negative,
            nested=style == "nested",
        )
        return (guider,)


class SamplerCustom(Node):
    """A CFG run with a SAMPLER and SIGMAS from other nodes; returns the sampled latent and
    the last x0 estimate."""

    CATEGORY = "sampling/custom_sampling"
    OUTPUTS = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    model = Link("MODEL")
    add_noise = Boolean(default=True)
    noise_seed = Int(default=0, min=0, max=2**64 - 1, control_after_generate=True)
    cfg = cfg_input()
    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    sampler = Link("SAMPLER")
    sigmas = Link("SIGMAS")
    latent_image = Link("LATENT")

    def run(
        self,
        ctx: NodeContext,
        model: DiffusionModel,
        add_noise: bool,
        noise_seed: int,
        cfg: float,
        positive: Conditioning,
        negative: Conditioning,
        sampler: Sampler,
        sigmas,
        latent_image: Latent,
    ) -> tuple[Latent, Latent]:
        result = sample(
            ctx, Guider(model, positive, negative, cfg), sampler, sigmas, Noise(noise_seed, add_noise), latent_image
        )
        return result.latent, result.denoised


class SamplerCustomAdvanced(Node):
    """Any guider, sampler, sigmas and noise; returns the sampled latent and the last x0 estimate."""

    CATEGORY = "sampling/custom_sampling"
    OUTPUTS = (Output("LATENT", "output"), Output("LATENT", "denoised_output"))

    noise = Link("NOISE")
    guider = Link("GUIDER")
    sampler = Link("SAMPLER")
    sigmas = Link("SIGMAS")
    latent_image = Link("LATENT")

    def run(
        self, ctx: NodeContext, noise: Noise, guider: Guider, sampler: Sampler, sigmas, latent_image: Latent
    ) -> tuple[Latent, Latent]:
        result = sample(ctx, guider, sampler, sigmas, noise, latent_image)
        return result.latent, result.denoised
