"""Latent nodes: empty latents, the VAE's way between pixels and latents, resizing and
batching latents."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.schema import Choice, Float, Int, Link, Node, Output
from plinth.nodes.core.types import Latent, Vae
from plinth.nodes.resize import center_crop, require_vae_size, resize

MAX_RESOLUTION = 16384
LATENT_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
# What VAEDecode / VAEEncode fall back to on an out-of-memory error (ComfyUI's sizes).
FALLBACK_TILE, FALLBACK_OVERLAP = 256, 64

log = logging.getLogger("plinth.nodes")


def crop_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """IMAGE [B,H,W,C] centre-cropped to sides divisible by `multiple`, as the VAE needs."""
    h, w = pixels.shape[1] // multiple * multiple, pixels.shape[2] // multiple * multiple
    return center_crop(pixels.movedim(-1, 1), h, w).movedim(1, -1)


def vae_encode(ctx: NodeContext, vae: Vae, pixels: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Unscaled latents of IMAGE pixels: the mean of the VAE's posterior, so encoding is
    deterministic. `tile` = (tile_size, overlap) in pixels encodes in overlapping tiles; without
    it, a whole-image encode that runs out of memory falls back to tiles."""
    module = vae.module(ctx)
    scale = 2 ** (len(module.config.block_out_channels) - 1)
    require_vae_size(pixels, scale)
    pixels = crop_to_multiple(pixels[..., :3], scale)
    dtype = next(module.parameters()).dtype

    def encode(x: torch.Tensor) -> torch.Tensor:
        ctx.check_cancelled()
        return module.encode(x.to(ctx.device, dtype)).latent_dist.mean.float().cpu()

    latents = []
    with torch.inference_mode():
        for one in pixels.split(1):
            x = one.movedim(-1, 1) * 2 - 1
            if tile is not None:
                latents.append(tiled(encode, x, *_encode_tiles(tile, scale), 1, scale))
                continue
            try:
                latents.append(encode(x))
            except torch.OutOfMemoryError:
                _release(ctx)
                log.warning(
                    "VAE encode of %dx%d ran out of memory; encoding in %d px tiles",
                    x.shape[-1],
                    x.shape[-2],
                    FALLBACK_TILE,
                )
                latents.append(tiled(encode, x, *_encode_tiles((FALLBACK_TILE, FALLBACK_OVERLAP), scale), 1, scale))
    return torch.cat(latents)


def vae_decode(ctx: NodeContext, vae: Vae, samples: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """IMAGE [B,H,W,C] in 0..1 of latents, one at a time (decode memory stays flat). `tile` =
    (tile_size, overlap) in pixels decodes in overlapping tiles; without it, a whole-latent
    decode that runs out of memory falls back to tiles, as ComfyUI does."""
    module = vae.module(ctx)
    scale = 2 ** (len(module.config.block_out_channels) - 1)
    dtype = next(module.parameters()).dtype

    def decode(z: torch.Tensor) -> torch.Tensor:
        ctx.check_cancelled()
        return module.decode(z.to(ctx.device, dtype)).sample.float().cpu()

    images = []
    with torch.inference_mode():
        for one in samples.split(1):
            if tile is not None:
                decoded = tiled(decode, one, *_decode_tiles(tile, scale), scale, 1)
            else:
                try:
                    decoded = decode(one)
                except torch.OutOfMemoryError:
                    _release(ctx)
                    log.warning(
                        "VAE decode of a %dx%d latent ran out of memory; decoding in %d px tiles",
                        one.shape[-1],
                        one.shape[-2],
                        FALLBACK_TILE,
                    )
                    decoded = tiled(decode, one, *_decode_tiles((FALLBACK_TILE, FALLBACK_OVERLAP), scale), scale, 1)
            images.append(((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))
    return torch.cat(images)


def _release(ctx: NodeContext) -> None:
    """Give cached device memory back before retrying in tiles."""
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _overlap(tile_size: int, overlap: int) -> int:
    return tile_size // 4 if tile_size < overlap * 4 else overlap  # ComfyUI's rule


def _decode_tiles(tile: tuple[int, int], scale: int) -> tuple[int, int]:
    """(tile, overlap) in latent cells from pixels."""
    size = max(1, tile[0] // scale)
    return size, min(_overlap(tile[0], tile[1]) // scale, size - 1)


def _encode_tiles(tile: tuple[int, int], scale: int) -> tuple[int, int]:
    """(tile, overlap) in pixels, whole latent cells so tiles land on the latent grid."""
    size = max(scale, tile[0] // scale * scale)
    return size, min(_overlap(tile[0], tile[1]) // scale * scale, size - scale)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    return [*range(0, size - tile, stride), size - tile]


def _ramp(n: int, ramp: int) -> torch.Tensor:
    """Blend weights along one side of a tile: rising over `ramp` cells at each end."""
    i = torch.arange(n, dtype=torch.float32)
    if ramp <= 0:
        return torch.ones(n)
    return torch.minimum((i + 1) / (ramp + 1), (n - i) / (ramp + 1)).clamp(max=1)


def tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int, up: int, down: int
) -> torch.Tensor:
    """fn applied to overlapping `tile`-sized squares of x [1,C,H,W] (each side's tiles start
    `tile - overlap` apart, the last one flush with the edge), the outputs (scaled by up/down:
    8/1 for a decoder, 1/8 for an encoder) blended with weights that ramp across the overlaps.
    No state is set on any model: tiling is per call."""
    height, width = x.shape[-2:]
    out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    for y in _starts(height, tile, overlap):
        for x0 in _starts(width, tile, overlap):
            part = fn(x[..., y : y + tile, x0 : x0 + tile])
            if out is None or weight is None:
                out = torch.zeros(*part.shape[:2], height * up // down, width * up // down)
                weight = torch.zeros(1, 1, *out.shape[-2:])
            ramp = overlap * up // down
            w = _ramp(part.shape[-2], ramp)[:, None] * _ramp(part.shape[-1], ramp)[None, :]
            oy, ox = y * up // down, x0 * up // down
            out[..., oy : oy + part.shape[-2], ox : ox + part.shape[-1]] += part * w
            weight[..., oy : oy + part.shape[-2], ox : ox + part.shape[-1]] += w
    if out is None or weight is None:
        raise ValueError(f"nothing to tile in an input of size {height}x{width}")
    return out / weight


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
