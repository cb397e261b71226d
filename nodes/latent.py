"""Latent nodes: empty latents, VAE encode and decode (whole or tiled, on vae_codec.py),
resizing and batching latents."""

from __future__ import annotations

from dataclasses import replace

import torch

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Choice, Float, Int, Link, Node, Output
from plinth.nodes.core.types import Latent, Vae
from plinth.nodes.resize import resize
from plinth.nodes.vae_codec import vae_decode, vae_encode

MAX_RESOLUTION = 16384
LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")


class EmptyLatentImage(Node):
    """A batch of zero latents of the given pixel size, to sample an image from."""

    CATEGORY = "latent"
    DISPLAY_NAME = "Empty Latent Image"
    OUTPUTS = (Output("LATENT"),)

    width = Int(default=512, min=16, max=MAX_RESOLUTION, step=8, limit="width")
    height = Int(default=512, min=16, max=MAX_RESOLUTION, step=8, limit="height")
    batch_size = Int(default=1, min=1, max=4096, limit="batch")

    def run(self, ctx: NodeContext, width: int, height: int, batch_size: int) -> tuple[Latent]:
        # SD's four latent channels at 1/8 of the pixel size, like ComfyUI's EmptyLatentImage.
        return (Latent(torch.zeros(batch_size, 4, height // 8, width // 8)),)


class EmptySD3LatentImage(Node):
    """A batch of zero latents with the 16 channels of SD3's and FLUX.1's VAEs, at 1/8 of the
    pixel size, as ComfyUI's EmptySD3LatentImage."""

    CATEGORY = "latent/sd3"
    OUTPUTS = (Output("LATENT"),)

    width = Int(default=1024, min=16, max=MAX_RESOLUTION, step=16, limit="width")
    height = Int(default=1024, min=16, max=MAX_RESOLUTION, step=16, limit="height")
    batch_size = Int(default=1, min=1, max=4096, limit="batch")

    def run(self, ctx: NodeContext, width: int, height: int, batch_size: int) -> tuple[Latent]:
        return (Latent(torch.zeros(batch_size, 16, height // 8, width // 8)),)


class VAEDecode(Node):
    """Decode latents to an IMAGE [B,H,W,C] in 0..1."""

    CATEGORY = "latent"
    DISPLAY_NAME = "VAE Decode"
    OUTPUTS = (Output("IMAGE"),)

    samples = Link("LATENT")
    vae = Link("VAE")

    def run(self, ctx: NodeContext, samples: Latent, vae: Vae) -> tuple[torch.Tensor]:
        return (vae_decode(ctx, vae, samples.samples),)


class VAEDecodeTiled(Node):
    """Decode latents to an IMAGE in overlapping tiles, for images too large to decode at once
    (seams are blended across the overlap). The temporal inputs are for video VAEs: accepted,
    unused by image VAEs."""

    CATEGORY = "_for_testing"
    DISPLAY_NAME = "VAE Decode (Tiled)"
    OUTPUTS = (Output("IMAGE"),)
    # A ComfyUI core node (0.3.75), not in the reference schema file the contract test reads;
    # "ComfyUI" once that file lists it.
    ORIGIN = "Plinth"

    samples = Link("LATENT")
    vae = Link("VAE")
    tile_size = Int(default=512, min=64, max=4096, step=32)
    overlap = Int(default=64, min=0, max=4096, step=32)
    temporal_size = Int(default=64, min=8, max=4096, step=4)
    temporal_overlap = Int(default=8, min=4, max=4096, step=4)

    def run(
        self,
        ctx: NodeContext,
        samples: Latent,
        vae: Vae,
        tile_size: int,
        overlap: int,
        temporal_size: int,
        temporal_overlap: int,
    ) -> tuple[torch.Tensor]:
        return (vae_decode(ctx, vae, samples.samples, (tile_size, overlap)),)


class VAEEncode(Node):
    """Encode an image to latents (img2img: sample from them with denoise below 1)."""

    CATEGORY = "latent"
    DISPLAY_NAME = "VAE Encode"
    OUTPUTS = (Output("LATENT"),)

    pixels = Link("IMAGE")
    vae = Link("VAE")

    def run(self, ctx: NodeContext, pixels: torch.Tensor, vae: Vae) -> tuple[Latent]:
        return (Latent(vae_encode(ctx, vae, pixels)),)


class VAEEncodeTiled(Node):
    """Encode an image to latents in overlapping tiles, for images too large to encode at once.
    The temporal inputs are for video VAEs: accepted, unused by image VAEs."""

    CATEGORY = "_for_testing"
    DISPLAY_NAME = "VAE Encode (Tiled)"
    OUTPUTS = (Output("LATENT"),)
    ORIGIN = "Plinth"  # a ComfyUI core node; see VAEDecodeTiled

    pixels = Link("IMAGE")
    vae = Link("VAE")
    tile_size = Int(default=512, min=64, max=4096, step=64)
    overlap = Int(default=64, min=0, max=4096, step=32)
    temporal_size = Int(default=64, min=8, max=4096, step=4)
    temporal_overlap = Int(default=8, min=4, max=4096, step=4)

    def run(
        self,
        ctx: NodeContext,
        pixels: torch.Tensor,
        vae: Vae,
        tile_size: int,
        overlap: int,
        temporal_size: int,
        temporal_overlap: int,
    ) -> tuple[Latent]:
        return (Latent(vae_encode(ctx, vae, pixels, (tile_size, overlap))),)


class LatentUpscale(Node):
    """Resize latents to a pixel size (0 keeps the aspect ratio from the other side)."""

    CATEGORY = "latent"
    DISPLAY_NAME = "Upscale Latent"
    OUTPUTS = (Output("LATENT"),)

    samples = Link("LATENT")
    upscale_method = Choice(options=LATENT_METHODS, default="nearest-exact")
    width = Int(default=512, min=0, max=MAX_RESOLUTION, step=8, limit="width")
    height = Int(default=512, min=0, max=MAX_RESOLUTION, step=8, limit="height")
    crop = Choice(options=("disabled", "center"), default="disabled")

    def run(
        self, ctx: NodeContext, samples: Latent, upscale_method: str, width: int, height: int, crop: str
    ) -> tuple[Latent]:
        h, w = samples.samples.shape[-2:]
        if width == 0 and height == 0:
            return (samples,)
        width = width // 8 if width else max(1, round(w * height / 8 / h))
        height = height // 8 if height else max(1, round(h * width / w))
        return (replace(samples, samples=resize(samples.samples, width, height, upscale_method, crop)),)


class LatentUpscaleBy(Node):
    """Resize latents by a factor (the hires-fix step between two samplers)."""

    CATEGORY = "latent"
    DISPLAY_NAME = "Upscale Latent By"
    OUTPUTS = (Output("LATENT"),)

    samples = Link("LATENT")
    upscale_method = Choice(options=LATENT_METHODS, default="nearest-exact")
    scale_by = Float(default=1.5, min=0.01, max=8.0, step=0.01)

    def run(self, ctx: NodeContext, samples: Latent, upscale_method: str, scale_by: float) -> tuple[Latent]:
        h, w = samples.samples.shape[-2:]
        size = (max(1, round(w * scale_by)), max(1, round(h * scale_by)))
        return (replace(samples, samples=resize(samples.samples, *size, upscale_method)),)


class RepeatLatentBatch(Node):
    """The batch repeated `amount` times (variants of one latent, each with its own noise)."""

    CATEGORY = "latent/batch"
    DISPLAY_NAME = "Repeat Latent Batch"
    OUTPUTS = (Output("LATENT"),)

    samples = Link("LATENT")
    amount = Int(default=1, min=1, max=64, limit="batch")

    def run(self, ctx: NodeContext, samples: Latent, amount: int) -> tuple[Latent]:
        mask = samples.noise_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask.repeat(amount, 1, 1, 1)
        index = samples.batch_index
        if index is not None:  # copies continue the numbering, so each gets noise of its own
            span = max(index) - min(index) + 1
            index = tuple(i + span * k for k in range(amount) for i in index)
        return (Latent(samples.samples.repeat(amount, 1, 1, 1), mask, index),)


class LatentFromBatch(Node):
    """`length` latents of a batch starting at `batch_index`."""

    CATEGORY = "latent/batch"
    DISPLAY_NAME = "Latent From Batch"
    OUTPUTS = (Output("LATENT"),)

    samples = Link("LATENT")
    batch_index = Int(default=0, min=0, max=63)
    length = Int(default=1, min=1, max=64)

    def run(self, ctx: NodeContext, samples: Latent, batch_index: int, length: int) -> tuple[Latent]:
        batch = samples.samples.shape[0]
        start = min(batch_index, batch - 1)
        stop = min(start + length, batch)
        mask = samples.noise_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask[start:stop] if mask.shape[0] == batch else mask
        index = tuple(samples.batch_index if samples.batch_index is not None else range(batch))[start:stop]
        return (Latent(samples.samples[start:stop].clone(), mask, index),)
