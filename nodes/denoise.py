"""The denoising loop shared by the sampler nodes.

It drives a diffusers scheduler the way diffusers' own pipelines do (set_timesteps, a begin
index for partial schedules, scale_model_input, step) and adds what ComfyUI graphs expect of a
sampler: several conditioning entries with areas and strengths, ControlNets attached to
conditioning, a noise mask that keeps the unmasked latent, inpainting UNets (9 input channels),
model patches (LoRA, IP-Adapter), partial schedules with or without leftover noise, a progress
call after every model call, and a cancellation check there too.

Noisy latents handed between samplers (KSamplerAdvanced's leftover noise) are kept as
x0 + sigma * noise, the form ComfyUI uses, whatever space the scheduler works in.

Over 300 lines on purpose: the schedule, the guided model call (areas, ControlNet residuals,
inpainting input, patches) and the loop share one Denoiser's state, and a later issue replaces
this module, diffusers_schedulers.py and ksampler.py with a sampling core; splitting it now
would only be undone then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from plinth.nodes.conditioning import area_in_latent
from plinth.nodes.core.context import NodeContext, NodeInputError
from plinth.nodes.core.types import Conditioning, ControlSpec, DiffusionModel, Latent
from plinth.nodes.diffusers_schedulers import make_scheduler, takes_generator
from plinth.nodes.models.checkpoint import StableDiffusion
from plinth.nodes.patches.model_patch import merged_call_kwargs, patched
from plinth.nodes.resize import mask_planes, repeat_to_batch, resize

# Multistep sigma-space schedulers whose history is sized by the step index: a run that
# starts mid-schedule gets the schedule cut at its start instead of a begin index.
CUT_SCHEDULE = frozenset({"LMSDiscreteScheduler"})


@dataclass
class SamplingPlan:
    """What to sample, with ComfyUI's names. KSampler uses `denoise`; KSamplerAdvanced the
    step range, add_noise and leftover_noise."""

    sampler_name: str
    scheduler: str
    steps: int
    cfg: float
    seed: int
    denoise: float = 1.0
    start_step: int = 0
    end_step: int | None = None
    add_noise: bool = True
    leftover_noise: bool = False


@dataclass
class Part:
    """One conditioning entry as the UNet sees it."""

    embeds: torch.Tensor  # [1, L, D]
    positive: bool
    area: tuple[int, int, int, int] | None  # h, w, y, x in latent cells
    strength: float
    controls: tuple[ControlSpec, ...]
    concat: torch.Tensor | None  # inpainting UNets: [B, 1 + C, h, w] mask and masked latent


def initial_noise(shape: tuple[int, ...], seed: int, batch_index: tuple[int, ...] | None = None) -> torch.Tensor:
    """Noise drawn on the CPU from the seed, one batch entry after the other, so a seed means
    the same image on every device, and an entry taken out of a batch (batch_index, as
    LatentFromBatch sets it) gets the very noise it had in the batch."""
    generator = torch.Generator("cpu").manual_seed(seed)
    indices = batch_index if batch_index is not None else range(shape[0])
    draws = [torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32) for _ in range(max(indices) + 1)]
    return torch.cat([draws[i] for i in indices])


def control_hint(hint: torch.Tensor, height: int, width: int, scale: int) -> torch.Tensor:
    """An IMAGE hint [B,H,W,C] as the ControlNet input [B,3,h*scale,w*scale] for a latent (or an
    area of it) h x w: centre-cropped to its aspect ratio and resized nearest-exact, as ComfyUI
    fits hints, so a hint of another shape is never squashed."""
    return resize(hint[..., :3].movedim(-1, 1).float(), width * scale, height * scale, "nearest-exact", "center")


class Denoiser:
    """One sampling run: the schedule, the guided model call and the loop."""

    def __init__(self, ctx: NodeContext, sd: StableDiffusion, model: DiffusionModel, plan: SamplingPlan) -> None:
        self.ctx, self.sd, self.model, self.plan = ctx, sd, model, plan
        self.unet = sd.unet
        self.dtype = next(self.unet.parameters()).dtype
        self.scheduler = make_scheduler(plan.sampler_name, plan.scheduler, sd.scheduler_config)
        self.train_steps = int(self.scheduler.config.num_train_timesteps)
        self.sigma_space = float(self.scheduler.init_noise_sigma) > 1.0

    # schedule

    def timesteps(self) -> tuple[torch.Tensor, bool]:
        """The timesteps to run, and whether the run stops before the schedule's end."""
        plan, scheduler = self.plan, self.scheduler
        if plan.denoise < 1.0:
            total = max(plan.steps, int(plan.steps / max(plan.denoise, 1e-4)))
            first, last = total - plan.steps, total
        else:
            total = plan.steps
            first, last = plan.start_step, min(plan.end_step if plan.end_step is not None else total, total)
        scheduler.set_timesteps(total, device=self.ctx.device)
        order = scheduler.order
        start, stop = first * order, (last * order if last < total else len(scheduler.timesteps))
        if start and type(scheduler).__name__ in CUT_SCHEDULE:
            scheduler.timesteps = scheduler.timesteps[start:]
            scheduler.sigmas = scheduler.sigmas[start:]
            start, stop = 0, stop - start
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        self._start, self._stop = start, stop
        self._next_t = scheduler.timesteps[stop] if stop < len(scheduler.timesteps) else None
        ends_above_zero = hasattr(scheduler, "sigmas") and float(scheduler.sigmas[-1]) > 0
        return scheduler.timesteps[start:stop], last < total or ends_above_zero

    def _alpha_bar(self, index: int, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at schedule position `index` (timestep t): from the scheduler's own sigma where it
        keeps one (karras and other sigma schedules round t), else from the training table."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is not None and index < len(sigmas):
            return 1 / (1 + sigmas[index].to(self.ctx.device, torch.float32) ** 2)
        return self.scheduler.alphas_cumprod.to(self.ctx.device)[int(t)]

    def to_comfy_noisy(self, x: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
        """x in the scheduler's space at schedule position `index` as x0 + sigma * noise."""
        return x if self.sigma_space else x / self._alpha_bar(index, t).sqrt()

    def from_comfy_noisy(self, x: torch.Tensor, index: int, t: torch.Tensor) -> torch.Tensor:
        return x if self.sigma_space else x * self._alpha_bar(index, t).sqrt()

    def _current_index(self) -> int:
        index = getattr(self.scheduler, "step_index", None)
        return index if index is not None else (getattr(self.scheduler, "begin_index", None) or 0)

    def _sigma_now(self, t: torch.Tensor) -> float:
        """The sigma the sample sits at for the next model call, as the scheduler itself scales
        the model input for it (second-order schedulers evaluate between their listed sigmas)."""
        ratio = float(self.scheduler.scale_model_input(torch.ones(1, device=self.ctx.device), t))
        return math.sqrt(max(1 / ratio**2 - 1, 0.0))

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`clean` at the noise level of the next model call, in the scheduler's space: what a
        noise mask keeps outside the mask. Without add_noise the given latent is already noisy
        and is kept as it is (ComfyUI's zero noise)."""
        if not self.plan.add_noise:
            noise = torch.zeros_like(noise)
        if self.sigma_space:
            return clean + self._sigma_now(t) * noise
        alpha_bar = self._alpha_bar(self._current_index(), t)
        return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise

    def denoised(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample the model predicts at t: the last step when a run must end
        without noise before the scheduler's own end (k-diffusion's step to sigma 0)."""
        if self.sigma_space:
            return x - self._sigma_now(t) * eps
        alpha_bar = self._alpha_bar(self._current_index(), t)
        return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def progress(self, t: torch.Tensor) -> float:
        """How far through the noise range timestep t is: 0 at pure noise, 1 at clean, as
        ComfyUI's start_percent/end_percent count it."""
        return 1.0 - float(t) / self.train_steps

    # model

    def parts(self, cond: Conditioning, positive: bool, latents: Latent) -> list[Part]:
        return [self._part(entry.embeds, entry.options, positive, latents) for entry in cond]

    def _part(self, embeds: torch.Tensor, options: dict[str, Any], positive: bool, latents: Latent) -> Part:
        concat = None
        if self.unet.config.in_channels != self.sd.latent_channels:
            concat = self._inpaint_concat(options, latents)
        return Part(
            embeds.to(self.ctx.device, self.dtype),
            positive,
            options.get("area"),
            float(options.get("strength", 1.0)),
            tuple(options.get("controls", ())),
            concat,
        )

    def _inpaint_concat(self, options: dict[str, Any], latents: Latent) -> torch.Tensor:
        """An inpainting UNet's extra input: the mask and the latent of the masked image
        (InpaintModelConditioning's, else the latent being sampled and its noise mask)."""
        samples = latents.samples
        batch, _, h, w = samples.shape
        masked = options.get("concat_latent", samples).to(self.ctx.device, torch.float32) * self.sd.latent_scale
        mask = options.get("concat_mask", latents.noise_mask)
        if masked.shape[-2:] != (h, w):  # e.g. upscaled since InpaintModelConditioning
            masked = resize(masked, w, h, "bilinear")
        mask = (
            mask_planes(mask.to(self.ctx.device), h, w, batch).clamp(0, 1).round()
            if mask is not None
            else torch.ones(batch, 1, h, w, device=self.ctx.device)
        )
        concat = torch.cat([mask, repeat_to_batch(masked, batch)], dim=1)
        if concat.shape[1] + self.sd.latent_channels != self.unet.config.in_channels:
            raise NodeInputError(
                f"the model takes {self.unet.config.in_channels} input channels; "
                f"latent plus inpainting input give {concat.shape[1] + self.sd.latent_channels}"
            )
        return concat

    def predict(self, x_in: torch.Tensor, t: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """Noise prediction for one side (all positive or all negative parts): the strength
        weighted average of each part's prediction over its area."""
        total = torch.zeros_like(x_in, dtype=torch.float32)
        weight = torch.full_like(total[:, :1], 1e-37)
        whole = [p for p in parts if p.area is None]
        if whole:
            preds = self._call(x_in, t, whole)
            for part, pred in zip(whole, preds.chunk(len(whole)), strict=False):
                total += part.strength * pred
                weight += part.strength
        for part in parts:
            if part.area is None:
                continue
            h, w, y, x = area_in_latent(part.area, x_in.shape[2], x_in.shape[3])
            region = (slice(None), slice(None), slice(y, y + h), slice(x, x + w))
            pred = self._call(x_in[region], t, [part], region)
            total[region] += part.strength * pred
            weight[region] += part.strength
        return total / weight

    def _call(
        self, x_in: torch.Tensor, t: torch.Tensor, parts: Sequence[Part], region: tuple[slice, ...] | None = None
    ) -> torch.Tensor:
        """One batched UNet call over several parts (each gets the whole latent batch)."""
        batch = x_in.shape[0]
        length = math.lcm(*(p.embeds.shape[1] for p in parts))
        context = torch.cat([p.embeds.repeat(batch, length // p.embeds.shape[1], 1) for p in parts])
        sample = torch.cat([x_in] * len(parts)).to(self.dtype)
        concats = [p.concat for p in parts if p.concat is not None]  # all parts or none: one UNet
        if concats:
            sample = torch.cat([sample, torch.cat([c[region] if region else c for c in concats]).to(self.dtype)], dim=1)
        rows = [p.positive for p in parts for _ in range(batch)]
        kwargs = merged_call_kwargs(self.ctx, self.model.patches, rows, self.progress(t))
        residuals = self._control_residuals(x_in, t, parts, context, region)
        if residuals is not None:
            kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"] = residuals
        # A plain call may be batched with other jobs' calls (server/engine/batching.py); one
        # under patches or ControlNet residuals runs here, on weights patched for this job only.
        shared = self.ctx.unet_forward
        if shared is not None and not kwargs and not self.model.patches:
            return shared(self.unet, sample, t, context).float()
        return self.unet(sample, t, encoder_hidden_states=context, **kwargs).sample.float()

    def _control_residuals(
        self,
        x_in: torch.Tensor,
        t: torch.Tensor,
        parts: Sequence[Part],
        context: torch.Tensor,
        region: tuple[slice, ...] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Sum of the active ControlNets' residuals, per part (zeros for parts without)."""
        progress = self.progress(t)
        active = [[c for c in p.controls if c.start_percent <= progress <= c.end_percent] for p in parts]
        if not any(active):
            return None
        batch = x_in.shape[0]
        per_part: list[tuple[list[torch.Tensor], torch.Tensor] | None] = []
        for index, controls in enumerate(active):
            rows = slice(index * batch, (index + 1) * batch)
            summed: tuple[list[torch.Tensor], torch.Tensor] | None = None
            for spec in controls:
                d, m = self._control(spec, x_in, t, context[rows], region)
                summed = (
                    (d, m) if summed is None else ([a + b for a, b in zip(summed[0], d, strict=False)], summed[1] + m)
                )
            per_part.append(summed)
        template_down, template_mid = next(r for r in per_part if r is not None)
        zero_down = [torch.zeros_like(r) for r in template_down]
        downs = [torch.cat([(r[0] if r else zero_down)[i] for r in per_part]) for i in range(len(zero_down))]
        mid = torch.cat([r[1] if r else torch.zeros_like(template_mid) for r in per_part])
        return downs, mid

    def _control(
        self,
        spec: ControlSpec,
        x_in: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        region: tuple[slice, ...] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        controlnet = self.ctx.model(spec.controlnet)
        batch, _, h, w = x_in.shape
        hint = repeat_to_batch(control_hint(spec.hint, h, w, self.sd.vae_scale).to(self.ctx.device), batch)
        dtype = next(controlnet.parameters()).dtype
        down, mid = controlnet(
            x_in.to(dtype),
            t,
            encoder_hidden_states=context.to(dtype),
            controlnet_cond=hint.to(dtype),
            conditioning_scale=spec.strength,
            return_dict=False,
        )
        return list(down), mid

    # loop

    def run(
        self, latents: Latent, positive: Conditioning, negative: Conditioning, on_step: Callable[[int, int], None]
    ) -> torch.Tensor:
        """Sample and return LATENT samples (unscaled); see the module docstring."""
        plan, scheduler = self.plan, self.scheduler
        device = self.ctx.device
        timesteps, stops_early = self.timesteps()  # stops_early: before sigma 0
        clean = latents.samples.to(device, torch.float32) * self.sd.latent_scale
        if len(timesteps) == 0:
            return latents.samples
        self._full_size = tuple(clean.shape[-2:])
        noise = initial_noise(tuple(clean.shape), plan.seed, latents.batch_index).to(device)
        if not plan.add_noise:
            x = self.from_comfy_noisy(clean, self._start, timesteps[0])
        elif plan.denoise >= 1.0 and plan.start_step == 0 and not clean.any():
            x = noise * scheduler.init_noise_sigma
        else:
            x = scheduler.add_noise(clean, noise, timesteps[:1])
        mask = (
            mask_planes(latents.noise_mask.to(device), clean.shape[-2], clean.shape[-1], clean.shape[0]).clamp(0, 1)
            if latents.noise_mask is not None
            else None
        )
        step_generator = torch.Generator("cpu").manual_seed((plan.seed + 1) % 2**64)
        step_kwargs = {"generator": step_generator} if takes_generator(scheduler) else {}
        pos_parts = self.parts(positive, True, latents)
        neg_parts = self.parts(negative, False, latents) if plan.cfg != 1.0 else []
        finish_clean = stops_early and not plan.leftover_noise

        with torch.inference_mode(), patched(self.ctx, self.model.patches, self.unet):
            for i, t in enumerate(timesteps):
                if mask is not None and i > 0:  # before each call, at that call's own noise level
                    x = x * mask + self.noised(clean, noise, t) * (1 - mask)
                x_in = scheduler.scale_model_input(x, t)
                if neg_parts:
                    eps_pos, eps_neg = self._guided(x_in, t, pos_parts, neg_parts)
                    eps = eps_neg + plan.cfg * (eps_pos - eps_neg)
                else:
                    eps = self.predict(x_in, t, pos_parts)
                last = i == len(timesteps) - 1
                if last and finish_clean:
                    x = self.denoised(x, eps, t)
                else:
                    x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
                on_step(i + 1, len(timesteps))
        next_t = self._next_t if stops_early and plan.leftover_noise else None
        leftover = next_t is not None
        if next_t is not None:
            if mask is not None:
                x = x * mask + self.noised(clean, noise, next_t) * (1 - mask)
            x = self.to_comfy_noisy(x, self._stop, next_t)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"sampling with {plan.sampler_name}/{plan.scheduler} produced non-finite values")
        out = (x / self.sd.latent_scale).cpu()
        if mask is not None and not leftover:  # unscaled, so the kept cells are bit-exact
            keep = mask.cpu()
            out = out * keep + latents.samples.float() * (1 - keep)
        return out

    def _guided(self, x_in: torch.Tensor, t: torch.Tensor, pos: list[Part], neg: list[Part]):
        """Positive and negative predictions, in one batched call when both are single
        whole-latent entries (the common case), else side by side."""
        if len(pos) == 1 and len(neg) == 1 and pos[0].area is None and neg[0].area is None:
            both = self._call(x_in, t, neg + pos)
            eps_neg, eps_pos = both.chunk(2)
            return eps_pos, eps_neg
        return self.predict(x_in, t, pos), self.predict(x_in, t, neg)
