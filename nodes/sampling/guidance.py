"""The guided model call: a MODEL and its conditioning as a denoiser D(x, sigma) -> x0.

A Guider (the GUIDER value of ComfyUI's custom-sampling nodes; KSampler makes a CFG one) names
the model, the conditioning sets and how their estimates combine: one set (BasicGuider),
classifier-free guidance of positive over negative (CFGGuider), or two scales over three sets
(DualCFGGuider). GuidedDenoiser runs it: per call it scales the sample for the network
(ModelSampling.calculate_input), calls the UNet for every conditioning entry (areas, strengths,
ControlNets, an inpainting UNet's extra channels, model patches), turns each output into an x0
estimate and averages the entries of one set over their areas, as ComfyUI does.

A plain call (no patches, no ControlNet) goes through ctx.unet_forward when the server offers it,
so jobs running side by side share one batched forward (server/engine/batching.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from plinth.nodes import sdxl
from plinth.nodes.conditioning import area_in_latent
from plinth.nodes.core.context import NodeContext, NodeInputError
from plinth.nodes.core.types import Conditioning, ControlSpec, DiffusionModel, Latent
from plinth.nodes.models import flux
from plinth.nodes.models.checkpoint import StableDiffusion
from plinth.nodes.models.t2i_adapter import adapter_residuals, is_adapter
from plinth.nodes.patches.gligen_attention import GligenBoxes, gligen_fusers
from plinth.nodes.patches.model_patch import Progress, merged_call_kwargs
from plinth.nodes.resize import mask_planes, repeat_to_batch, resize
from plinth.nodes.sampling.model_sampling import ModelSampling


@dataclass(frozen=True, eq=False)
class Guider:
    """GUIDER. kind "basic": positive only; "cfg": negative + cfg (positive - negative);
    "dual_cfg": with `middle`, negative + cfg2 (middle - negative) + cfg (positive - middle),
    or nested: negative + cfg2 (middle + cfg (positive - middle) - negative)."""

    model: DiffusionModel
    positive: Conditioning
    negative: Conditioning = field(default_factory=list)
    cfg: float = 1.0
    kind: str = "cfg"
    middle: Conditioning = field(default_factory=list)
    cfg2: float = 1.0
    nested: bool = False


@dataclass
class Part:
    """One conditioning entry as the UNet sees it."""

    embeds: torch.Tensor  # [1, L, D]
    positive: bool
    area: tuple[int, int, int, int] | None  # h, w, y, x in latent cells
    strength: float
    controls: tuple[ControlSpec, ...]
    concat: torch.Tensor | None  # inpainting UNets: [B, 1 + C, h, w] mask and masked latent
    gligen: GligenBoxes | None = None  # GLIGENTextBoxApply's boxes
    added: tuple[torch.Tensor, torch.Tensor] | None = None  # SDXL: pooled text [1, P], time ids [1, n]


def control_hint(hint: torch.Tensor, height: int, width: int, scale: int) -> torch.Tensor:
    """An IMAGE hint [B,H,W,C] as the ControlNet input [B,3,h*scale,w*scale] for a latent (or an
    area of it) h x w: centre-cropped to its aspect ratio and resized nearest-exact, as ComfyUI
    fits hints, so a hint of another shape is never squashed."""
    return resize(hint[..., :3].movedim(-1, 1).float(), width * scale, height * scale, "nearest-exact", "center")


class GuidedDenoiser:
    """D(x, sigma) -> guided x0 for one run (the `Denoise` of sampling/base.py)."""

    def __init__(
        self,
        ctx: NodeContext,
        sd: StableDiffusion,
        guider: Guider,
        model_sampling: ModelSampling,
        latents: Latent,
        latent_in: Any,
        keep_negative: bool = False,
    ) -> None:
        self.ctx, self.sd, self.guider, self.model_sampling = ctx, sd, guider, model_sampling
        self.unet = sd.unet
        self.dtype = next(self.unet.parameters()).dtype
        self.latent_in = latent_in
        self.last_uncond: torch.Tensor | None = None
        self.calls = 0
        g = guider
        self.pos = self._parts(g.positive, True, latents)
        # At cfg 1 the negative drops out of the guidance, so it is not computed, unless the
        # sampler steps along it (keep_negative: the CFG++ samplers).
        skip_negative = g.kind == "basic" or (g.kind == "cfg" and math.isclose(g.cfg, 1.0) and not keep_negative)
        skip_negative = skip_negative or (g.kind == "dual_cfg" and not g.nested and math.isclose(g.cfg2, 1.0))
        self.neg = [] if skip_negative else self._parts(g.negative, False, latents)
        self.mid = self._parts(g.middle, False, latents) if g.kind == "dual_cfg" else []

    # combination

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.ctx.check_cancelled()
        self.calls += 1
        g = self.guider
        sets = [p for p in (self.neg, self.mid, self.pos) if p]
        estimates = self._estimate_sets(x, sigma, sets)
        neg = estimates[0] if self.neg else None
        pos = estimates[-1]
        if g.kind == "dual_cfg":
            mid = estimates[1 if self.neg else 0]
            if g.nested:
                text = mid + g.cfg * (pos - mid)
                out = text if neg is None else neg + g.cfg2 * (text - neg)
            else:
                out = (mid if neg is None else neg + g.cfg2 * (mid - neg)) + g.cfg * (pos - mid)
            self.last_uncond = neg if neg is not None else mid
            return out
        self.last_uncond = neg if neg is not None else pos
        return pos if neg is None else neg + g.cfg * (pos - neg)

    def _estimate_sets(self, x: torch.Tensor, sigma: torch.Tensor, sets: list[list[Part]]) -> list[torch.Tensor]:
        """The x0 estimate of each conditioning set; single whole-latent entries share one call."""
        ms = self.model_sampling
        x_in = ms.calculate_input(sigma, x)
        t = ms.timestep(sigma.reshape(1)).to(x.device)
        if all(len(s) == 1 and s[0].area is None for s in sets):
            outputs = self._call(x_in, t, sigma, [s[0] for s in sets]).chunk(len(sets))
            return [ms.calculate_denoised(sigma, out, x) for out in outputs]
        return [self._estimate(x, x_in, t, sigma, s) for s in sets]

    def _estimate(
        self, x: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor, parts: Sequence[Part]
    ) -> torch.Tensor:
        """One set's x0: the strength-weighted average of its entries' estimates over their areas."""
        ms = self.model_sampling
        total = torch.zeros_like(x, dtype=torch.float32)
        weight = torch.full_like(total[:, :1], 1e-37)
        whole = [p for p in parts if p.area is None]
        if whole:
            outputs = self._call(x_in, t, sigma, whole)
            for part, out in zip(whole, outputs.chunk(len(whole)), strict=True):
                total += part.strength * ms.calculate_denoised(sigma, out, x)
                weight += part.strength
        for part in parts:
            if part.area is None:
                continue
            h, w, y, x0 = area_in_latent(part.area, x_in.shape[2], x_in.shape[3])
            region = (slice(None), slice(None), slice(y, y + h), slice(x0, x0 + w))
            out = self._call(x_in[region], t, sigma, [part], region)
            total[region] += part.strength * ms.calculate_denoised(sigma, out, x[region])
            weight[region] += part.strength
        return total / weight

    # conditioning

    def _parts(self, cond: Conditioning, positive: bool, latents: Latent) -> list[Part]:
        return [self._part(entry.embeds, entry.options, positive, latents) for entry in cond]

    def _part(self, embeds: torch.Tensor, options: dict[str, Any], positive: bool, latents: Latent) -> Part:
        concat = None
        if getattr(self.sd, "family", "sd1") == "flux":
            return self._flux_part(embeds, options, positive)
        if self.unet.config.in_channels != self.sd.latent_channels:
            concat = self._inpaint_concat(options, latents)
        width = getattr(self.unet.config, "cross_attention_dim", None)
        if width is not None and embeds.shape[-1] != width:
            raise NodeInputError(
                f"the conditioning's text is {embeds.shape[-1]} wide; this model attends to "
                f"{width}-wide text: was it encoded by another model's CLIP?"
            )
        return Part(
            embeds.to(self.ctx.device, self.dtype),
            positive,
            options.get("area"),
            float(options.get("strength", 1.0)),
            tuple(options.get("controls", ())),
            concat,
            options.get("gligen"),
            self._added(options, positive, latents),
        )

    def _added(
        self, options: dict[str, Any], positive: bool, latents: Latent
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An SDXL UNet's inputs beside the text: the pooled text and the size numbers."""
        config = self.unet.config
        if getattr(config, "addition_embed_type", None) != "text_time":
            return None
        numbers = sdxl.time_numbers(self.sd.family)
        pooled = sdxl.pooled_of(
            options, config.projection_class_embeddings_input_dim - numbers * config.addition_time_embed_dim
        )
        h, w = (side * self.sd.vae_scale for side in latents.samples.shape[-2:])
        time_ids = sdxl.sdxl_time_ids(options, self.sd.family, positive, h, w)
        return pooled.to(self.ctx.device, self.dtype), time_ids.to(self.ctx.device, self.dtype)

    def _inpaint_concat(self, options: dict[str, Any], latents: Latent) -> torch.Tensor:
        """An inpainting UNet's extra input: the mask and the latent of the masked image
        (InpaintModelConditioning's, else the latent being sampled and its noise mask)."""
        samples = latents.samples
        batch, _, h, w = samples.shape
        masked = self.latent_in(options.get("concat_latent", samples).to(self.ctx.device, torch.float32))
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

    # the network

    def _flux_part(self, embeds: torch.Tensor, options: dict[str, Any], positive: bool) -> Part:
        """A FLUX.1 entry: the T5 text, and beside it (in `added`) CLIP-L's pooled text and
        the guidance strength (FluxGuidance; 3.5 where none is set, as ComfyUI's default)."""
        config = self.unet.config
        if embeds.shape[-1] != config.joint_attention_dim:
            raise NodeInputError(
                f"the conditioning's text is {embeds.shape[-1]} wide; this FLUX model reads "
                f"{config.joint_attention_dim}-wide T5 text: was it encoded by another model's CLIP?"
            )
        if config.in_channels != self.sd.latent_channels * flux.PATCH**2:
            raise NodeInputError(
                f"FLUX models with {config.in_channels} input channels (Fill, Canny/Depth) need their extra "
                "inputs, which are not supported yet"
            )
        if options.get("area") is not None or options.get("controls") or options.get("gligen"):
            raise NodeInputError("area conditioning, ControlNets and GLIGEN are not supported with FLUX models yet")
        pooled = options.get("pooled_output")
        if pooled is None or pooled.shape[-1] != config.pooled_projection_dim:
            raise NodeInputError(
                f"a FLUX model needs CLIP-L's pooled text ({config.pooled_projection_dim} wide) with its prompt: "
                "encode it with a FLUX CLIP (DualCLIPLoader type flux, CLIPTextEncode or CLIPTextEncodeFlux)"
            )
        guidance = torch.tensor([float(options.get("guidance", flux.DEFAULT_GUIDANCE))])
        device, dtype = self.ctx.device, self.dtype
        added = (pooled.to(device, dtype), guidance.to(device, torch.float32))
        return Part(
            embeds.to(device, dtype), positive, None, float(options.get("strength", 1.0)), (), None, None, added
        )

    def _flux_call(self, x_in: torch.Tensor, sigma: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """FLUX.1's transformer on each part: the latent cut into 2x2 patches (padded to even
        sides), with its patches' (row, column) positions and the text's zero positions, and the
        model's velocity put back into latent cells. Parts whose texts differ in length run one
        at a time (padding a T5 text would change what it says)."""
        batch, channels, h, w = x_in.shape
        pad_h, pad_w = h % flux.PATCH, w % flux.PATCH
        x = torch.nn.functional.pad(x_in, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else x_in
        rows, cols = x.shape[2] // flux.PATCH, x.shape[3] // flux.PATCH
        packed = (
            x.reshape(batch, channels, rows, flux.PATCH, cols, flux.PATCH)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, rows * cols, channels * flux.PATCH**2)
        )
        image_ids = torch.zeros(rows, cols, 3)
        image_ids[..., 1] = torch.arange(rows)[:, None]
        image_ids[..., 2] = torch.arange(cols)[None, :]
        image_ids = image_ids.reshape(rows * cols, 3).to(self.ctx.device, self.dtype)
        outputs = []
        for part in parts:
            self.ctx.check_cancelled()
            assert part.added is not None
            pooled, guidance = part.added
            text = part.embeds
            kwargs: dict[str, Any] = {}
            if self.unet.config.guidance_embeds:
                kwargs["guidance"] = guidance.expand(batch)
            out = self.unet(
                hidden_states=packed.to(self.dtype),
                encoder_hidden_states=text.expand(batch, -1, -1),
                pooled_projections=pooled.expand(batch, -1),
                timestep=sigma.reshape(1).expand(batch).to(self.dtype),
                img_ids=image_ids,
                txt_ids=torch.zeros(text.shape[1], 3, device=self.ctx.device, dtype=self.dtype),
                return_dict=False,
                **kwargs,
            )[0]
            out = (
                out.float()
                .reshape(batch, rows, cols, channels, flux.PATCH, flux.PATCH)
                .permute(0, 3, 1, 4, 2, 5)
                .reshape(batch, channels, rows * flux.PATCH, cols * flux.PATCH)
            )
            outputs.append(out[:, :, :h, :w])
        return torch.cat(outputs)

    def _call(
        self,
        x_in: torch.Tensor,
        t: torch.Tensor,
        sigma: torch.Tensor,
        parts: Sequence[Part],
        region: tuple[slice, ...] | None = None,
    ) -> torch.Tensor:
        """One batched UNet call over several parts (each gets the whole latent batch); the raw
        network output, float32."""
        if getattr(self.sd, "family", "sd1") == "flux":
            return self._flux_call(x_in, sigma, parts)
        batch = x_in.shape[0]
        length = math.lcm(*(p.embeds.shape[1] for p in parts))
        context = torch.cat([p.embeds.repeat(batch, length // p.embeds.shape[1], 1) for p in parts])
        sample = torch.cat([x_in] * len(parts)).to(self.dtype)
        concats = [p.concat for p in parts if p.concat is not None]  # all parts or none: one UNet
        if concats:
            sample = torch.cat([sample, torch.cat([c[region] if region else c for c in concats]).to(self.dtype)], dim=1)
        rows = [p.positive for p in parts for _ in range(batch)]
        added = [p.added for p in parts if p.added is not None]  # all parts or none: one UNet
        progress = Progress(float(sigma.flatten()[0]), self.model_sampling.percent_to_sigma)
        patches = self.guider.model.patches
        kwargs = merged_call_kwargs(self.ctx, patches, rows, progress)
        residuals = self._control_residuals(x_in, t, progress, parts, context, region)
        if residuals is not None:
            kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"] = residuals
        if added:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.cat([pooled.expand(batch, -1) for pooled, _ in added]),
                "time_ids": torch.cat([ids.expand(batch, -1) for _, ids in added]),
            }
        controls = [p.controls for p in parts]
        features = adapter_residuals(self.ctx, self.unet, controls, x_in, progress, self.sd.vae_scale)
        if features is not None:
            kwargs["down_intrablock_additional_residuals"] = features
        # A plain call may be batched with other jobs' calls (server/engine/batching.py); one
        # under patches, ControlNet residuals, adapter features or GLIGEN runs here, alone, on
        # weights patched for this job only.
        shared = self.ctx.unet_forward
        gligen = [p.gligen for p in parts]
        size = (x_in.shape[2], x_in.shape[3])
        with gligen_fusers(self.ctx, self.unet, gligen, x_in.shape[0], size, kwargs) as kwargs:
            if shared is not None and not kwargs and not patches:
                return shared(self.unet, sample, t, context).float()
            return self.unet(sample, t, encoder_hidden_states=context, **kwargs).sample.float()

    def _control_residuals(
        self,
        x_in: torch.Tensor,
        t: torch.Tensor,
        progress: Progress,
        parts: Sequence[Part],
        context: torch.Tensor,
        region: tuple[slice, ...] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Sum of the active ControlNets' residuals, per part (zeros for parts without)."""
        active = [
            [c for c in p.controls if progress.within(c.start_percent, c.end_percent) and not is_adapter(self.ctx, c)]
            for p in parts
        ]
        if not any(active):
            return None
        batch = x_in.shape[0]
        per_part: list[tuple[list[torch.Tensor], torch.Tensor] | None] = []
        for index, controls in enumerate(active):
            rows = slice(index * batch, (index + 1) * batch)
            summed: tuple[list[torch.Tensor], torch.Tensor] | None = None
            for spec in controls:
                d, m = self._control(spec, x_in, t, context[rows], parts[index].added)
                summed = (
                    (d, m) if summed is None else ([a + b for a, b in zip(summed[0], d, strict=True)], summed[1] + m)
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
        added: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        controlnet = self.ctx.model(spec.controlnet)
        batch, _, h, w = x_in.shape
        width = controlnet.config.cross_attention_dim
        if width != context.shape[-1]:
            raise NodeInputError(
                f"ControlNet {spec.controlnet.key.split('@')[0]} was made for another base model: it attends to "
                f"{width}-wide text, this model's prompts are {context.shape[-1]} wide"
            )
        hint = repeat_to_batch(control_hint(spec.hint, h, w, self.sd.vae_scale).to(self.ctx.device), batch)
        dtype = next(controlnet.parameters()).dtype
        kwargs: dict[str, Any] = {}
        if getattr(controlnet.config, "addition_embed_type", None) == "text_time" and added is not None:
            pooled, time_ids = added  # an SDXL ControlNet embeds the sizes as its UNet does
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled.expand(batch, -1).to(dtype),
                "time_ids": time_ids.expand(batch, -1).to(dtype),
            }
        down, mid = controlnet(
            x_in.to(dtype),
            t,
            encoder_hidden_states=context.to(dtype),
            controlnet_cond=hint.to(dtype),
            conditioning_scale=spec.strength,
            return_dict=False,
            **kwargs,
        )
        return list(down), mid
