"""Model sampling: how a model's raw output and its time input relate to sigma space.

The sampling core sees every model as a denoiser D(x, sigma) -> x0 over samples in the form
x = x0 + sigma * noise (epsilon-type models) or x = (1 - sigma) * x0 + sigma * noise (flow
models). A ModelSampling object makes that true for one model. It has two halves:

- a *schedule*: the model's table of sigmas (what "simple", "normal", ... schedulers pick from),
  and the map between sigma and the model's own time input (a training step index for SD's
  discrete schedule, sigma * 1000 for discrete flow, 0.25 log sigma for EDM);
- a *parameterisation*: how the model input is scaled from x, how the output becomes x0
  (epsilon, v-prediction, EDM, x0, flow velocity, LCM's consistency form), and how noise is
  mixed into a clean latent at a given sigma.

Adding a model family means adding (or configuring) one of these, never a sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Each kind: (name, whether x mixes as flow). Flow kinds shrink the signal as noise is added.
EPSILON, V_PREDICTION, EDM, X0, IMG_TO_IMG, LCM, FLOW, COSMOS_RFLOW = (
    "eps",
    "v_prediction",
    "edm",
    "x0",
    "img_to_img",
    "lcm",
    "flow",
    "cosmos_rflow",
)
KINDS = (EPSILON, V_PREDICTION, EDM, X0, IMG_TO_IMG, LCM, FLOW, COSMOS_RFLOW)


def _view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma (0-d or [B]) shaped to broadcast over a [B, ...] tensor."""
    sigma = sigma.to(like.device, torch.float32)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def scaled_linear_sigmas(beta_start: float, beta_end: float, steps: int = 1000) -> torch.Tensor:
    """SD's training noise levels: betas linear in sqrt, computed in float64 and kept as float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return _sigmas_of_betas(betas)


def linear_sigmas(beta_start: float, beta_end: float, steps: int = 1000) -> torch.Tensor:
    return _sigmas_of_betas(torch.linspace(beta_start, beta_end, steps, dtype=torch.float64))


def _sigmas_of_betas(betas: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def zero_terminal_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so its last step is (almost) pure noise (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed"); the last alpha_bar is kept a hair
    above 0 so its sigma stays finite."""
    alphas_bar_sqrt = (1 / (sigmas.double() ** 2 + 1)).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = 4.8973451890853435e-08
    return (((1 - alphas_bar) / alphas_bar) ** 0.5).float()


def flux_time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX.1's sigma for time t in 0..1 under its resolution shift mu: e^mu / (e^mu + 1/t - 1)
    (ComfyUI's flux_time_shift(mu, 1.0, t))."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """Discrete-flow sigma for time t in 0..1 under a resolution shift (SD3, AuraFlow)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True, eq=False)
class ModelSampling:
    """One model's schedule and parameterisation; see the module docstring.

    kind: one of KINDS. table: the model's sigmas, ascending (len = its training steps).
    schedule: "discrete" (time = nearest table index), "lcm" (the 50 distilled steps of a
    1000-step table), "edm" (time = 0.25 log sigma), "cosmos" (time = sigma / (sigma + 1)) or
    "flow" (time = sigma * multiplier, sigma = shifted t) or "flux" (the same with FLUX.1's
    exponential shift, flux_time_shift, and multiplier 1).
    """

    kind: str
    table: torch.Tensor
    schedule: str = "discrete"
    sigma_data: float = 1.0
    shift: float = 1.0
    multiplier: float = 1000.0
    skip_steps: int = 1

    @property
    def flow(self) -> bool:
        return self.kind == FLOW

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])

    @property
    def log_table(self) -> torch.Tensor:
        return self.table.log()

    # time <-> sigma

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's time input at sigma."""
        if self.schedule in ("discrete", "lcm"):
            distances = (sigma.float().log().cpu() - self.log_table[:, None]).abs()
            index = distances.argmin(dim=0).reshape(sigma.shape)
            return (index * self.skip_steps + (self.skip_steps - 1)).to(sigma.device)
        if self.schedule == "edm":
            return 0.25 * sigma.log()
        if self.schedule == "cosmos":
            return sigma / (sigma + 1)
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """The sigma at a model time (fractional times interpolate in log sigma)."""
        if self.schedule in ("discrete", "lcm"):
            steps = (timestep.float().cpu() - (self.skip_steps - 1)) / self.skip_steps
            t = steps.clamp(0, len(self.table) - 1)
            low, high, w = t.floor().long(), t.ceil().long(), t.frac()
            log_table = self.log_table
            return ((1 - w) * log_table[low] + w * log_table[high]).exp().to(timestep.device)
        if self.schedule == "edm":
            return (timestep / 0.25).exp()
        if self.schedule == "cosmos":
            if float(timestep) >= self.sigma_max / (self.sigma_max + 1):
                return torch.tensor(self.sigma_max)
            return timestep / (1 - timestep)
        return self._shifted(timestep / self.multiplier)

    def _shifted(self, t: torch.Tensor) -> torch.Tensor:
        """A flow model's sigma at time t in 0..1."""
        if self.schedule == "flux":
            return flux_time_shift(self.shift, t)
        return time_snr_shift(self.shift, t)

    def percent_to_sigma(self, percent: float) -> float:
        """The sigma at `percent` of the way from pure noise (0) to clean (1): where
        start_percent/end_percent of ControlNets and patches switch."""
        if percent <= 0.0:
            return 1.0 if self.flow else 999999999.9
        if percent >= 1.0:
            return 0.0
        if self.flow:
            return float(self._shifted(torch.tensor(1.0 - percent)))
        if self.schedule == "edm" or self.schedule == "cosmos":
            low = math.log(self.sigma_min)
            return math.exp((math.log(self.sigma_max) - low) * (1.0 - percent) + low)
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))

    # parameterisation

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the network is shown for sample x at sigma."""
        s = _view(sigma, x)
        if self.kind in (FLOW, IMG_TO_IMG):
            return x
        if self.kind == COSMOS_RFLOW:
            return x * (1.0 - s / (s + 1))
        return x / (s**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0 from the network's output for sample x at sigma."""
        s, sd = _view(sigma, x), self.sigma_data
        if self.kind in (EPSILON, FLOW):
            return x - output * s
        if self.kind == V_PREDICTION:
            return x * sd**2 / (s**2 + sd**2) - output * s * sd / (s**2 + sd**2) ** 0.5
        if self.kind == EDM:
            return x * sd**2 / (s**2 + sd**2) + output * s * sd / (s**2 + sd**2) ** 0.5
        if self.kind in (X0, IMG_TO_IMG):
            return output
        if self.kind == COSMOS_RFLOW:
            r = s / (s + 1)
            return x * (1.0 - r) - output * r
        # LCM: a consistency-model boundary condition over the epsilon estimate.
        t = _view(self.timestep(sigma.float()).float(), x) * 10.0
        c_skip = 0.25 / (t**2 + 0.25)
        c_out = t / (t**2 + 0.25) ** 0.5
        return c_out * (x - output * s) + c_skip * x

    def noise_scaling(
        self, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool = False
    ) -> torch.Tensor:
        """`latent` with noise at level sigma, in this model's sample form. max_denoise: the
        run starts at the top of the schedule, where an epsilon model's sample is noise scaled
        to unit signal variance."""
        s = _view(sigma, noise)
        if self.flow:
            return s * noise + (1.0 - s) * latent
        scale = torch.sqrt(1.0 + s**2) if max_denoise else s
        return latent + noise * scale

    def inverse_noise_scaling(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The latent a run ending at sigma hands on (flow samples rescaled to unit signal)."""
        if self.flow:
            return x / (1.0 - _view(sigma, x))
        return x


def discrete(kind: str, table: torch.Tensor, zsnr: bool = False) -> ModelSampling:
    """A discrete-time model (SD1.x/SDXL style) of one parameterisation over a sigma table."""
    if kind == LCM:  # the 50 steps the model was distilled on: every 20th of 1000, ending at the last
        skip = len(table) // 50
        distilled = table[skip - 1 :: skip].clone()
        return ModelSampling(LCM, zero_terminal_snr(distilled) if zsnr else distilled, schedule="lcm", skip_steps=skip)
    return ModelSampling(kind, zero_terminal_snr(table) if zsnr else table)


def continuous_edm(kind: str, sigma_min: float, sigma_max: float, sigma_data: float = 1.0) -> ModelSampling:
    """A continuous-time model over log-spaced sigmas (EDM, playground v2.5, Cosmos)."""
    table = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp()
    schedule = "cosmos" if kind == COSMOS_RFLOW else "edm"
    return ModelSampling(kind, table, schedule=schedule, sigma_data=sigma_data)


def discrete_flow(shift: float = 1.0, multiplier: float = 1000.0, steps: int = 1000) -> ModelSampling:
    """A rectified-flow model (SD3, AuraFlow): sigma = shifted t, time = sigma * multiplier."""
    table = time_snr_shift(shift, torch.arange(1, steps + 1, dtype=torch.float32) / steps)
    return ModelSampling(FLOW, table, schedule="flow", shift=shift, multiplier=multiplier)


def flux_flow(shift: float = 1.15, steps: int = 10000) -> ModelSampling:
    """FLUX.1's flow (ComfyUI's ModelSamplingFlux): sigma = flux_time_shift(shift, t) over
    10000 steps, time = sigma."""
    table = flux_time_shift(shift, torch.arange(1, steps + 1, dtype=torch.float64) / steps).float()
    return ModelSampling(FLOW, table, schedule="flux", shift=shift, multiplier=1.0)


def from_scheduler_config(config: dict[str, Any]) -> ModelSampling:
    """A checkpoint's own model sampling, from its diffusers scheduler_config.json, or for a
    flow model the entries its loader writes ("flow": "flux" or "discrete_flow", "shift",
    "multiplier")."""
    if config.get("flow") == "flux":
        return flux_flow(float(config.get("shift", 1.15)))
    if config.get("flow") == "discrete_flow":
        return discrete_flow(float(config.get("shift", 1.0)), float(config.get("multiplier", 1000.0)))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("beta_schedule", "scaled_linear") == "linear":
        table = linear_sigmas(start, end, steps)
    else:
        table = scaled_linear_sigmas(start, end, steps)
    prediction = config.get("prediction_type", "epsilon")
    kind = {"epsilon": EPSILON, "v_prediction": V_PREDICTION, "sample": X0}.get(prediction)
    if kind is None:
        raise ValueError(f"scheduler_config prediction_type {prediction!r} is not epsilon, v_prediction or sample")
    return discrete(kind, table, zsnr=bool(config.get("rescale_betas_zero_snr", False)))


# Playground v2.5's latent statistics (its VAE config's latents_mean/std) and scale.
PLAYGROUND_LATENT = ((-1.6574, 1.886, -1.383, 2.5155), (8.4927, 5.9022, 6.5498, 5.2299), 0.5)


def resolve(override: tuple[Any, ...], scheduler_config: dict[str, Any]) -> ModelSampling:
    """The ModelSampling a MODEL runs with: the checkpoint's own, or a node's override
    (DiffusionModel.sampling: ("discrete", kind, zsnr) or ("continuous_edm", kind, sigma_min,
    sigma_max), ("discrete_flow", shift, multiplier) or ("flux", shift))."""
    if not override:
        return from_scheduler_config(scheduler_config)
    if override[0] == "discrete":
        _, kind, zsnr = override
        base = from_scheduler_config(
            {**scheduler_config, "prediction_type": "epsilon", "rescale_betas_zero_snr": False}
        )
        return discrete(kind, base.table, zsnr=zsnr)
    if override[0] == "continuous_edm":
        _, kind, sigma_min, sigma_max = override
        if kind == "edm_playground_v2.5":
            return continuous_edm(EDM, sigma_min, sigma_max, sigma_data=0.5)
        return continuous_edm(kind, sigma_min, sigma_max, sigma_data=0.5 if kind == EDM else 1.0)
    if override[0] == "discrete_flow":
        _, shift, multiplier = override
        return discrete_flow(shift, multiplier)
    if override[0] == "flux":
        return flux_flow(override[1])
    raise ValueError(f"unknown model sampling override {override!r}")


def latent_format(override: tuple[Any, ...], scale: float, shift: float = 0.0) -> tuple[Any, Any]:
    """(into model space, out of it) for a model's latents: the VAE's scale factor, or the
    per-channel statistics a sampling override brings (playground v2.5)."""
    if override[:2] == ("continuous_edm", "edm_playground_v2.5"):
        mean_values, std_values, factor = PLAYGROUND_LATENT

        def stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            shape = (1, -1, *([1] * (z.ndim - 2)))
            return torch.tensor(mean_values).reshape(shape).to(z), torch.tensor(std_values).reshape(shape).to(z)

        def into(z: torch.Tensor) -> torch.Tensor:
            mean, std = stats(z)
            return (z - mean) * factor / std

        def out_of(z: torch.Tensor) -> torch.Tensor:
            mean, std = stats(z)
            return z * std / factor + mean

        return into, out_of
    if shift:  # FLUX.1's latents are shifted before they are scaled
        return (lambda z: (z - shift) * scale), (lambda z: z / scale + shift)
    return (lambda z: z * scale), (lambda z: z / scale)
