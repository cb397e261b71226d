"""Inpainting and outpainting: noise masks that keep the unmasked latent, and the extra
inputs inpainting checkpoints (9-channel UNets) take."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Boolean, Int, Link, Node, Output
from plinth.nodes.core.types import Conditioning, ConditioningEntry, Latent, Vae
from plinth.nodes.resize import crop_to_multiple_with_mask, mask_planes, repeat_to_batch, require_vae_size
from plinth.nodes.vae_codec import vae_encode


def grey_out(ctx: NodeContext, vae: Vae, pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels cropped to the VAE's multiple with the masked area set to mid grey, and the mask
    [B,1,H,W] on the same cropped pixels.

    As ComfyUI: the mask is first resized (bilinear) to the uncropped image, then mask and
    pixels are centre-cropped with the same offsets, so every mask value stays on the pixel it
    was drawn on. A mask batch of another size is repeated or cut to the image batch (Plinth's
    rule for pairing batches, `repeat_to_batch`).
    """
    scale = 2 ** (len(vae.module(ctx).config.block_out_channels) - 1)
    pixels = pixels[..., :3]
    require_vae_size(pixels, scale)
    mask = repeat_to_batch(mask_planes(mask, pixels.shape[1], pixels.shape[2]), pixels.shape[0])
    pixels, mask = crop_to_multiple_with_mask(pixels, mask, scale)
    keep = (1 - mask.round()).movedim(1, -1)
    return (pixels - 0.5) * keep + 0.5, mask


class VAEEncodeForInpaint(Node):
    """Encode an image for inpainting: the masked area (grown by grow_mask_by pixels) is
    greyed out before encoding and becomes the latent's noise mask."""

    CATEGORY = "latent/inpaint"
    DISPLAY_NAME = "VAE Encode (for Inpainting)"
    OUTPUTS = (Output("LATENT"),)

    pixels = Link("IMAGE")
    vae = Link("VAE")
    mask = Link("MASK")
    grow_mask_by = Int(default=6, min=0, max=64, step=1)

    def run(
        self, ctx: NodeContext, pixels: torch.Tensor, vae: Vae, mask: torch.Tensor, grow_mask_by: int
    ) -> tuple[Latent]:
        greyed, mask = grey_out(ctx, vae, pixels, mask)
        if grow_mask_by > 0:  # sample a little beyond the mask so the seam blends
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            mask = F.conv2d(mask.round(), kernel, padding=grow_mask_by // 2)[..., : mask.shape[2], : mask.shape[3]]
        return (Latent(vae_encode(ctx, vae, greyed), noise_mask=mask.clamp(0, 1).round()),)


class SetLatentNoiseMask(Node):
    """Let sampling change the latent only where the mask is 1; elsewhere it stays as it is."""

    CATEGORY = "latent/inpaint"
    DISPLAY_NAME = "Set Latent Noise Mask"
    OUTPUTS = (Output("LATENT"),)

    samples = Link("LATENT")
    mask = Link("MASK")

    def run(self, ctx: NodeContext, samples: Latent, mask: torch.Tensor) -> tuple[Latent]:
        return (replace(samples, noise_mask=mask_planes(mask)),)


class InpaintModelConditioning(Node):
    """Inpaint with any checkpoint: the latent of the original image (with the mask as its
    noise mask unless noise_mask is off) plus, on both conditionings, the masked image's latent
    and the mask that inpainting checkpoints (9-channel UNets) take as extra input."""

    CATEGORY = "conditioning/inpaint"
    OUTPUTS = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    positive = Link("CONDITIONING")
    negative = Link("CONDITIONING")
    vae = Link("VAE")
    pixels = Link("IMAGE")
    mask = Link("MASK")
    noise_mask = Boolean(default=True)

    def run(
        self,
        ctx: NodeContext,
        positive: Conditioning,
        negative: Conditioning,
        vae: Vae,
        pixels: torch.Tensor,
        mask: torch.Tensor,
        noise_mask: bool,
    ) -> tuple:
        greyed, mask = grey_out(ctx, vae, pixels, mask)
        original = vae_encode(ctx, vae, pixels)
        masked_latent = vae_encode(ctx, vae, greyed)
        extra = {"concat_latent": masked_latent, "concat_mask": mask}

        def attach(cond: Conditioning) -> Conditioning:
            return [ConditioningEntry(e.embeds, {**e.options, **extra}) for e in cond]

        latent = Latent(original, mask if noise_mask else None)
        return attach(positive), attach(negative), latent
