"""The VAE's way between pixels and latents: whole-image encode and decode, overlapping tiles
for large images, and the fall-back to tiles when a whole-image pass runs out of memory.

Kept apart from the latent nodes (latent.py) because inpainting and the tiled VAE nodes share
it, and it is the one place that knows how tiles are laid out and blended.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from plinth.nodes.core.context import NodeContext
from plinth.nodes.core.types import Vae
from plinth.nodes.resize import center_crop, require_vae_size

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
